"""The notebook runner: parameter validation and merge order, failure isolation, atomic output, provenance,
sharding, bad input, and the results index. Notebook executions are shared through module-scoped fixtures."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from milstudy import cli, runner
from milstudy.paths import REPO_ROOT
from milstudy.studies import (
    Study, StudyError, load_studies, parse_cli_parameters, parse_parameters_source, parse_shard,
    resolve_parameters, select_studies, shard,
)

# ------------------------------------------------------------------------------ parameters (no kernel)
CELL = '''
profile = "cpu"
seed = 0
epochs: int = 2
lr = 0.1
name = "demo"
models = ["a", "b"]
fail = False
extra = None
limit: float | None = None
import math  # not a parameter
'''


@pytest.fixture
def good(study_tree) -> Study:
    return load_studies(study_tree.studies_file)["good"]


def test_parameters_cell_is_read_without_executing():
    params = parse_parameters_source(CELL)
    assert list(params) == ["profile", "seed", "epochs", "lr", "name", "models", "fail", "extra", "limit"]
    assert params["epochs"].kind is int and params["epochs"].default == 2
    assert params["lr"].kind is float and params["models"].kind is list
    assert params["extra"].kind is None and params["limit"].kind is float and params["limit"].optional


def test_merge_order_cell_then_studies_then_profile_then_cli(good):
    # cell: epochs=2 lr=0.1; studies.yaml: epochs=3; profiles.smoke: lr=0.5; -p wins over all
    assert resolve_parameters(good, "cpu")["epochs"] == 3
    smoke = resolve_parameters(good, "smoke")
    assert (smoke["epochs"], smoke["lr"], smoke["name"], smoke["profile"]) == (3, 0.5, "demo", "smoke")
    cli_values = parse_cli_parameters(["epochs=7", "lr=1e-3", "models=[x, y]", "name=123", "extra={a: 1}"])
    resolved = resolve_parameters(good, "smoke", cli_values)
    assert resolved["epochs"] == 7 and resolved["lr"] == pytest.approx(1e-3)
    assert resolved["models"] == ["x", "y"] and resolved["extra"] == {"a": 1}
    assert resolved["name"] == "123"  # a string parameter keeps the text
    assert resolved["profile"] == "smoke" and resolved["seed"] == 0


def test_int_is_accepted_for_float(good):
    assert resolve_parameters(good, "cpu", parse_cli_parameters(["lr=1"]))["lr"] == 1


def test_unknown_parameter_lists_valid_keys(good):
    with pytest.raises(StudyError) as err:
        resolve_parameters(good, "cpu", parse_cli_parameters(["epochz=3"]))
    message = str(err.value)
    assert "good" in message and "'epochz'" in message and "did you mean 'epochs'?" in message
    assert "valid parameters: epochs, extra, fail, lr, models, name, profile, seed" in message


@pytest.mark.parametrize("pair, expected", [
    ("epochs=2.5", "expects int, got float"), ("epochs=true", "expects int, got bool"),
    ("lr=fast", "expects float, got str"), ("models=3", "expects list, got int"), ("fail=1", "expects bool"),
])
def test_wrong_type_names_expected_type(good, pair, expected):
    with pytest.raises(StudyError, match=expected) as err:
        resolve_parameters(good, "cpu", parse_cli_parameters([pair]))
    assert "(from -p)" in str(err.value)


def test_studies_yaml_values_are_validated_too(study_tree):
    study_tree.studies_file.write_text("notebooks:\n  good:\n    profiles:\n      smoke: {epochs: many}\n")
    study = load_studies(study_tree.studies_file)["good"]
    with pytest.raises(StudyError, match=r"'epochs' \(from studies.yaml profiles.smoke\) expects int"):
        resolve_parameters(study, "smoke")


@pytest.mark.parametrize("pair", ["epochs", "=3", "two words=1"])
def test_malformed_cli_parameter(pair):
    with pytest.raises(StudyError, match="expected key=value"):
        parse_cli_parameters([pair])


# ---------------------------------------------------------------------------------------- sharding
def test_shards_are_deterministic_and_partition_the_batch():
    studies = [Study(stem=f"{i:02d}_nb", path=Path(f"{i:02d}_nb.ipynb")) for i in (5, 1, 3, 0, 4, 2, 6)]
    shares = [[s.stem for s in shard(studies, i, 3)] for i in range(3)]
    assert shares[0] == ["00_nb", "03_nb", "06_nb"]  # sorted, every 3rd from 0
    assert sorted(sum(shares, [])) == sorted(s.stem for s in studies)
    assert shares == [[s.stem for s in shard(list(reversed(studies)), i, 3)] for i in range(3)]
    assert parse_shard("2/3") == (2, 3)


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1/0", "a/b", "1"])
def test_bad_shard(text):
    with pytest.raises(StudyError, match="--shard"):
        parse_shard(text)


# ------------------------------------------------------------------------------- bad input on the CLI
def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown notebook 'nope': not listed in studies.yaml; known notebooks: bad, good"),
    (["run", "good", "--profile", "gpu"], "unknown profile 'gpu'"),
    (["run", "good", "--profile", "smok"], "unknown profile 'smok' (did you mean 'smoke'?); choose one of: smoke, cpu, paper"),
    (["run", "godo"], "unknown notebook 'godo' (did you mean 'good'?)"),
    (["run", "good", "-p", "epochs"], "-p 'epochs': expected key=value"),
    (["run", "good", "-p", "epochz=1"], "valid parameters:"),
    (["run", "good", "--kernel", "no-such-kernel"], "Jupyter kernel 'no-such-kernel' not found"),
    (["run"], "name the notebooks to run"),
    (["run", "--all", "--shard", "2/2"], "--shard '2/2'"),
    (["list", "--profile", "gpu"], "unknown profile 'gpu'"),
])
def test_bad_input_is_one_clear_line_and_exit_2(study_tree, capsys, args, message):
    code, err = _cli(args + study_tree.cli_options(), capsys)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not study_tree.results_root.exists()  # nothing ran


def test_missing_kernel_message_says_make_venv(study_tree):
    with pytest.raises(StudyError, match="make venv"):
        runner.resolve_kernel("no-such-kernel")


def test_python3_fallback_only_for_this_interpreter():
    assert runner._same_interpreter(sys.executable)
    assert not runner._same_interpreter("/nonexistent/bin/python3")
    assert runner.resolve_kernel() in ("milstudy", "python3")  # `make venv` installs milstudy into .venv


def test_notebook_can_be_named_by_stem_number_file_or_path(study_tree):
    for name in ("good", "good.ipynb", str(study_tree.notebooks_dir / "good.ipynb")):
        batch = runner.plan_batch([name], notebooks_dir=study_tree.notebooks_dir)
        assert [s.stem for s, _ in batch] == ["good"]
    study_tree.studies_file.write_text("notebooks:\n  01_first: {}\n  02_second: {}\n  02_other: {}\n")
    for stem in ("01_first", "02_second", "02_other"):
        (study_tree.notebooks_dir / f"{stem}.ipynb").write_text("{}")
    studies = load_studies(study_tree.studies_file)
    assert [s.stem for s in select_studies(studies, ["01"])] == ["01_first"]
    with pytest.raises(StudyError, match="unknown notebook '02'"):  # ambiguous number
        select_studies(studies, ["02"])


def test_list_shows_resolved_parameters(study_tree, capsys):
    assert cli.main(["list", "--profile", "smoke", *study_tree.cli_options()]) == 0
    out = capsys.readouterr().out
    assert "good  [test]" in out and "epochs=3" in out and "lr=0.5" in out and "profile='smoke'" in out


# ------------------------------------------------------------------------- executions (shared, ~4 runs)
@pytest.fixture(scope="module")
def batch(tmp_path_factory, study_tree_factory, worker_id):
    """One batch with a raising and a good notebook (2 workers), then a failing rerun of the good one.

    Executed once per test session: pytest-xdist workers share it through a folder and a file lock (the
    pytest-xdist recipe for once-only fixtures), so its tests may run on any worker.
    """
    shared = tmp_path_factory.getbasetemp()
    shared = (shared.parent if worker_id != "master" else shared) / "runner-batch"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary_file = shared / "summary.json"
        if not summary_file.exists():
            summary_file.write_text(json.dumps(_execute_batch(study_tree_factory(shared))))
    summary = json.loads(summary_file.read_text())
    tree = SimpleNamespace(notebooks_dir=shared / "notebooks", studies_file=shared / "notebooks" / "studies.yaml",
                           results_root=shared / "results")
    tree.locations = lambda: {"notebooks_dir": tree.notebooks_dir, "studies_file": tree.studies_file,
                              "results_root": tree.results_root}
    outcomes = {key: [runner.RunOutcome(o["stem"], o["status"], o["wall_time_s"], Path(o["folder"]), o["error"])
                      for o in summary[key]] for key in ("first", "rerun")}
    return tree, outcomes["first"], (summary["code"], summary["log"]), summary["before"], outcomes["rerun"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _execute_batch(tree) -> dict:
    first_log = io.StringIO()
    with contextlib.redirect_stdout(first_log):  # through the CLI, to see its summary and exit code
        code = cli.main(["run", "--all", "--profile", "smoke", "--jobs", "2", *tree.cli_options()])
    first = [{"stem": stem, "status": run["status"], "wall_time_s": run["wall_time_s"],
              "folder": str(tree.results_root), "error": run["error"]}
             for stem, run in ((s, _latest_run(tree, s)) for s in ("bad", "good"))]
    before = _digests(tree.results_root / "smoke" / "good")
    rerun = runner.run_batch(["good"], profile="smoke", params=["fail=true"], out=io.StringIO(),
                             **tree.locations())
    rerun = [{"stem": o.stem, "status": o.status, "wall_time_s": o.wall_time_s, "folder": str(o.folder),
              "error": o.error} for o in rerun]
    return {"code": code, "log": first_log.getvalue(), "first": first, "before": before, "rerun": rerun}


def _latest_run(tree, stem: str) -> dict:
    for folder in (tree.results_root / "smoke" / stem, tree.results_root / "smoke" / "_failed" / stem):
        if (folder / "run.json").is_file():
            return json.loads((folder / "run.json").read_text())
    raise AssertionError(f"no run.json for {stem}")


def test_failure_does_not_stop_the_batch(batch):
    tree, first, (code, log), _, _ = batch
    assert code == 1
    assert "bad       failed" in log and "good      ok" in log and "ValueError: boom from the bad notebook" in log
    assert [(o.stem, o.status) for o in first] == [("bad", "failed"), ("good", "ok")]
    bad = first[0]
    assert bad.error["ename"] == "ValueError" and "boom from the bad notebook" in bad.error["evalue"]
    summary = runner.format_summary(first)
    assert "ValueError: boom from the bad notebook" in summary and "1 of 2 failed" in summary
    failed_dir = tree.results_root / "smoke" / "_failed" / "bad"
    assert (failed_dir / "bad.ipynb").is_file()
    assert json.loads((failed_dir / "run.json").read_text())["status"] == "failed"
    assert not (tree.results_root / "smoke" / "bad").exists()


def test_good_notebook_outputs_and_injected_values(batch):
    tree, _, _, before, _ = batch
    good_dir = tree.results_root / "smoke" / "good"
    assert {"good.ipynb", "run.json", "curve.png", "schedule.csv", "schedule.md", "seen.json"} <= set(before)
    seen = json.loads((good_dir / "seen.json").read_text())
    assert (seen["profile"], seen["current_profile"], seen["epochs"], seen["lr"]) == ("smoke", "smoke", 3, 0.5)
    assert seen["env_seed"] == "0" and seen["mplbackend"] == "Agg"
    assert Path(seen["cwd"]) == tree.notebooks_dir.resolve()  # relative paths resolve like in JupyterLab
    assert Path(seen["output_dir"]).parent == (tree.results_root / "smoke").resolve()  # the temporary sibling
    assert (good_dir / "schedule.md").read_text().startswith("|")
    assert (good_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_json_provenance(batch):
    tree = batch[0]
    run = json.loads((tree.results_root / "smoke" / "good" / "run.json").read_text())
    for key in ("notebook", "profile", "status", "error", "parameters", "seed", "kernel", "start", "end",
                "wall_time_s", "git", "python", "platform", "packages", "device", "figures", "tables"):
        assert key in run, key
    assert run["status"] == "ok" and run["error"] is None and run["profile"] == "smoke"
    assert run["parameters"]["epochs"] == 3 and run["parameters"]["lr"] == 0.5 and run["seed"] == 0
    assert run["figures"] == ["curve.png"] and run["tables"] == ["schedule"]
    assert run["start"] <= run["end"] and run["wall_time_s"] > 0
    assert run["python"] == ".".join(map(str, sys.version_info[:3]))
    for package in ("torch", "numpy", "papermill", "milstudy", "scikit-learn"):
        assert run["packages"][package], package
    assert run["device"]["kind"] in ("cpu", "cuda") and run["device"]["cpu_count"] >= 1
    if Path("/proc/cpuinfo").exists():  # the CPU model: float32 results differ between instruction sets
        assert run["device"]["cpu_model"] and run["device"]["cpu_model"] in Path("/proc/cpuinfo").read_text()
    if (REPO_ROOT / ".git").exists():  # the commit of the code that ran (HEAD may have moved on since)
        commit = run["git"]["commit"]
        assert len(commit) == 40 and isinstance(run["git"]["dirty"], bool)
        ancestry = ["git", "-C", str(REPO_ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]
        assert subprocess.run(ancestry, capture_output=True).returncode == 0


def test_failing_rerun_keeps_previous_good_result(batch):
    tree, _, _, before, rerun = batch
    assert [(o.stem, o.status) for o in rerun] == [("good", "failed")]
    assert rerun[0].error["ename"] == "RuntimeError" and "requested failure" in rerun[0].error["evalue"]
    assert _digests(tree.results_root / "smoke" / "good") == before
    failed = json.loads((tree.results_root / "smoke" / "_failed" / "good" / "run.json").read_text())
    assert failed["status"] == "failed" and failed["parameters"]["fail"] is True


def test_no_temporary_folders_left(batch):
    tree = batch[0]
    assert not [p for p in (tree.results_root / "smoke").rglob(".tmp*")]
    assert not [p for p in (tree.results_root / "smoke").rglob(".lock")]  # results carry no run lock


def test_report_indexes_figures_tables_and_provenance(batch, tmp_path):
    tree = batch[0]
    readme = runner.write_report("smoke", **tree.locations())
    text = readme.read_text()
    assert readme == tree.results_root / "smoke" / "README.md"
    assert "![curve](good/curve.png)" in text and text.index("![curve]") < text.index("**schedule**")
    assert (tree.results_root / "smoke" / "good" / "schedule.md").read_text().strip() in text
    assert "[good.ipynb](good/good.ipynb)" in text
    assert "Provenance: commit" in text and "status **ok**" in text
    assert "Latest run failed" in text and "boom from the bad notebook" in text
    assert text.index("## bad") < text.index("## good")  # studies.yaml order
    assert not list(readme.parent.glob(".README*"))
    # a long table, added to a copy of the shared results (other tests compare the shared folder byte for byte)
    import shutil

    results = tmp_path / "results"
    shutil.copytree(tree.results_root, results)
    long = pd.DataFrame({"slide": [f"s{i}" for i in range(runner.INLINE_TABLE_ROWS + 1)], "score": 0.5})
    long.to_csv(results / "smoke" / "good" / "per_slide.csv", index=False)
    (results / "smoke" / "good" / "per_slide.md").write_text(long.to_markdown(index=False))
    text = runner.write_report("smoke", **{**tree.locations(), "results_root": results}).read_text()
    assert f"[Markdown](good/per_slide.md)): {runner.INLINE_TABLE_ROWS + 1} rows, not shown here" in text
    assert "| s0 " not in text and (results / "smoke" / "good" / "schedule.md").read_text().strip() in text
    longer = pd.concat([long] * 3, ignore_index=True)  # a Markdown copy cut short: the row count is the CSV's
    longer.to_csv(results / "smoke" / "good" / "per_slide.csv", index=False)
    text = runner.write_report("smoke", **{**tree.locations(), "results_root": results}).read_text()
    assert f"[Markdown](good/per_slide.md)): {len(longer)} rows, not shown here" in text
    assert not (tree.results_root / "smoke" / "good" / "per_slide.csv").exists()


# ------------------------------------------------------------------------------- notebook helpers
def test_helpers_write_into_the_output_dir(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    monkeypatch.setenv(runner.ENV_OUTPUT_DIR, str(tmp_path / "out"))
    monkeypatch.setenv(runner.ENV_PROFILE, "smoke")
    assert runner.output_dir() == tmp_path / "out" and runner.current_profile() == "smoke"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert runner.save_figure(fig, "line").read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)
    csv = runner.save_table(pd.DataFrame({"auc": [0.123456]}, index=pd.Index(["abmil"], name="model")), "scores")
    assert csv.read_text().splitlines() == ["model,auc", "abmil,0.123456"]
    assert "0.1235" in csv.with_suffix(".md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line.png", "scores.csv", "scores.md"]
    with pytest.raises(ValueError, match="plain file name"):
        runner.save_table(pd.DataFrame(), "../escape")
    n = runner.MARKDOWN_MAX_ROWS + 5
    long = runner.save_table(pd.DataFrame({"x": range(n)}), "long")
    assert len(long.read_text().splitlines()) == n + 1  # the CSV: header + every row
    markdown = long.with_suffix(".md").read_text().splitlines()
    assert len(markdown) == 2 + runner.MARKDOWN_MAX_ROWS + 2  # header, rule, the first rows, a blank line, the note
    assert markdown[-1] == f"_The first {runner.MARKDOWN_MAX_ROWS} of {n} rows; all of them are in long.csv._"


def test_helpers_fall_back_to_interactive_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(runner.ENV_OUTPUT_DIR, raising=False)
    monkeypatch.setenv(runner.ENV_NOTEBOOK, "07_demo")
    monkeypatch.setenv("MILSTUDY_RESULTS", str(tmp_path))
    assert runner.output_dir() == tmp_path / "interactive" / "07_demo"


def test_sigterm_removes_the_temporary_folder_and_exits_130(tmp_path):
    """`kill` (or a scheduler cancelling the job) mid-notebook: no `.tmp-*` folder, no result, exit code 130."""
    import signal
    import time

    import nbformat

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    book = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                             "display_name": "Python 3"}})
    book.cells = [
        nbformat.v4.new_code_cell("profile = 'cpu'\nseed = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import time\nfrom milstudy.runner import output_dir\n"
                                  "(output_dir() / 'started').write_text('yes')\ntime.sleep(120)"),
    ]
    nbformat.write(book, notebooks / "slow.ipynb")
    (notebooks / "studies.yaml").write_text("notebooks:\n  slow:\n    paper: none\n    title: sleeps\n")
    results = tmp_path / "results"
    command = [sys.executable, "-c", "import sys; from milstudy.cli import main; sys.exit(main())", "run", "slow",
               "--profile", "smoke", "--notebooks-dir", str(notebooks), "--results-root", str(results)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(results.glob("smoke/.tmp-slow-*/started")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the notebook never started"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not list(results.rglob(".tmp*")) and not (results / "smoke" / "slow").exists()


def test_list_shows_each_notebooks_budget_and_last_recorded_wall_time(tmp_path, capsys):
    """`milstudy list` prints the profile's budget and the last recorded run's wall time, flagging overruns."""
    import json

    from milstudy.studies import Study, budget_line, last_recorded_run

    study = Study("nb", tmp_path / "nb.ipynb", budget_min={"cpu": 2.0})
    assert budget_line(study, "cpu", None) == "budget 2 min; not run yet"
    (tmp_path / "cpu" / "nb").mkdir(parents=True)
    (tmp_path / "cpu" / "nb" / "run.json").write_text(json.dumps({"wall_time_s": 150.0, "git": {"commit": "abcdef123456"}}))
    record = last_recorded_run(tmp_path / "cpu", "nb")
    assert budget_line(study, "cpu", record) == "budget 2 min; last run 2.5 min at abcdef123; OVER BUDGET"
    assert budget_line(study, "smoke", record).startswith("no budget; last run 2.5 min")
