"""Layer trajectories over a training run: every saved checkpoint analyzed, each per-block metric as a function of
the training step (``layerlab analyze RUN --trajectory``; the record is ``trajectory.json``, see
docs/report-format.md, and :mod:`layerlab.report.trajectory` draws it as block × step heatmaps).

The checkpoints are the model directories ``RUN/steps/step<N>/`` (what ``layerlab train --keep-every K`` keeps)
or, failing those, ``RUN/step<N>/`` (a folder of Hugging Face checkpoints named as Pythia's revisions are,
``step1000/``, ``step2000/``), each holding a config.json; they are ordered by the number N, not by name.

Each checkpoint gets the ordinary analysis (:func:`layerlab.analysis.analyze.analyze`, the same pass, sample
sizes and report entry as ``layerlab analyze`` on that directory alone), one at a time: a checkpoint's model is
loaded, measured, reduced to its report entry and released (and collected) before the next one loads, so
memory stays flat however many checkpoints a run holds.

Following the per-layer training dynamics of Martinez et al., 2024 ("Tending Towards Stability: Convergence
Challenges in Small Language Models"), who track each Pythia layer's activations and the effective rank of its
parameters across the released checkpoints, and the Pythia suite's step-indexed checkpoints (Biderman et al.,
2023), which this layout mirrors.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ..defaults import ANALYZE_TOKENS, REMOVAL_TOKENS
from ..errors import LayerlabError
from ..io import progress_bar, versions

FORMAT = "layerlab-trajectory/1"
STEP_NAME = re.compile(r"step(\d+)")  # step1000 (Pythia's revisions), step0001000 (layerlab train --keep-every)

# Per-step fields of a report entry that trajectory.json carries beside the per-block metrics.
STEP_FIELDS = ("name", "path", "num_layers", "loss", "data_slice")


def find_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint of ``run``, by step: ``RUN/steps/step<N>/`` where there are any,
    else ``RUN/step<N>/``; a directory counts when it holds a config.json. A one-line error when none is found
    (naming where it looked) or when two directories name the same step (step1000 and step0001000)."""
    run = Path(run)
    if not run.exists():
        raise LayerlabError(f"run directory does not exist: {run}")
    if not run.is_dir():
        raise LayerlabError(f"{run} is not a directory; --trajectory reads a run directory of step<N>/ checkpoints")
    places = [run / "steps", run]
    for where in places:
        found: dict[int, Path] = {}
        for d in sorted(where.iterdir()) if where.is_dir() else []:
            m = STEP_NAME.fullmatch(d.name)
            if m is None or not d.is_dir() or not (d / "config.json").is_file():
                continue
            step = int(m.group(1))
            if step in found:
                raise LayerlabError(f"{found[step].name} and {d.name} in {where} are both step {step}; keep one")
            found[step] = d
        if found:
            return sorted(found.items())
    raise LayerlabError(f"no checkpoints found: looked for step<N>/ directories holding a config.json in "
                        f"{places[0]} and in {places[1]}")


def trajectory(run: str | Path, *, data: str | Path | None = None, tokens: int = ANALYZE_TOKENS,
               spectra: bool = True, seq_len: int | None = None, batch_size: int = 8,
               removal_tokens: int = REMOVAL_TOKENS, progress: bool = True, dtype: str = "auto",
               offload: bool | None = None, max_memory: str | int | None = None,
               announce: Callable[[str], None] | None = None) -> dict:
    """Analyze every checkpoint of ``run`` (:func:`find_checkpoints`) and return the trajectory record: per step,
    the report entry's summary fields, and per metric a step × block table (format: docs/report-format.md,
    "trajectory.json"). The keyword arguments are :func:`~layerlab.analysis.analyze.analyze`'s and apply to
    every checkpoint; ``announce`` hears once how the checkpoints are read (the first one's load mode)."""
    from .analyze import analyze

    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    checkpoints = find_checkpoints(run)
    if announce is not None:
        announce(f"{run}: {len(checkpoints)} checkpoints, steps {checkpoints[0][0]}..{checkpoints[-1][0]}")
    steps: list[dict] = []
    values: dict[str, list[list]] = {}
    provenance: dict = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("trajectory", total=len(checkpoints))
        for n, (step, path) in enumerate(checkpoints):
            bar.update(task, description=f"trajectory: step {step}")
            # the inner bars stay off (one live display at a time); the first checkpoint says how it loads
            report = analyze(path, data=data, tokens=tokens, spectra=spectra, seq_len=seq_len, batch_size=batch_size,
                             removal_tokens=removal_tokens, progress=False, dtype=dtype, offload=offload,
                             max_memory=max_memory, announce=announce if n == 0 else None)
            entry = report.models[0]
            provenance = provenance or report.data["provenance"]
            steps.append({"step": step, **{k: entry.get(k) for k in STEP_FIELDS},
                          "best_block_to_prune": (entry.get("best_block_to_prune") or {}).get("1", {}).get("start")})
            _add_step(values, entry["layers"], n)
            del report, entry
            gc.collect()  # the model is unreachable now; a cycle inside it must not outlive this step
            bar.advance(task)
    return {
        "format": FORMAT, "run": str(run), "steps": steps, "metrics": values,
        "provenance": {**provenance, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "versions": versions()},
    }


def _scalar(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _add_step(values: dict[str, list[list]], layers: list[dict], n: int) -> None:
    """Append checkpoint ``n``'s row (one value per block) to every per-layer metric whose values are numbers (or
    null): the block-index and placement fields and dict-valued metrics (``max_abs``) aside. A metric that
    appears only from some checkpoint on gets null rows before it."""
    keys = [k for k in (layers[0] if layers else {}) if k not in ("index", "placement")]
    for key in keys:
        row = [layer.get(key) for layer in layers]
        if not all(_scalar(v) for v in row):
            continue
        values.setdefault(key, [[None] * len(layers) for _ in range(n)]).append(row)
    for key, rows in values.items():  # a metric this checkpoint lacks
        if len(rows) == n:
            rows.append([None] * len(layers))


def metric_table(traj: dict, key: str) -> list[list]:
    """``key``'s values as a block × step table (row b: block b at every step, null where a checkpoint has no
    block b): the layout the heatmaps draw."""
    rows = traj["metrics"].get(key) or []
    depth = max((len(r) for r in rows), default=0)
    return [[r[b] if b < len(r) else None for r in rows] for b in range(depth)]
