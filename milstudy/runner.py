"""Run the study's notebooks headlessly (papermill), record provenance, and index the results.

Commands (see ``add_commands``): ``milstudy run`` executes notebooks listed in ``notebooks/studies.yaml`` under a
profile, ``milstudy list`` shows them with their resolved parameters, ``milstudy report`` writes
``results/<profile>/README.md``. Each run lands in ``results/<profile>/<stem>/`` (executed notebook, figures,
tables, ``run.json``); it is written to a temporary sibling folder and renamed into place only when the notebook
finished, so a crash never leaves half a result next to a good one. Failed runs go to
``results/<profile>/_failed/<stem>/`` for inspection.

Notebooks save their outputs with :func:`output_dir`, :func:`save_figure` and :func:`save_table`; these work
both under the runner and when a notebook is run by hand (then into ``results/interactive/<stem>/``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from milstudy import paths
from milstudy.run_locks import clean_stale, remove_lock, write_lock
from milstudy.provenance import device_line, environment_info, now_iso, read_run_json, write_json_atomic
from milstudy.studies import (
    Study, StudyError, check_profile, load_studies, parse_cli_parameters, parse_shard,
    resolve_parameters, select_studies, shard)

DEFAULT_KERNEL = "milstudy"  # installed into .venv by `make venv` (ipykernel install --sys-prefix)
ENV_OUTPUT_DIR = "MILSTUDY_OUTPUT_DIR"
ENV_PROFILE = "MILSTUDY_PROFILE"
ENV_SEED = "MILSTUDY_SEED"
ENV_NOTEBOOK = "MILSTUDY_NOTEBOOK"
FAILED_DIR = "_failed"


# ==================================================================================== notebook helpers
def _notebook_stem() -> str:
    if os.environ.get(ENV_NOTEBOOK):
        return os.environ[ENV_NOTEBOOK]
    session = os.environ.get("JPY_SESSION_NAME")  # set by jupyter_server for kernels started from a notebook
    return Path(session).stem if session else "notebook"


def output_dir() -> Path:
    """Folder for this notebook's figures and tables (created): the runner's folder, else results/interactive/<stem>."""
    folder = Path(os.environ.get(ENV_OUTPUT_DIR) or paths.results_root() / "interactive" / _notebook_stem())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def current_profile() -> str:
    """The profile this notebook runs under (``MILSTUDY_PROFILE`` from the runner; ``cpu`` when run by hand)."""
    return os.environ.get(ENV_PROFILE, "cpu")


def _output_path(name: str, suffix: str) -> Path:
    stem = name.removesuffix(suffix)
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ValueError(f"output name {name!r}: use a plain file name without folders, e.g. 'attention_map'")
    return output_dir() / f"{stem}{suffix}"


def save_figure(fig: Any, name: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<output_dir>/<name>.png`` (atomically); returns the path."""
    path = _output_path(name, ".png")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


MARKDOWN_MAX_ROWS = 1000  # a longer table's Markdown copy holds its first rows; the CSV holds all of them


def save_table(df: Any, name: str, floatfmt: str = ".4g") -> Path:
    """Save a DataFrame as ``<name>.csv`` (full precision) and ``<name>.md`` (for the report: the first
    ``MARKDOWN_MAX_ROWS`` rows and a line saying so when there are more); returns the CSV path."""
    import pandas as pd

    csv_path = _output_path(name, ".csv")
    md_path = csv_path.with_suffix(".md")
    keep_index = not isinstance(df.index, pd.RangeIndex)
    markdown = df.head(MARKDOWN_MAX_ROWS).to_markdown(index=keep_index, floatfmt=floatfmt) + "\n"
    if len(df) > MARKDOWN_MAX_ROWS:
        markdown += f"\n_The first {MARKDOWN_MAX_ROWS} of {len(df)} rows; all of them are in {csv_path.name}._\n"
    for path, text in ((csv_path, df.to_csv(index=keep_index)), (md_path, markdown)):
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return csv_path


# ========================================================================================== kernels
def _same_interpreter(executable: str) -> bool:
    found = executable if os.path.isabs(executable) else shutil.which(executable)
    if not found:
        return False
    # no symlink resolution: a venv's python links to the base interpreter but is a different environment
    return Path(os.path.abspath(found)).parent == Path(os.path.abspath(sys.executable)).parent


