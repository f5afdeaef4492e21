"""How long `layerlab --help`, every `COMMAND --help` and argument errors take, against `import torch`.

Usage: python benchmarks/startup.py [--repeat 5]

Each command runs ``--repeat`` times in a fresh interpreter; the table gives the median wall time and
its ratio to the median of ``python -c "import torch"`` measured in the same run (the cost a command
pays when it loads torch before answering). Target: every line under 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = ("train", "sample", "export", "analyze", "prune", "quantize", "convert", "sweep", "eval")
CASES = [
    ("layerlab --help", ["--help"]),
    *((f"layerlab {c} --help", [c, "--help"]) for c in COMMANDS),
    ("layerlab train --nrom rmsnorm   (unknown field)", ["train", "--nrom", "rmsnorm"]),
    ("layerlab train --layers many    (bad type)", ["train", "--layers", "many"]),
    ("layerlab train --norm rmsnrom   (unknown norm)", ["train", "--norm", "rmsnrom"]),
    ("layerlab prune . --metric angulr (unknown metric)", ["prune", ".", "--remove", "1", "--metric", "angulr",
                                                         "--out", "x"]),
    ("layerlab eval no/such/dir       (missing model)", ["eval", "no/such/dir"]),
    ("layerlab prune x --remove 1     (missing --out)", ["prune", "x", "--remove", "1"]),
]


def _median_seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    peer = _median_seconds([sys.executable, "-c", "import torch"], args.repeat)
    bare = _median_seconds([sys.executable, "-c", "pass"], args.repeat)
    print(f"peer: python -c 'import torch' {peer:.2f} s; python -c pass {bare:.2f} s (medians of {args.repeat})")
    print("| command | median s | / import torch |\n|---|---|---|")
    worst = 0.0
    for label, argv in CASES:
        s = _median_seconds([sys.executable, "-m", "layerlab", *argv], args.repeat)
        worst = max(worst, s)
        print(f"| `{label}` | {s:.2f} | {s / peer:.2f} |", flush=True)
    print(f"slowest: {worst:.2f} s ({'under' if worst < 1.5 else 'OVER'} the 1.5 s target)")


if __name__ == "__main__":
    main()
