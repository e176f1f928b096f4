"""--quiet / --verbose on the data and features commands (milstudy.console): info and debug lines go to stderr
through logging, the per-slide summary stays on stdout, and --quiet switches the progress bars off."""

import pytest

from milstudy.cli import main


@pytest.mark.parametrize("flag, info, debug", [([], True, False), (["--quiet"], False, False),
                                               (["--verbose"], True, True)])
def test_data_tile_logging_levels(tiny_slide, tmp_path, capsys, flag, info, debug):
    code = main(["data", "tile", "--slides", str(tiny_slide), "--out", str(tmp_path / "tiles"), *flag])
    captured = capsys.readouterr()
    assert code == 0
    assert "tiled 1/1 slides" in captured.out  # the result, whatever the level
    assert ("tiling 1 slide(s)" in captured.err) == info
    assert (f"{tiny_slide.stem}: ok" in captured.err) == debug
    assert ("tiling:" in captured.err) == (not flag or flag == ["--verbose"])  # tqdm's bar is on stderr too


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["data", "check", "--manifest", "m.csv", "--quiet", "--verbose"])
    assert "not allowed with" in capsys.readouterr().err


def test_every_slide_command_has_the_flags():
    from milstudy.cli import build_parser

    parser = build_parser()
    for argv in (["data", "synth"], ["data", "tile", "--out", "x"], ["data", "check", "--manifest", "m"],
                 ["data", "masks", "--manifest", "m", "--annotations", "a", "--out", "o"],
                 ["features", "extract", "--manifest", "m", "--encoder", "e", "--out", "o"],
                 ["calibrate"], ["train"], ["eval", "--checkpoint", "c", "--manifest", "m", "--features", "f",
                                            "--out", "o"]):
        args = parser.parse_args([*argv, "--quiet"])
        assert args.quiet and not args.verbose, argv
