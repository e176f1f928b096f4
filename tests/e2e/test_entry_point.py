"""The ``python -m milstudy.train.e2e`` entry point: argument errors and ``--set`` / ``--out`` overrides."""

import json
from pathlib import Path

import pytest
import yaml

import e2e_toy  # noqa: F401  registers e2e_test_attention_pool
from milstudy.papers.abmilx import PAPER_SETTINGS
from milstudy.train.e2e_cli import main


def test_preset_without_slide_root_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("MILSTUDY_SLIDE_ROOT", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "panda"])
    assert exit_info.value.code == 2
    assert "MILSTUDY_SLIDE_ROOT" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one of --config"),
    (["--config", "missing.yaml"], "not found"),
    (["--preset", "no_such_setting"], "invalid choice"),
])
def test_bad_arguments_name_the_problem(argv, message, capsys):
    """Usage errors exit through argparse (code 2); a missing config file is one line and exit 2 as well."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2 and message in capsys.readouterr().err


def test_set_and_out_override_the_config(tmp_path: Path, capsys):
    config = {
        "encoder": "tiny_cnn", "encoder_kwargs": {"widths": [8, 16, 32, 64]}, "aggregator": "e2e_test_attention_pool",
        "s": 8, "ratio": 4, "epochs": 5, "lr": 3e-3, "warmup_epochs": 0, "batch_slides": 2, "device": "cpu",
        "data": {"toy": {"n_slides": 6, "n_patches": 12, "size": 16}}, "out": str(tmp_path / "ignored"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["--config", str(path), "--set", "epochs=1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 1  # header + one epoch
    assert not (tmp_path / "ignored").exists()
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--set", "epochs"])
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_a_paper_setting_without_encoder_weights_is_refused_and_random_init_needs_asking(name):
    from milstudy.train.e2e import E2EConfig, build_e2e_model

    config = E2EConfig(**PAPER_SETTINGS[name]["config"])
    assert config.encoder_init == "pretrained" and config.encoder_weights is None
    with pytest.raises(ValueError, match=r"no file was given.*encoder_weights=.*encoder_init=random"):
        build_e2e_model(config, 2)
