"""The report record returned by :func:`layerlab.analyze`: written as report.json here, as report.html by
:func:`layerlab.report.write_report`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes


def _clean(x: Any) -> Any:
    """NaN and Inf become null so that report.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Report:
    """Per-layer measurements of one or more models (format: docs/report-format.md)."""

    def __init__(self, data: dict, artifacts: dict[str, dict] | None = None):
        self.data = _clean(data)
        # file name -> tensors that the analysis sections save beside report.json (fitted lenses)
        self.artifacts: dict[str, dict] = dict(artifacts or {})

    @property
    def models(self) -> list[dict]:
        return self.data["models"]

    @property
    def layers(self) -> list[dict]:
        """The per-layer entries of the first model."""
        return self.models[0]["layers"]

    def __getitem__(self, key: str) -> Any:
        return self.models[0][key]

    def summary_lines(self) -> list[str]:
        """One line per model, what ``layerlab analyze`` prints: its loss on its named slice, its least and most
        important blocks by removal, and the best single block to prune by angular distance."""
        lines = []
        for m in self.models:
            best = m["best_block_to_prune"].get("1")
            key = "removal_loss_delta" if m["causal"] else "removal_effect"
            ranked = sorted(m["layers"], key=lambda lay: lay[key] if lay[key] is not None else float("inf"))
            line = f"{m['name']}: {m['num_layers']} layers"
            if m["loss"] is not None:
                line += f", loss {m['loss']:.4f} nats/token on the {m['data_slice']}"
            if ranked:
                line += f"; least important block {ranked[0]['index']}, most important {ranked[-1]['index']} (by {key})"
            if best:
                line += f"; best single block to prune: {best['start']}"
            lines.append(line)
        return lines

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.data, indent=indent)

    def to_dataframe(self):
        """One row per (model, layer); needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from None
        rows = []
        for m in self.models:
            for lay in m["layers"]:
                row = {"model": m["name"], **{k: v for k, v in lay.items() if k != "max_abs"}}
                row.update({f"max_abs_{k}": v for k, v in lay["max_abs"].items()})
                rows.append(row)
        return pd.DataFrame(rows)

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        """Write each artifact as safetensors into ``directory``, atomically; returns the paths."""
        from safetensors.torch import save

        paths = []
        for file, tensors in self.artifacts.items():
            path = Path(directory) / file
            atomic_write_bytes(path, save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}))
            paths.append(path)
        return paths

    def save_json(self, path: str | Path) -> Path:
        """Write report.json to ``path``, atomically (``layerlab.report.write_report`` adds report.html)."""
        atomic_write_bytes(path, (self.to_json() + "\n").encode())
        return Path(path)
