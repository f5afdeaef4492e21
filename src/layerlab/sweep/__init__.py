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

The modules, each importing only those before it: :mod:`.plan` reads, validates and expands the file;
:mod:`.collect` reads finished runs back into the summary; :mod:`.write` writes the outputs; :mod:`.run`
runs the plan (locally or on Ray) and holds :func:`sweep`. Importing the package loads neither torch nor
matplotlib: pool and Ray workers import it before :func:`run_one` sets their threads and environment.
"""

from .collect import LAYER_METRICS, TELEMETRY_METRICS, collect, final_val_loss, previous_records
from .plan import (
    ANALYSIS_DIR,
    ANALYSIS_OPTIONS,
    ANALYZE_DEFAULTS,
    RAY_DEFAULTS,
    SWEEP_KEYS,
    PlannedRun,
    Sweep,
    analysis_cached,
    load_sweep,
    value_label,
)
from .run import BACKENDS, RAY_CONNECT_TIMEOUT, SweepResult, check_ray, connect_ray, run_one, sweep
from .write import markdown_table, table_rows, write_outputs, write_progress

__all__ = [
    "ANALYSIS_DIR", "ANALYSIS_OPTIONS", "ANALYZE_DEFAULTS", "BACKENDS", "LAYER_METRICS", "RAY_CONNECT_TIMEOUT",
    "RAY_DEFAULTS", "SWEEP_KEYS", "TELEMETRY_METRICS", "PlannedRun", "Sweep", "SweepResult", "analysis_cached",
    "check_ray", "collect", "connect_ray", "final_val_loss", "load_sweep", "markdown_table", "previous_records",
    "run_one", "sweep", "table_rows", "value_label", "write_outputs", "write_progress",
]
