import importlib
import math
import os
from contextlib import contextmanager

# Idle OpenMP threads sleep instead of spinning: with spinning, two threads on a loaded 2-core
# machine slow tiny forwards down by an order of magnitude. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from layerlab.config import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token caches go to a per-session folder, never the user's ~/.cache."""
    os.environ["LAYERLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_cfg(**kw) -> ModelConfig:
    """A model small enough that a forward and backward take milliseconds."""
    base = dict(layers=3, width=32, heads=2, context=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def perturb(model, scale: float = 0.05, seed: int = 0):
    """Move every parameter off its init so that tests see more than ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; without it they are skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def idle_blocks(model, blocks):
    """Zero the output projections of layerlab ``blocks``: each then adds nothing to the residual stream."""
    with torch.no_grad():
        for i in blocks:
            for proj in (model.blocks[i].attn.proj, model.blocks[i].mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def fit_on_bytes(model, steps: int, n_bytes: int, seed: int = 0, lr: float = 3e-3):
    """Train a byte-level ``model`` for ``steps`` AdamW steps, each on 8 windows of 32 next-byte predictions drawn
    (from ``seed``) out of the first ``n_bytes`` of the embedded corpus; returns it in eval mode."""
    import torch.nn.functional as F

    from layerlab.data import embedded_documents

    text = torch.frombuffer(bytearray(b"".join(embedded_documents())[:n_bytes]), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - 33, (8,), generator=gen).tolist()
        rows = torch.stack([text[s : s + 33] for s in starts])
        logits = model(input_ids=rows[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@contextmanager
def ctrl_c_at(step: int):
    """Training meets Ctrl-C at the boundary before step ``step`` (0-based): the run saves its checkpoint of that
    step and exits (SystemExit), as after a real Ctrl-C there."""
    from layerlab.train import loop as loop_mod

    real = loop_mod.lr_at

    def lr_at(s, tc):
        if s == step:
            raise KeyboardInterrupt
        return real(s, tc)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop_mod, "lr_at", lr_at)
        yield


def save_model(model, path):
    """Write ``model`` and the byte tokenizer to ``path``: a model directory the commands read."""
    from layerlab.data import ByteTokenizer

    model.save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def cli_help_after(setup: str, command: str, option: str) -> str:
    """The --help text of ``command --option`` in a fresh process that first runs ``setup`` (registering an
    extension, say) and only then imports the CLI: what a user's plug-in module would see."""
    import subprocess
    import sys

    code = (f"{setup}\nimport typer\nfrom layerlab.cli import app\n"
            f"command = typer.main.get_command(app).commands[{command!r}]\n"
            f"print(next(p.help for p in command.params if p.name == {option!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout


def digest(directory) -> dict[str, str]:
    """sha256 of every file in ``directory``: compared before and after, it shows an input untouched."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def dir_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


class FakeTok:
    """A tokenizer stand-in for analyze: fixed random ids 1..vocab-1 (0 is padding). With
    :func:`measure_fake_ids` in place, analyze measures exactly these ids, so its windows are known."""

    pad_token_id = 0
    cls_token_id = sep_token_id = None

    def __init__(self, vocab: int, seed: int = 3, n: int = 4000):
        self.ids = torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure_fake_ids(monkeypatch):
    """Make analyze read a :class:`FakeTok`'s ids as its text; any other tokenizer reads the real text.
    Returns the analyze module (the package re-exports a function of that name)."""
    module = importlib.import_module("layerlab.analysis.analyze")
    real = module.split_ids
    monkeypatch.setattr(module, "split_ids", lambda tok, data, split: np.asarray(tok.ids) if isinstance(
        tok, FakeTok) else real(tok, data, split))
    return module


def watch_block_loads(monkeypatch) -> list[tuple]:
    """Record, right after every block that any :class:`layerlab.offload.Offloaded` materialises,
    ``(the Offloaded, blocks held, resident parameter bytes)``: what the offload tests bound."""
    import layerlab.offload as off

    seen = []
    load = off.Offloaded.load

    def watched(self, i):
        load(self, i)
        seen.append((self, len(self.held), self.resident_bytes()))

    monkeypatch.setattr(off.Offloaded, "load", watched)
    return seen


def _report_numbers(x, path=""):
    """Every numeric leaf of a report entry, by its path (timings and paths are not numbers here)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _report_numbers(v, f"{path}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _report_numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def assert_reports_close(a: dict, b: dict, tol: float, skip=("offload", "path", "name")) -> int:
    """Two report entries (report.json's ``models[i]``) hold the same numeric leaves, each within ``tol`` relative
    (NaN on both sides agrees), top-level keys ``skip`` aside; returns how many were compared."""
    a = {k: v for k, v in a.items() if k not in skip}
    b = {k: v for k, v in b.items() if k not in skip}
    na, nb = dict(_report_numbers(a)), dict(_report_numbers(b))
    assert na.keys() == nb.keys()
    for k in na:
        x, y = na[k], nb[k]
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), k
        else:
            assert abs(x - y) <= tol * max(1.0, abs(x)), (k, x, y)
    return len(na)
