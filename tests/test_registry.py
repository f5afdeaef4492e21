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
