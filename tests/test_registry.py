"""Registries know their names before torch loads; each declared entry is the object its module registers."""

import subprocess
import sys

import pytest

from layerlab.errors import LayerlabError
from layerlab.registry import NORMS, OPTIMIZERS, PRUNE_METRICS, Registry


@pytest.mark.parametrize("registry", [NORMS, OPTIMIZERS, PRUNE_METRICS], ids=lambda r: r.kind)
def test_every_declared_entry_is_what_its_module_registers(registry):
    for name in registry:
        obj = registry[name]
        assert not isinstance(obj, str) and registry[name] is obj
        assert registry._entries[name] is obj  # the module's own register() confirmed the declaration


def test_names_are_known_without_importing_torch():
    code = ("import sys; from layerlab.registry import NORMS, OPTIMIZERS, PRUNE_METRICS\n"
            "print(sorted(NORMS), sorted(OPTIMIZERS), sorted(PRUNE_METRICS), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("False") and "'rmsnorm'" in out and "'lamb'" in out and "'angular'" in out


def test_unknown_names_suggest_the_closest_and_runtime_entries_count():
    reg = Registry("widget", {"round": "layerlab.norms:LayerNorm"})
    with pytest.raises(LayerlabError, match=r"^unknown widget 'rund'; valid: round; did you mean 'round'\?$"):
        reg.check("rund")

    class Square:
        pass

    reg.register("square", Square)
    assert reg.get_checked("square") is Square and sorted(reg) == ["round", "square"]
    with pytest.raises(LayerlabError, match="declared as layerlab.norms:LayerNorm"):
        reg.register("round", Square)  # a declared name is the declared object's


def test_a_norm_registered_at_runtime_builds_and_is_offered(monkeypatch):
    """One registry entry, in this file only: the config accepts it, the model is built with it, the CLI lists it."""
    import torch
    from conftest import cli_help_after, tiny_cfg

    import layerlab

    class HalfRMS(torch.nn.Module):  # the shape every norm has: (dim, *, eps)
        def __init__(self, dim: int, *, eps: float = 1e-5):
            super().__init__()
            self.eps = eps

        def forward(self, x):
            return 0.5 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    monkeypatch.setitem(NORMS._entries, "halfrms", HalfRMS)
    model = layerlab.build_model(tiny_cfg(norm="halfrms"))
    assert isinstance(model.blocks[0].ln1, HalfRMS) and isinstance(model.ln_f, HalfRMS)
    setup = "import torch\nfrom layerlab.registry import NORMS\nNORMS.register('halfrms', torch.nn.Identity)"
    assert "| none | halfrms" in cli_help_after(setup, "train", "norm")
