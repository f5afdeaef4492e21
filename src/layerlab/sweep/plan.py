"""Read and validate a sweep file, and expand its grid x seeds into planned runs; nothing is written."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ALL_FIELDS, check_fields, field_key, unknown_field_error, unknown_name_error
from ..errors import LayerlabError
from ..io import MANIFEST
from ..recipe import flatten_yaml, load_yaml, read_preset

SWEEP_KEYS = ("name", "out", "base", "grid", "seeds", "workers", "analyze", "ray")
# html: also write each run's own report.html (a few seconds of plotting per run)
ANALYZE_DEFAULTS: dict[str, Any] = {"tokens": 4096, "removal_tokens": 1024, "spectra": False, "seq_len": None,
                                    "html": True}
RAY_DEFAULTS: dict[str, Any] = {"cpus_per_run": 1, "gpus_per_run": 0}
ANALYSIS_DIR = "analysis"
ANALYSIS_OPTIONS = "sweep-analyze.json"  # the options a cached report.json was measured with

GridAxes = dict[str, list[tuple[str, dict[str, Any]]]]  # grid field -> (label, fields) per value


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


# ------------------------------------------------------------------------------------------------- parsing
def value_label(key: str, value: Any) -> str:
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
    text = value_label(key, value)
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
        out.append((value_label(key, checked[key]), checked))
    seen = [json.dumps(f, sort_keys=True, default=str) for _, f in out]
    if len(set(seen)) != len(seen):
        raise LayerlabError(f"{source}: grid field {key!r} repeats a value: {values!r}")
    labels = [label for label, _ in out]  # {optimizer: lamb, lr: 0.01} next to another lamb: lamb-lr0.01
    return [(label + "".join(f"-{value_label(k, v)}" for k, v in f.items() if k != key) if labels.count(label) > 1
             else label, f) for label, f in out]


def _read_doc(path: Path) -> dict[str, Any]:
    """The sweep file's mapping, every top-level key known."""
    doc = load_yaml(path, "sweep file")
    if not isinstance(doc, dict):
        raise LayerlabError(f"sweep file {path} must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in doc:
        if key not in SWEEP_KEYS:
            raise unknown_name_error("key", key, SWEEP_KEYS, f"sweep file {path}",
                                     hint=" (config fields go under base: or grid:)")
    return doc


def _read_base(doc: dict[str, Any], path: Path, source: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """The base's preset, config file (relative to the sweep file) and checked fields."""
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
    base = check_fields(flatten_yaml(base_doc, f"{source} base"), from_text=True, source=f"{source} base",
                        also=("preset", "config"))
    return preset, config_file, base


def _read_grid(doc: dict[str, Any], source: str) -> GridAxes:
    """Each grid field with the (label, fields) of its values, every field checked."""
    grid_doc = doc.get("grid") or {}
    if not isinstance(grid_doc, dict):
        raise LayerlabError(f"{source}: grid must be a mapping of field: [values]")
    if "seed" in grid_doc:
        raise LayerlabError(f"{source}: give seeds with the top-level seeds: key, not in the grid")
    axes: GridAxes = {}
    for field_name, values in grid_doc.items():
        key = field_key(field_name)
        if key != "preset" and key not in ALL_FIELDS:
            raise unknown_field_error(field_name, f"{source} grid", also=("preset",))
        axes[key] = _axis_values(key, values, source)
    return axes


def _combinations(axes: GridAxes) -> list[tuple[str, tuple[tuple[str, dict[str, Any]], ...]]]:
    """(config label, combination of axis values) for every point of the grid, the labels unique."""
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
    return list(zip(labels, combos))


def load_sweep(path: str | Path, *, out: str | Path | None = None, workers: int | None = None) -> Sweep:
    """Read, validate and plan a sweep file; nothing is written.

    Every run's config is resolved (as ``layerlab train`` would) and every existing run directory is checked
    against it, so any bad field, value or conflicting directory raises a one-line
    :class:`~layerlab.errors.LayerlabError` naming the run before anything trains.
    """
    path = Path(path)
    doc = _read_doc(path)
    source = str(path)
    name = str(doc.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
        raise LayerlabError(f"{source}: name {name!r} may hold only letters, digits and . _ + = -")
    preset, config_file, base = _read_base(doc, path, source)
    axes = _read_grid(doc, source)

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
    sweep.runs = _plan_runs(sweep, axes, preset, config_file, base, source)
    return sweep


def _plan_runs(sweep: Sweep, axes: GridAxes, preset: str | None, config_file: str | None, base: dict[str, Any],
               source: str) -> list[PlannedRun]:
    """Every (config, seed) of the grid, its config resolved and its directory checked as train() would."""
    # imported here: train loads torch, and a pool or Ray worker imports this package before run_one sets
    # its threads and environment
    from ..train.loop import plan_run

    runs = []
    for label, combo in _combinations(axes):
        fields: dict[str, Any] = {}
        for _, f in combo:
            fields.update(f)
        run_preset = fields.get("preset", preset)
        for seed in sweep.seeds:
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
            run.analyzed = run.trained and (sweep.analyze is None or analysis_cached(run_dir, sweep.analyze))
            runs.append(run)
    return runs


def _finished(run_dir: Path, steps: int) -> bool:
    """A run whose manifest says finished and whose checkpoint is at (or past) ``steps``: train() would do nothing."""
    from ..train.checkpoint import read_state  # imported here: see _plan_runs

    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        state = read_state(run_dir)
    except (OSError, ValueError, LayerlabError):
        return False
    return manifest.get("status") == "finished" and state is not None and int(state.get("step", -1)) >= steps


def analysis_cached(run_dir: Path, options: dict[str, Any]) -> bool:
    """The run's report.json exists, was measured with ``options``, and is newer than the model's weights."""
    report, opts, weights = (run_dir / ANALYSIS_DIR / "report.json", run_dir / ANALYSIS_DIR / ANALYSIS_OPTIONS,
                             run_dir / "model.safetensors")
    try:
        return (json.loads(opts.read_text()) == options and report.stat().st_mtime >= weights.stat().st_mtime)
    except (OSError, ValueError):
        return False
