"""``layerlab sweep FILE.yaml``: train a grid of configs and seeds, analyze each final model, compare them.

A sweep file (docs/sweep.md)::

    name: norm-placement          # default: the file's name
    out: sweeps-out/norm-placement  # default: sweeps-out/<name>
    base:                         # preset, config file and any config fields, as for `layerlab train`
      preset: debug
      steps: 200
    grid:                         # field: values; the runs are the cartesian product
      placement: [pre, post, peri]
      norm: [layernorm, rmsnorm]
      optimizer:                  # a mapping sets several fields together; the axis field names it
        - adamw
        - {optimizer: lamb, lr: 1.0e-2}
    seeds: [0, 1]                 # or a count: 2 means [0, 1]
    workers: 1                    # local backend: runs at a time
    analyze: {tokens: 4096, removal_tokens: 1024, spectra: false}   # or false
    ray: {cpus_per_run: 1, gpus_per_run: 0}

Every run's full config is resolved, and every existing run directory checked against it, before anything
trains, so a bad field or value stops the sweep with one line naming the run. Each run trains into
``<out>/runs/<label>-s<seed>`` (``train``'s own resume logic: a finished run is skipped, an interrupted one
continues from its checkpoint), then ``analyze`` measures its final model into ``<run>/analysis/`` (kept, so a
rerun is cheap). A failed run is recorded with its error and the others go on. At the end the sweep writes
``sweep.json``, ``summary.csv`` and the self-contained page ``sweep.html`` into ``<out>``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import socket
import statistics
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import (
    ALL_FIELDS,
    _flatten_yaml,
    check_fields,
    load_yaml,
    read_preset,
    unknown_field_error,
    unknown_name_error,
)
from .errors import LayerlabError, choices_error
from .io import MANIFEST, atomic_write_bytes, atomic_write_json, versions

SWEEP_KEYS = ("name", "out", "base", "grid", "seeds", "workers", "analyze", "ray")
# html: also write each run's own report.html (a few seconds of plotting per run)
ANALYZE_DEFAULTS: dict[str, Any] = {"tokens": 4096, "removal_tokens": 1024, "spectra": False, "seq_len": None,
                                    "html": True}
RAY_DEFAULTS: dict[str, Any] = {"cpus_per_run": 1, "gpus_per_run": 0}
BACKENDS = ("local", "ray")
ANALYSIS_DIR = "analysis"
ANALYSIS_OPTIONS = "sweep-analyze.json"  # the options a cached report.json was measured with
RAY_CONNECT_TIMEOUT = 5.0  # seconds for the TCP probe of a cluster address before ray.init
# Per-layer curves collected from each run: from its analysis report, and from its last telemetry record.
LAYER_METRICS = ("angular_distance", "angular_distance_last_token", "removal_loss_delta")
TELEMETRY_METRICS = ("grad_norm_block",)


@dataclass
class PlannedRun:
    """One run of a sweep: its name, config label, seed, fields and directory, and what is left to do."""

    name: str
    config: str
    seed: int
    fields: dict[str, Any]  # the grid's values for this run (without the seed)
    preset: str | None
    config_file: str | None
    overrides: dict[str, Any]  # base fields + grid fields + seed, as given to train()
    run_dir: Path
    steps: int
    trained: bool = False  # already finished at the asked number of steps
    resumes: bool = False  # holds a checkpoint of an unfinished run (interrupted, failed or extended): continues
    analyzed: bool = False  # its analysis report is cached with the asked options


@dataclass
class Sweep:
    """A parsed, validated and planned sweep file."""

    name: str
    path: Path
    out: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    workers: int
    analyze: dict[str, Any] | None
    ray: dict[str, Any]
    runs: list[PlannedRun] = field(default_factory=list)

    @property
    def configs(self) -> list[str]:
        return list(dict.fromkeys(r.config for r in self.runs))


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


# ------------------------------------------------------------------------------------------------- parsing
def _label(key: str, value: Any) -> str:
    """A short, path-safe name part for one grid value: strings as they are, numbers and flags with their field."""
    if isinstance(value, bool):
        text = key if value else f"no-{key}"
    elif value is None:
        text = f"{key}-none"
    elif isinstance(value, (int, float)):
        text = f"{key}{value:g}"
    elif isinstance(value, list):
        text = "+".join(str(v) for v in value)
    elif "/" in str(value):  # a path (e.g. data): its last part
        text = Path(str(value).rstrip("/")).name or str(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_") or key


def _keyed_label(key: str, value: Any) -> str:
    text = _label(key, value)
    return text if text.startswith(key) or text.startswith(f"no-{key}") else f"{key}-{text}"


def _seeds(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise LayerlabError(f"{source}: seeds must be a positive count or a list of integers, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            raise LayerlabError(f"{source}: seeds repeat a value: {value}")
        return list(value)
    raise LayerlabError(f"{source}: seeds must be a positive count or a non-empty list of integers, got {value!r}")


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LayerlabError(f"{what} must be a positive integer, got {value!r}")
    return value


def _options(value: Any, defaults: dict[str, Any], source: str) -> dict[str, Any]:
    """A mapping of options checked against ``defaults`` (names, and types where the default is not None)."""
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise LayerlabError(f"{source} must be a mapping of option: value, got {value!r}")
    out = dict(defaults)
    for key, v in value.items():
        if key not in defaults:
            raise unknown_name_error("option", key, defaults, source)
        want = type(defaults[key]) if defaults[key] is not None else int
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if v is None and defaults[key] is None:
            ok = True
        if not ok or (want is int and v is not None and v < (0 if key == "gpus_per_run" else 1)):
            raise LayerlabError(f"option {key!r} in {source} expects {want.__name__}"
                                f"{'' if want is bool else ' >= 0' if key == 'gpus_per_run' else ' >= 1'}, got {v!r}")
        out[key] = v
    return out


def _axis_values(key: str, values: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, fields) for each value of one grid axis, every field checked."""
    if not isinstance(values, list) or not values:
        raise LayerlabError(f"{source}: grid field {key!r} needs a non-empty list of values, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, dict):
            if key not in value:
                raise LayerlabError(f"{source}: a mapping in grid field {key!r} must set {key!r} itself "
                                    f"(it names the runs), got {value!r}")
            fields = dict(value)
            if "seed" in fields:
                raise LayerlabError(f"{source}: give seeds with the top-level seeds: key, not in the grid")
        else:
            fields = {key: value}
        preset = fields.pop("preset", None)
        checked = check_fields(fields, from_text=True, source=f"{source} grid", also=("preset",))
        if preset is not None:
            read_preset(str(preset))  # an unknown preset lists the valid ones
            checked["preset"] = str(preset)
        out.append((_label(key, checked[key]), checked))
    seen = [json.dumps(f, sort_keys=True, default=str) for _, f in out]
    if len(set(seen)) != len(seen):
        raise LayerlabError(f"{source}: grid field {key!r} repeats a value: {values!r}")
    labels = [label for label, _ in out]  # {optimizer: lamb, lr: 0.01} next to another lamb: lamb-lr0.01
    return [(label + "".join(f"-{_label(k, v)}" for k, v in f.items() if k != key) if labels.count(label) > 1
             else label, f) for label, f in out]


def load_sweep(path: str | Path, *, out: str | Path | None = None, workers: int | None = None) -> Sweep:
    """Read, validate and plan a sweep file; nothing is written.

    Every run's config is resolved (as ``layerlab train`` would) and every existing run directory is checked
    against it, so any bad field, value or conflicting directory raises a one-line
    :class:`~layerlab.errors.LayerlabError` naming the run before anything trains.
    """
    from .train.loop import plan_run

    path = Path(path)
    doc = load_yaml(path, "sweep file")
    if not isinstance(doc, dict):
        raise LayerlabError(f"sweep file {path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in doc:
        if key not in SWEEP_KEYS:
            raise unknown_name_error("key", key, SWEEP_KEYS, f"sweep file {path}",
                                     hint=" (config fields go under base: or grid:)")
    source = str(path)
    name = str(doc.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
        raise LayerlabError(f"{source}: name {name!r} may hold only letters, digits and . _ + = -")

    base_doc = doc.get("base") or {}
    if not isinstance(base_doc, dict):
        raise LayerlabError(f"{source}: base must be a mapping of field: value")
    base_doc = dict(base_doc)
    preset = base_doc.pop("preset", None)
    config_file = base_doc.pop("config", None)
    if preset is not None:
        preset = str(preset)
        read_preset(preset)
    if config_file is not None:
        config_file = str((path.parent / str(config_file)) if not Path(str(config_file)).is_absolute()
                          else config_file)
    base = check_fields(_flatten_yaml(base_doc, f"{source} base"), from_text=True, source=f"{source} base",
                        also=("preset", "config"))

    grid_doc = doc.get("grid") or {}
    if not isinstance(grid_doc, dict):
        raise LayerlabError(f"{source}: grid must be a mapping of field: [values]")
    if "seed" in grid_doc:
        raise LayerlabError(f"{source}: give seeds with the top-level seeds: key, not in the grid")
    axes: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, values in grid_doc.items():
        key = str(name).replace("-", "_")
        if key != "preset" and key not in ALL_FIELDS:
            raise unknown_field_error(name, f"{source} grid", also=("preset",))
        axes[key] = _axis_values(key, values, source)

    seeds = _seeds(doc.get("seeds"), source)
    if seeds and "seed" in base:
        raise LayerlabError(f"{source}: give either seeds: or base: seed, not both")
    if not seeds:
        seeds = [int(base.get("seed", 0))]
    base.pop("seed", None)

    workers = _positive_int(workers if workers is not None else doc.get("workers", 1), "workers")
    analyze_doc = doc.get("analyze", {})
    analyze = None if analyze_doc is False else _options(None if analyze_doc is True else analyze_doc,
                                                         ANALYZE_DEFAULTS, f"{source} analyze")
    ray = _options(doc.get("ray"), RAY_DEFAULTS, f"{source} ray")
    out_dir = Path(out) if out is not None else Path(str(doc.get("out") or Path("sweeps-out") / name))

    sweep = Sweep(name=name, path=path, out=out_dir, base={**({"preset": preset} if preset else {}), **base},
                  grid={k: [f if len(f) > 1 else next(iter(f.values())) for _, f in v] for k, v in axes.items()},
                  seeds=seeds, workers=workers, analyze=analyze, ray=ray)

    combos = list(itertools.product(*axes.values())) if axes else [()]
    keys = list(axes)
    labels = ["-".join(label for label, _ in combo) or "base" for combo in combos]
    if len(set(labels)) != len(labels):  # e.g. two string fields sharing a value: name each part by its field
        labels = ["-".join(_keyed_label(k, f[k]) for k, (_, f) in zip(keys, combo)) or "base"
                  for combo in combos]
    if len(set(labels)) != len(labels):  # e.g. two data paths with the same file name: number them
        counts: dict[str, int] = {}
        original = list(labels)
        for i, label in enumerate(original):
            if original.count(label) > 1:
                counts[label] = counts.get(label, 0) + 1
                labels[i] = f"{label}-{counts[label]}"
    for label, combo in zip(labels, combos):
        fields: dict[str, Any] = {}
        for _, f in combo:
            fields.update(f)
        run_preset = fields.get("preset", preset)
        for seed in seeds:
            run_name = f"{label}-s{seed}"
            overrides = {**base, **{k: v for k, v in fields.items() if k != "preset"}, "seed": seed}
            run_dir = sweep.out / "runs" / run_name
            try:
                spec, _, continuing = plan_run(run_preset, config_file, overrides, run_dir, None)
            except LayerlabError as e:
                raise LayerlabError(f"{source}: run {run_name}: {e}") from None
            run = PlannedRun(name=run_name, config=label, seed=seed, fields=fields, preset=run_preset,
                             config_file=config_file, overrides=overrides, run_dir=run_dir, steps=spec.train.steps)
            run.trained = continuing and _finished(run_dir, spec.train.steps)
            run.resumes = continuing and not run.trained and (run_dir / "trainer_state.json").is_file()
            run.analyzed = run.trained and (analyze is None or _analysis_cached(run_dir, analyze))
            sweep.runs.append(run)
    return sweep


def _finished(run_dir: Path, steps: int) -> bool:
    """A run whose manifest says finished and whose checkpoint is at (or past) ``steps``: train() would do nothing."""
    from .train.checkpoint import read_state

    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        state = read_state(run_dir)
    except (OSError, ValueError, LayerlabError):
        return False
    return manifest.get("status") == "finished" and state is not None and int(state.get("step", -1)) >= steps


def _analysis_cached(run_dir: Path, options: dict[str, Any]) -> bool:
    """The run's report.json exists, was measured with ``options``, and is newer than the model's weights."""
    report, opts, weights = (run_dir / ANALYSIS_DIR / "report.json", run_dir / ANALYSIS_DIR / ANALYSIS_OPTIONS,
                             run_dir / "model.safetensors")
    try:
        return (json.loads(opts.read_text()) == options and report.stat().st_mtime >= weights.stat().st_mtime)
    except (OSError, ValueError):
        return False


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
            from .train import train

            t0 = time.perf_counter()
            train(preset=task.get("preset"), config=task.get("config_file"), overrides=dict(task["overrides"]),
                  out=run_dir, progress=bool(task.get("progress")), echo=echo)
            record.update(trained=True, train_seconds=time.perf_counter() - t0)
        if task.get("analyze") is not None and not _analysis_cached(run_dir, task["analyze"]):
            stage = "analyze"
            import warnings

            from .analysis import analyze

            opts = task["analyze"]
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = analyze(run_dir, tokens=opts["tokens"], removal_tokens=opts["removal_tokens"],
                                 spectra=opts["spectra"], seq_len=opts["seq_len"], progress=False)
            if opts["html"]:
                report.save(run_dir / ANALYSIS_DIR)
            else:
                atomic_write_bytes(run_dir / ANALYSIS_DIR / "report.json", (report.to_json() + "\n").encode())
            atomic_write_json(run_dir / ANALYSIS_DIR / ANALYSIS_OPTIONS, opts)
            record.update(analyzed=True, analyze_seconds=time.perf_counter() - t0)
    except Exception as e:  # a failed run is recorded; the sweep goes on
        first = (str(e).strip().splitlines() or [""])[0]
        message = first if isinstance(e, LayerlabError) else f"{type(e).__name__}: {first}"
        record.update(status="failed", stage=stage, error=message, traceback=traceback.format_exc(limit=20))
    return record


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _run_local(tasks: list[dict[str, Any]], workers: int, report) -> None:
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


def _run_ray(ray, tasks: list[dict[str, Any]], options: dict[str, Any], local: bool, report) -> None:
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


# ---------------------------------------------------------------------------------------------- collecting
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _run_data(run: PlannedRun, out: Path) -> dict[str, Any]:
    """Curves, final losses and per-layer values of one run, read from its directory."""
    d: dict[str, Any] = {}
    rows = _read_jsonl(run.run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    d["curve"] = {"step": [r["step"] for r in train_rows], "loss": [_finite(r["loss"]) for r in train_rows]}
    d["val_curve"] = {"step": [r["step"] for r in val_rows], "val_loss": [_finite(r["val_loss"]) for r in val_rows]}
    layers: dict[str, list[float | None]] = {}
    telemetry = [r for r in rows if TELEMETRY_METRICS[0] in r]
    if telemetry:
        layers["grad_norm_block"] = [_finite(v) for v in telemetry[-1]["grad_norm_block"]]
        d["telemetry_step"] = telemetry[-1]["step"]
    try:
        manifest = json.loads((run.run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    results = manifest.get("results") or {}
    d.update(val_loss=_finite(results.get("val_loss")), val_bpb=_finite(results.get("val_bpb")),
             val_loss_step0=_finite(results.get("val_loss_step0")), step=results.get("step"),
             params=manifest.get("params"), manifest_status=manifest.get("status"))
    report_path = run.run_dir / ANALYSIS_DIR / "report.json"
    if report_path.is_file():
        try:
            model = json.loads(report_path.read_text())["models"][0]
        except (OSError, ValueError, KeyError, IndexError):
            model = None
        if model:
            for key in LAYER_METRICS:
                layers[key] = [_finite(lay.get(key)) for lay in model.get("layers", [])]
            d["analysis_loss"] = _finite(model.get("loss"))
            if (run.run_dir / ANALYSIS_DIR / "report.html").is_file():
                d["report"] = os.path.relpath(run.run_dir / ANALYSIS_DIR / "report.html", out)
    d["layers"] = layers
    return d


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def _band(curves: list[list[float | None]]) -> dict[str, list[float | None]] | None:
    """Mean, min and max per layer over seeds (curves of equal length; missing values skipped)."""
    curves = [c for c in curves if c]
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    out: dict[str, list[float | None]] = {"mean": [], "min": [], "max": []}
    for values in zip(*curves):
        vals = [v for v in values if v is not None]
        out["mean"].append(statistics.fmean(vals) if vals else None)
        out["min"].append(min(vals) if vals else None)
        out["max"].append(max(vals) if vals else None)
    return out


def collect(sweep: Sweep, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sweep's summary (written as sweep.json): one entry per run and one per config."""
    runs = []
    for run in sweep.runs:
        rec = records.get(run.name, {})
        entry = {"name": run.name, "config": run.config, "seed": run.seed, "fields": run.fields,
                 "dir": os.path.relpath(run.run_dir, sweep.out), **{k: rec.get(k) for k in (
                     "status", "action", "stage", "error", "traceback", "seconds", "train_seconds",
                     "analyze_seconds")}}
        entry.update(_run_data(run, sweep.out))
        runs.append(entry)
    configs = []
    for label in sweep.configs:
        members = [r for r in runs if r["config"] == label]
        ok = [r for r in members if r["status"] == "finished"]
        layer_keys = list(dict.fromkeys(k for r in ok for k in r["layers"]))
        seconds = [r["seconds"] for r in ok if r.get("seconds")]
        configs.append({
            "name": label, "fields": members[0]["fields"], "seeds": [r["seed"] for r in members],
            "finished": len(ok), "failed": [r["name"] for r in members if r["status"] == "failed"],
            "val_loss": _stats([r["val_loss"] for r in ok if r["val_loss"] is not None]),
            "val_bpb": _stats([r["val_bpb"] for r in ok if r["val_bpb"] is not None]),
            "params": next((r["params"] for r in ok if r.get("params")), None),
            "seconds_per_run": statistics.fmean(seconds) if seconds else None,
            "layers": {k: b for k in layer_keys if (b := _band([r["layers"].get(k) for r in ok])) is not None},
        })
    return {
        "format": "layerlab-sweep/1", "name": sweep.name, "file": str(sweep.path), "out": str(sweep.out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
        "base": sweep.base, "grid": sweep.grid, "seeds": sweep.seeds, "analyze": sweep.analyze,
        "runs": runs, "configs": configs, "failed": [r["name"] for r in runs if r["status"] == "failed"],
    }


def _fmt(x: Any, digits: int = 4, missing: str = "–") -> str:
    return missing if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _value_text(v: Any, none: str) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else none if v is None else str(v)


def table_rows(summary: dict[str, Any], *, for_csv: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-config table: printed, and with ``for_csv`` as summary.csv.

    In the CSV a missing value (a grid value None, the std of one seed, anything of a config whose runs all
    failed) is an empty field: CSV readers such as pandas take that for NaN, where a dash would turn the whole
    column into text. The printed table keeps a readable dash.
    """
    missing, none = ("", "") if for_csv else ("–", "None")
    fields = list(summary["grid"])
    header = ["config", *fields, "runs", "val_loss_mean", "val_loss_std", "val_loss_min", "val_loss_max",
              "val_bpb_mean", "params", "seconds_per_run"]
    rows = []
    for c in summary["configs"]:
        vl, vb = c["val_loss"], c["val_bpb"]
        measured = (vl["mean"], vl["std"], vl["min"], vl["max"], vb["mean"], c["params"])
        rows.append([c["name"], *(_value_text(c["fields"].get(f), none) for f in fields),
                     f"{c['finished']}/{len(c['seeds'])}", *(_fmt(x, missing=missing) for x in measured),
                     _fmt(c["seconds_per_run"], 1, missing)])
    return header, rows


def markdown_table(summary: dict[str, Any]) -> str:
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(sweep: Sweep, summary: dict[str, Any]) -> None:
    """sweep.json, summary.csv and sweep.html into the sweep's out directory, each atomically."""
    from .report.sweep import write_sweep_html

    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.out / "sweep.json", summary)
    header, rows = table_rows(summary, for_csv=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(sweep.out / "summary.csv", buf.getvalue().encode())
    write_sweep_html(summary, sweep.out / "sweep.html")


# ------------------------------------------------------------------------------------------------ the sweep
def sweep(path: str | Path, *, out: str | Path | None = None, workers: int | None = None, backend: str = "local",
          address: str | None = None, dry_run: bool = False, progress: bool = True, echo=print) -> SweepResult:
    """Run a sweep file: train every (config, seed) not yet finished, analyze each final model, and write
    ``sweep.json``, ``summary.csv`` and ``sweep.html`` into its out directory.

    ``backend`` is ``local`` (one run after another, or ``workers`` at a time in a process pool) or ``ray``
    (``address`` of a running cluster; none starts a local one). Bad input raises
    :class:`~layerlab.errors.LayerlabError` before any run starts; a failed run is recorded in the result
    (``result.failed``) and in sweep.json, and the other runs go on.
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
            state = "done" if r.trained and r.analyzed else "analyze" if r.trained else "resume" if r.resumes \
                else "train"
            echo(f"  {r.name:<40} {state:<8} {r.run_dir}")
        return SweepResult(plan, [])

    if backend == "ray":  # an unreachable cluster fails before any run
        address = check_ray(address)
    ray = connect_ray(address) if backend == "ray" and todo else None
    previous = _previous_records(plan.out)
    records: dict[str, dict[str, Any]] = {}
    for r in plan.runs:
        if r.trained and r.analyzed:
            old = previous.get(r.name, {})
            records[r.name] = {"name": r.name, "status": "finished", "action": "skipped",
                               **{k: old.get(k) for k in ("seconds", "train_seconds", "analyze_seconds")}}
    tasks = [{"name": r.name, "preset": r.preset, "config_file": r.config_file, "overrides": r.overrides,
              "run_dir": str(r.run_dir.resolve()), "train": not r.trained, "analyze": plan.analyze,
              "verbose": backend == "local" and plan.workers == 1,
              "progress": progress and backend == "local" and plan.workers == 1} for r in todo]
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
                + (f", validation loss {vl:.4f}" if (vl := _final_val_loss(Path(task["run_dir"]))) is not None else ""))
        echo(f"[{done[0]}/{len(tasks)}] {task['name']}: {what}")
        _write_progress(plan, records)

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
    echo("")
    echo(markdown_table(summary))
    echo("")
    if result.failed:
        echo(f"{len(result.failed)} of {len(plan.runs)} runs failed:")
        for r in summary["runs"]:
            if r["status"] == "failed":
                echo(f"  {r['name']}: {r['error']}")
    echo(f"wrote {plan.out / 'sweep.json'}, {plan.out / 'summary.csv'} and {plan.out / 'sweep.html'}")
    return result


def _final_val_loss(run_dir: Path) -> float | None:
    try:
        return _finite((json.loads((run_dir / MANIFEST).read_text()).get("results") or {}).get("val_loss"))
    except (OSError, ValueError):
        return None


def _previous_records(out: Path) -> dict[str, dict[str, Any]]:
    """Timings of the runs recorded by an earlier invocation (kept for runs now skipped)."""
    try:
        return {r["name"]: r for r in json.loads((out / "sweep.json").read_text()).get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_progress(plan: Sweep, records: dict[str, dict[str, Any]]) -> None:
    """sweep.json after each run: which runs are done, so an interrupted sweep leaves a record."""
    runs = []
    for r in plan.runs:
        rec = records.get(r.name) or {"status": "pending"}
        runs.append({"name": r.name, "config": r.config, "seed": r.seed, "fields": r.fields,
                     "dir": os.path.relpath(r.run_dir, plan.out),
                     **{k: rec.get(k) for k in ("status", "action", "stage", "error", "seconds", "train_seconds",
                                                "analyze_seconds")}})
    atomic_write_json(plan.out / "sweep.json", {"format": "layerlab-sweep/1", "name": plan.name, "partial": True,
                                                "runs": runs})
