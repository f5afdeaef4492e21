"""Median time of one AdamW step: the optimizer registry's per-block parameter groups against two groups.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizer_groups.py

The registry (train/optimizers.py) gives every block and kind its own group (for per-block learning
rates); the old loop had one group with weight decay and one without. Same weights, same random
gradients, the two optimizers alternating over 30 trials (the first 5 dropped), on the tiny preset's
shapes (4 x 256).
"""
import statistics
import time

import torch

import layerlab
from layerlab.config import ModelConfig, TrainConfig
from layerlab.train.optimizers import param_groups

torch.manual_seed(0)
model = layerlab.build_model(ModelConfig(layers=4, width=256, heads=4, context=256, vocab_size=259))
tc = TrainConfig()
params = list(model.parameters())
for p in params:
    p.grad = torch.randn_like(p)
old = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
new_groups = param_groups(model, tc)
new = torch.optim.AdamW(new_groups, lr=1e-3)
print("groups:", len(old.param_groups), "vs", len(new.param_groups))
times = {"two groups": [], "per-block groups": []}
for r in range(30):
    order = (("two groups", old), ("per-block groups", new))
    for name, opt in order if r % 2 else order[::-1]:
        t = time.perf_counter()
        opt.step()
        times[name].append(time.perf_counter() - t)
m = {k: statistics.median(v[5:]) * 1e3 for k, v in times.items()}
print({k: round(v, 2) for k, v in m.items()}, "ratio new/old", round(m["per-block groups"] / m["two groups"], 3))