def resolve_kernel(requested: str | None = None) -> str:
    """The Jupyter kernel to execute with: ``requested``, else ``milstudy``, else this venv's ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    specs = manager.find_kernel_specs()
    if requested:
        if requested not in specs:
            raise StudyError(
                f"Jupyter kernel {requested!r} not found (available: {', '.join(sorted(specs)) or 'none'}); "
                f"run `make venv` to install the {DEFAULT_KERNEL!r} kernel or pick one with --kernel"
            )
        return requested
    if DEFAULT_KERNEL in specs:
        return DEFAULT_KERNEL
    if sys.prefix != sys.base_prefix and "python3" in specs:
        if _same_interpreter(manager.get_kernel_spec("python3").argv[0]):
            return "python3"
    raise StudyError(
        f"Jupyter kernel {DEFAULT_KERNEL!r} not found: run `make venv` "
        f"(it installs it with `python -m ipykernel install --sys-prefix --name {DEFAULT_KERNEL}`)"
    )


def _is_ipykernel(kernel_name: str) -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    return any("ipykernel" in part for part in argv)


# ========================================================================================= execution
@dataclass
class RunJob:
    """Everything one worker needs to execute one notebook (picklable: runs in a separate process with --jobs)."""

    study: Study
    profile: str
    parameters: dict[str, Any]
    profile_dir: Path
    kernel: str
    timeout: float | None = None
    progress_bar: bool = False
    environment: dict[str, Any] = field(default_factory=dict)
    ipykernel: bool = True  # the kernel is ipykernel (accepts --IPKernelApp options)


@dataclass
class RunOutcome:
    stem: str
    status: str  # "ok" | "failed"
    wall_time_s: float
    folder: Path
    error: dict[str, Any] | None = None

    def error_line(self) -> str:
        if not self.error:
            return ""
        where = f"cell [{self.error['exec_count']}]: " if self.error.get("exec_count") else ""
        text = f"{where}{self.error.get('ename')}: {self.error.get('evalue')}".replace("\n", " ")
        return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the kernel papermill starts (it inherits os.environ); restore after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a scheduler cancelling the job) into KeyboardInterrupt while inside, so the
    ``finally`` clauses run as on Ctrl-C: papermill shuts the kernel down and the temporary folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _move_into_place(source: Path, target: Path) -> None:
    """Replace ``target`` by ``source`` (same filesystem): park the old folder, rename, then delete the old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    parked = None
    if target.exists():
        parked = target.with_name(f".tmp-old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, parked)
        write_lock(parked)
    os.replace(source, target)
    if parked is not None:
        shutil.rmtree(parked, ignore_errors=True)


def _error_record(err: BaseException) -> dict[str, Any]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return {"ename": err.ename, "evalue": err.evalue, "exec_count": err.exec_count, "cell_index": err.cell_index}
    return {"ename": type(err).__name__, "evalue": str(err), "exec_count": None, "cell_index": None}


def _outputs(folder: Path, suffix: str) -> list[str]:
    return [p.name for p in _outputs_in_order(folder) if p.suffix == suffix]


def _outputs_in_order(folder: Path) -> list[Path]:
    """Figures (PNG) and tables (CSV) of a results folder, oldest first."""
    files = [p for p in folder.iterdir() if p.suffix in (".png", ".csv") and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def execute_study(job: RunJob) -> RunOutcome:
    """Execute one notebook into a temporary folder; rename it to ``<profile>/<stem>`` or ``_failed/<stem>``."""
    import papermill

    stem = job.study.stem
    job.profile_dir.mkdir(parents=True, exist_ok=True)
    tmp = (job.profile_dir / f".tmp-{stem}-{uuid.uuid4().hex[:8]}").resolve()
    tmp.mkdir()  # not mkdtemp: results keep the usual (umask) permissions, not 0700
    write_lock(tmp)  # a killed run's folder is cleaned by the next run (milstudy.run_locks)
    executed = tmp / f"{stem}.ipynb"
    seed = job.parameters.get("seed", 0)
    env = {ENV_OUTPUT_DIR: str(tmp), ENV_PROFILE: job.profile, ENV_SEED: str(seed), ENV_NOTEBOOK: stem,
           "MPLBACKEND": "Agg"}
    start, t0, error = now_iso(), time.perf_counter(), None
    try:
        try:
            with _sigterm_as_interrupt(), _environ(env):
                papermill.execute_notebook(
                    str(job.study.path), str(executed), parameters=job.parameters, kernel_name=job.kernel,
                    cwd=str(job.study.path.parent), progress_bar=job.progress_bar, log_output=False,
                    execution_timeout=job.timeout,
                    # ipykernel warns on every start that local TCP is unencrypted; keep batch logs readable
                    extra_arguments=["--IPKernelApp.log_level=ERROR"] if job.ipykernel else [],
                )
        except Exception as err:  # the notebook raised, timed out or its kernel died: record, never re-raise
            error = _error_record(err)
        wall = round(time.perf_counter() - t0, 2)
        status = "ok" if error is None else "failed"
        record = {
            "notebook": stem, "title": job.study.title, "paper": job.study.paper, "profile": job.profile,
            "status": status, "error": error, "parameters": job.parameters, "seed": seed, "kernel": job.kernel,
            "start": start, "end": now_iso(), "wall_time_s": wall, "executed_notebook": executed.name,
            "figures": _outputs(tmp, ".png"), "tables": [n.removesuffix(".csv") for n in _outputs(tmp, ".csv")],
            **job.environment,
        }
        write_json_atomic(tmp / "run.json", record)
        remove_lock(tmp)  # results carry no lock
        if error is None:
            target = job.profile_dir / stem
            _move_into_place(tmp, target)
            shutil.rmtree(job.profile_dir / FAILED_DIR / stem, ignore_errors=True)  # an old failure is now stale
        else:
            target = job.profile_dir / FAILED_DIR / stem
            _move_into_place(tmp, target)
        return RunOutcome(stem, status, wall, target, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if we were interrupted


def _run_parallel(jobs: list[RunJob], workers: int, report: Any) -> list[RunOutcome]:
    # spawn, not fork: each worker is a clean process whose os.environ only this worker's notebook touches
    context = multiprocessing.get_context("spawn")
    outcomes = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(execute_study, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                job = futures[future]
                try:
                    outcome = future.result()
                except Exception as err:  # the worker process itself died
                    outcome = RunOutcome(job.study.stem, "failed", 0.0,
                                         job.profile_dir / FAILED_DIR / job.study.stem,
                                         {"ename": type(err).__name__, "evalue": str(err), "exec_count": None})
                report(outcome)
                outcomes.append(outcome)
        except KeyboardInterrupt:
            # pass the interrupt on: each worker's execute_study cleans up on SIGTERM, then stop waiting
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return outcomes


def load_catalog(notebooks_dir: Path | None = None, studies_file: Path | None = None) -> dict[str, Study]:
    """studies.yaml of ``notebooks_dir`` (defaults: the repository's notebooks/ and its studies.yaml)."""
    notebooks_dir = Path(notebooks_dir or paths.notebooks_dir())
    return load_studies(Path(studies_file or notebooks_dir / "studies.yaml"), notebooks_dir)


def plan_batch(
    names: list[str], *, run_all: bool = False, profile: str = "cpu", params: list[str] | None = None,
    shard_spec: str | None = None, notebooks_dir: Path | None = None, studies_file: Path | None = None,
) -> list[tuple[Study, dict[str, Any]]]:
    """Select, shard and validate a batch without running anything: [(study, resolved parameters)]."""
    check_profile(profile)
    studies = load_catalog(notebooks_dir, studies_file)
    cli = parse_cli_parameters(params)
    chosen = select_studies(studies, names, run_all)
    if shard_spec:
        chosen = shard(chosen, *parse_shard(shard_spec))
    return [(study, resolve_parameters(study, profile, cli)) for study in chosen]


def run_batch(
    names: list[str], *, run_all: bool = False, profile: str = "cpu", params: list[str] | None = None,
    jobs: int = 1, shard_spec: str | None = None, kernel: str | None = None, timeout: float | None = None,
    notebooks_dir: Path | None = None, studies_file: Path | None = None, results_root: Path | None = None,
    out: Any = None,
) -> list[RunOutcome]:
    """Validate everything, then execute the batch; bad input raises :class:`StudyError` before any kernel starts."""
    out = out or sys.stdout
    if jobs < 1:
        raise StudyError(f"--jobs {jobs}: need at least 1")
    batch = plan_batch(names, run_all=run_all, profile=profile, params=params, shard_spec=shard_spec,
                       notebooks_dir=notebooks_dir, studies_file=studies_file)
    kernel_name = resolve_kernel(kernel)
    profile_dir = Path(results_root or paths.results_root()).resolve() / profile
    if not batch:
        print(f"nothing to run (shard {shard_spec} of the batch is empty)", file=out)
        return []
    environment = environment_info()
    single = len(batch) == 1
    ipykernel = _is_ipykernel(kernel_name)
    run_jobs = [RunJob(study, profile, parameters, profile_dir, kernel_name, timeout,
                       progress_bar=single and sys.stderr.isatty(), environment=environment, ipykernel=ipykernel)
                for study, parameters in batch]
    stale = clean_stale(profile_dir)
    if stale["removed"]:
        print(f"removed {len(stale['removed'])} temporary folder(s) left by killed runs: {stale['removed'][:3]}",
              file=out)
    print(f"running {len(run_jobs)} notebook(s) under profile {profile!r} with kernel {kernel_name!r} "
          f"-> {profile_dir}", file=out, flush=True)
    done = []

    def report(outcome: RunOutcome) -> None:
        done.append(outcome)
        note = f"  {outcome.error_line()}" if outcome.error else ""
        print(f"[{len(done)}/{len(run_jobs)}] {outcome.stem}: {outcome.status} ({outcome.wall_time_s:.1f} s){note}",
              file=out, flush=True)

    if jobs == 1 or single:
        for job in run_jobs:
            report(execute_study(job))
        outcomes = done
    else:
        outcomes = _run_parallel(run_jobs, min(jobs, len(run_jobs)), report)
    order = {job.study.stem: i for i, job in enumerate(run_jobs)}
    return sorted(outcomes, key=lambda o: order[o.stem])


def format_summary(outcomes: list[RunOutcome]) -> str:
    """The closing table: notebook, status, wall time, error of the failing cell."""
    rows = [("notebook", "status", "wall time", "error")]
    rows += [(o.stem, o.status, f"{o.wall_time_s:.1f} s", o.error_line()) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + ("  " + r[3] if r[3] else "") for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  -----")
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        lines.append(f"{len(failed)} of {len(outcomes)} failed; executed notebooks of failed runs are in "
                     f"{failed[0].folder.parent}/")
    return "\n".join(lines)


# =========================================================================================== report
def _provenance_line(run: dict[str, Any]) -> str:
    git = run.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10]
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    return (f"commit `{commit}`{dirty} · wall time {run.get('wall_time_s', 0):.1f} s · {run.get('start', '?')} · "
            f"{device_line(run.get('device') or {})} · status **{run.get('status')}**")


INLINE_TABLE_ROWS = 60  # longer tables are linked from the results index, not copied into it


def _study_section(study: Study, profile_dir: Path, profile: str) -> list[str]:
    lines = [f"## {study.stem}: {study.title}", "", f"Paper: {study.paper or '-'}", ""]
    folder = profile_dir / study.stem
    run = read_run_json(folder)
    failed = read_run_json(profile_dir / FAILED_DIR / study.stem)
    if run is None:
        lines.append(f"_Not run under this profile yet: `milstudy run {study.stem} --profile {profile}`._")
    else:
        for path in _outputs_in_order(folder):  # figures and tables in the order the notebook saved them
            link = f"{quote(study.stem)}/{quote(path.name)}"
            if path.suffix == ".png":
                lines += [f"![{path.stem}]({link})", ""]
            elif path.with_suffix(".md").is_file():
                table = path.with_suffix(".md").read_text().rstrip()
                rows = table.count("\n") - 1  # a Markdown table: header, rule, one line per row
                if rows <= INLINE_TABLE_ROWS:
                    lines += [f"**{path.stem}** ([CSV]({link}))", "", table, ""]
                else:  # long per-run / per-slide tables stay in their files; the index stays readable
                    with open(path) as handle:
                        rows = sum(1 for _ in handle) - 1  # the CSV has them all (the Markdown copy may not)
                    lines += [f"**{path.stem}** ([CSV]({link}), [Markdown]({link[:-4]}.md)): {rows} rows, "
                              "not shown here", ""]
        lines += [f"Executed notebook: [{run.get('executed_notebook')}]"
                  f"({quote(study.stem)}/{quote(str(run.get('executed_notebook')))})", "",
                  f"Provenance: {_provenance_line(run)}"]
    if failed is not None:
        error = RunOutcome(study.stem, "failed", 0.0, profile_dir, failed.get("error")).error_line()
        lines += ["", f"**Latest run failed** ({failed.get('start')}): `{error}`; executed notebook: "
                      f"[{FAILED_DIR}/{study.stem}]({FAILED_DIR}/{quote(study.stem)}/"
                      f"{quote(str(failed.get('executed_notebook')))})"]
    return lines + [""]


def write_report(profile: str, *, notebooks_dir: Path | None = None, studies_file: Path | None = None,
                 results_root: Path | None = None) -> Path:
    """Regenerate ``results/<profile>/README.md`` (atomic write) from the results folders; returns its path."""
    check_profile(profile)
    studies = load_catalog(notebooks_dir, studies_file)
    profile_dir = Path(results_root or paths.results_root()) / profile
    profile_dir.mkdir(parents=True, exist_ok=True)
    overview = ["| notebook | paper | status | wall time |", "|---|---|---|---|"]
    for study in studies.values():
        run = read_run_json(profile_dir / study.stem)
        failed = read_run_json(profile_dir / FAILED_DIR / study.stem)
        status = (run or {}).get("status", "not run") + (" (latest run failed)" if failed else "")
        wall = f"{run['wall_time_s']:.1f} s" if run else "-"
        overview.append(f"| [{study.stem}]({quote(study.stem)}/) | {study.paper} | {status} | {wall} |")
    lines = [f"# milstudy results: profile `{profile}`", "",
             f"Generated by `milstudy report --profile {profile}` on {now_iso()}. Every figure and table below was "
             "written by the executed notebook linked in its section; `run.json` in each folder holds the full "
             "provenance.", "", *overview, ""]
    for study in studies.values():
        lines += _study_section(study, profile_dir, profile)
    target = profile_dir / "README.md"
    tmp = target.with_name(f".README.md.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, target)
    return target


# ============================================================================================== CLI
