"""Run a planned sweep: each run trained and analyzed by :func:`run_one`, one after another, in a process pool, or
as Ray tasks; then its outputs collected and written."""

from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LayerlabError, choices_error
from ..io import atomic_write_json
from .collect import collect, final_val_loss, previous_records
from .plan import ANALYSIS_DIR, ANALYSIS_OPTIONS, PlannedRun, Sweep, analysis_cached, load_sweep
from .write import markdown_table, write_outputs, write_progress

BACKENDS = ("local", "ray")
RAY_CONNECT_TIMEOUT = 5.0  # seconds for the TCP probe of a cluster address before ray.init

Report = Callable[[dict[str, Any], dict[str, Any]], None]  # called with (task, record) as each run ends


@dataclass
class SweepResult:
    """What :func:`sweep` did: the planned sweep, one record per run, and where the outputs are."""

    sweep: Sweep
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None = None

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.records if r.get("status") == "failed"]

    @property
    def out(self) -> Path:
        return self.sweep.out


# ----------------------------------------------------------------------------------------------- execution
def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train (unless finished) and analyze (unless cached) one run; never raises for a failed run.

    ``task`` is a plain dict so that it crosses process and Ray boundaries: ``name``, ``preset``,
    ``config_file``, ``overrides``, ``run_dir``, ``train`` (bool), ``analyze`` (options or None),
    and optionally ``threads``, ``env`` and ``verbose``. Returns a record with ``status``
    (``finished`` | ``failed``), ``stage``, ``error``, ``traceback`` and timings.
    """
    for key, value in (task.get("env") or {}).items():
        os.environ[key] = value
    if task.get("threads"):
        import torch

        torch.set_num_threads(int(task["threads"]))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run_dir = Path(task["run_dir"])
    name = task["name"]
    record: dict[str, Any] = {"name": name, "status": "finished", "stage": None, "error": None, "traceback": None,
                              "trained": False, "analyzed": False, "train_seconds": None, "analyze_seconds": None}
    verbose = task.get("verbose", False)

    def echo(*args: Any) -> None:
        if verbose:
            print(f"[{name}]", *args, flush=True)

    stage = "train"
    try:
        if task.get("train", True):
            # imported here, after the threads and environment above are set (a worker imports this module first)
            from ..train import train

            t0 = time.perf_counter()
            train(preset=task.get("preset"), config=task.get("config_file"), overrides=dict(task["overrides"]),
                  out=run_dir, progress=bool(task.get("progress")), echo=echo)
            record.update(trained=True, train_seconds=time.perf_counter() - t0)
        if task.get("analyze") is not None and not analysis_cached(run_dir, task["analyze"]):
            stage = "analyze"
            record.update(analyzed=True, analyze_seconds=_analyze(run_dir, task["analyze"]))
    except Exception as e:  # a failed run is recorded; the sweep goes on
        first = (str(e).strip().splitlines() or [""])[0]
        message = first if isinstance(e, LayerlabError) else f"{type(e).__name__}: {first}"
        record.update(status="failed", stage=stage, error=message, traceback=traceback.format_exc(limit=20))
    return record


def _analyze(run_dir: Path, opts: dict[str, Any]) -> float:
    """Measure the run's final model into ``<run>/analysis/`` with the sweep's options; returns the seconds."""
    from ..analysis import analyze  # imported here, as train in run_one

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = analyze(run_dir, tokens=opts["tokens"], removal_tokens=opts["removal_tokens"],
                         spectra=opts["spectra"], seq_len=opts["seq_len"], progress=False)
    if opts["html"]:
        from ..report import write_report  # imported here, as analyze above

        write_report(report, run_dir / ANALYSIS_DIR)
    else:
        report.save_json(run_dir / ANALYSIS_DIR / "report.json")
    atomic_write_json(run_dir / ANALYSIS_DIR / ANALYSIS_OPTIONS, opts)
    return time.perf_counter() - t0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _run_local(tasks: list[dict[str, Any]], workers: int, report: Report) -> None:
    """Run tasks one after another, or ``workers`` at a time in spawned processes of cores/workers threads each."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            report(task, run_one(task))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, _cores() // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_one, {**task, "threads": threads}): task for task in tasks}
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                record = fut.result()
            except Exception as e:  # a worker process that died (e.g. killed for memory)
                record = {"name": task["name"], "status": "failed", "stage": "worker",
                          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
            report(task, record)


# ----------------------------------------------------------------------------------------------------- Ray
def _probe(address: str) -> None:
    """A TCP connection to ``host:port`` of a Ray address, so that an unreachable cluster fails in seconds
    (ray.init itself retries for minutes)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise LayerlabError(f"Ray address {address!r} must be host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise LayerlabError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def check_ray(address: str | None) -> str | None:
    """Ray is installed and ``address`` (or $RAY_ADDRESS) answers, else a one-line error; returns the address."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise LayerlabError("--backend ray needs Ray: pip install 'layerlab[sweep]' (or pip install ray)") from None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _probe(address)
    return address


def connect_ray(address: str | None) -> Any:
    """``ray.init`` on ``address`` (none: start a local cluster), or a one-line error; returns the ray module."""
    import ray

    address = check_ray(address)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address in (None, "local"):
        kwargs.update(include_dashboard=False)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayerlabError(f"cannot connect to Ray{f' at {address}' if address else ''}: {first}") from None
    return ray


def _run_ray(ray, tasks: list[dict[str, Any]], options: dict[str, Any], local: bool, report: Report) -> None:
    """Submit every task to the connected Ray cluster; report each as it completes."""
    remote = ray.remote(num_cpus=options["cpus_per_run"], num_gpus=options["gpus_per_run"], max_retries=0)(run_one)
    env = {}
    if local:  # a cluster this process started shares its machine: keep the same caches and thread policy
        env = {k: os.environ[k] for k in ("LAYERLAB_CACHE", "OMP_WAIT_POLICY", "HF_HOME") if k in os.environ}
    pending = {remote.remote({**task, "threads": options["cpus_per_run"], "env": env}): task for task in tasks}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(done[0])
        try:
            record = ray.get(done[0])
        except Exception as e:  # the worker died, or the task could not be scheduled
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            record = {"name": task["name"], "status": "failed", "stage": "ray", "error": f"{type(e).__name__}: {first}",
                      "traceback": str(e)[-4000:]}
        report(task, record)


# ------------------------------------------------------------------------------------------------ the sweep
def sweep(path: str | Path, *, out: str | Path | None = None, workers: int | None = None, backend: str = "local",
          address: str | None = None, dry_run: bool = False, progress: bool = True, echo=print) -> SweepResult:
    """Run a sweep file: train every (config, seed) not yet finished, analyze each final model, and write
    ``sweep.json``, ``summary.csv`` and ``sweep.html`` into its out directory.

    ``backend`` is ``local`` (one run after another, or ``workers`` at a time in a process pool) or ``ray``
    (``address`` of a running cluster; none starts a local one). Bad input raises
    :class:`~layerlab.errors.LayerlabError` before any run starts; a failed run is recorded in the result
    (``result.failed``) and in sweep.json, and the other runs go on. Progress goes to ``echo``, one line a call.
    """
    if backend not in BACKENDS:
        raise choices_error("backend", backend, BACKENDS)
    if address is not None and backend != "ray":
        raise LayerlabError("--address is for --backend ray")
    plan = load_sweep(path, out=out, workers=workers)
    todo = [r for r in plan.runs if not (r.trained and r.analyzed)]
    n_cfg = len(plan.configs)
    echo(f"sweep {plan.name}: {len(plan.runs)} runs ({n_cfg} config{'s' * (n_cfg != 1)} x {len(plan.seeds)} "
         f"seed{'s' * (len(plan.seeds) != 1)}), {sum(r.trained for r in plan.runs)} already trained, "
         f"{len(todo)} to do -> {plan.out}")
    if dry_run:
        for r in plan.runs:
            echo(f"  {r.name:<40} {_state(r):<8} {r.run_dir}")
        return SweepResult(plan, [])

    if backend == "ray":  # an unreachable cluster fails before any run
        address = check_ray(address)
    ray = connect_ray(address) if backend == "ray" and todo else None
    previous = previous_records(plan.out)
    records = _skipped_records(plan, previous)
    tasks = [{"name": r.name, "preset": r.preset, "config_file": r.config_file, "overrides": r.overrides,
              "run_dir": str(r.run_dir.resolve()), "train": not r.trained, "analyze": plan.analyze,
              "verbose": backend == "local" and plan.workers == 1,
              "progress": progress and backend == "local" and plan.workers == 1} for r in todo]
    report = _reporter(plan, len(tasks), previous, records, echo)
    try:
        if ray is not None:
            try:
                _run_ray(ray, tasks, plan.ray, local=address in (None, "local"), report=report)
            finally:
                ray.shutdown()
        else:
            _run_local(tasks, plan.workers, report)
    finally:  # also on Ctrl-C: what finished stays recorded
        summary = collect(plan, records)
        write_outputs(plan, summary)
    result = SweepResult(plan, [records.get(r.name, {"name": r.name, "status": "failed"}) for r in plan.runs],
                         summary)
    for line in _closing_lines(result, summary):
        echo(line)
    return result


def _state(run: PlannedRun) -> str:
    """What a dry run says is left of ``run``."""
    return "done" if run.trained and run.analyzed else "analyze" if run.trained else "resume" if run.resumes \
        else "train"


def _skipped_records(plan: Sweep, previous: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records of the runs already trained and analyzed, with the timings an earlier invocation recorded."""
    records: dict[str, dict[str, Any]] = {}
    for r in plan.runs:
        if r.trained and r.analyzed:
            old = previous.get(r.name, {})
            records[r.name] = {"name": r.name, "status": "finished", "action": "skipped",
                               **{k: old.get(k) for k in ("seconds", "train_seconds", "analyze_seconds")}}
    return records


def _reporter(plan: Sweep, total: int, previous: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]],
              echo: Callable[[str], Any]) -> Report:
    """The callback the backends call as each run ends: records it, echoes one line, rewrites sweep.json."""
    done = [0]

    def report(task: dict[str, Any], record: dict[str, Any]) -> None:
        done[0] += 1
        old = previous.get(task["name"], {})
        record["action"] = "trained" if task["train"] else "analyzed"
        record["seconds"] = ((record.get("train_seconds") or old.get("train_seconds") or 0)
                             + (record.get("analyze_seconds") or old.get("analyze_seconds") or 0)) or None
        if not task["train"]:
            record["train_seconds"] = old.get("train_seconds")
        records[task["name"]] = record
        what = (f"FAILED ({record['stage']}): {record['error']}" if record["status"] == "failed"
                else f"{record['action']} in {record['seconds'] or 0:.1f} s"
                + (f", validation loss {vl:.4f}" if (vl := final_val_loss(Path(task["run_dir"]))) is not None else ""))
        echo(f"[{done[0]}/{total}] {task['name']}: {what}")
        write_progress(plan, records)

    return report


def _closing_lines(result: SweepResult, summary: dict[str, Any]) -> list[str]:
    """What the sweep echoes at the end: the table, the failed runs and where the outputs are."""
    plan = result.sweep
    lines = ["", markdown_table(summary), ""]
    if result.failed:
        lines.append(f"{len(result.failed)} of {len(plan.runs)} runs failed:")
        lines += [f"  {r['name']}: {r['error']}" for r in summary["runs"] if r["status"] == "failed"]
    lines.append(f"wrote {plan.out / 'sweep.json'}, {plan.out / 'summary.csv'} and {plan.out / 'sweep.html'}")
    return lines
