"""prune --unit attn|mlp on Hugging Face families: sublayers left out through transformers' per-layer configuration
where the installed transformers builds the family without them, zeroed where it does not.

transformers 5.24 (the newest release, the upper bound of pyproject) parses and saves ``per_layer_config`` with
``skip`` (``integrations/heterogeneity/configuration_utils.py``) but ships no model class that reads it: every
family builds the skipped modules, and a checkpoint without their weights loads with random ones.
``test_installed_transformers_*`` check that behaviour and the fallback it calls for. The removal path itself
is tested with ``_honouring_skip``: a test-only stand-in for the modeling half of transformers' heterogeneity
integration (upstream's ``apply_heterogeneous_modeling`` patches the decoder layer's ``__init__`` so that a
layer whose per-layer config skips ``"attention"`` or ``"mlp"`` gets parameterless no-op modules in place of
that sublayer's norm and module, the no-op attention returning zeros of its input), applied here to GPT-2's and
Llama's decoder layers. Every expected size and logit is computed by hand: bytes from the config's dimensions,
logits from a copy of the model with the output projections zeroed by hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import perturb, save_model
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from layerlab.compress import prune
from layerlab.compress.removal import present_sublayers, remove_sublayers, sublayer_removal

V, D, F_, L = 320, 32, 64, 4  # vocabulary, width, MLP width, blocks
QUIET = {"tokens": 512, "measure_tokens": 512}


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=2, n_inner=F_, n_positions=64))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=F_, max_position_embeddings=64))


MAKERS = {"gpt2": _gpt2, "llama": _llama}
# by hand, from the modeling code: block prefix, {unit: (output projection, {parameter name in a block: shape})}
HEAD = D // 2
PARTS = {
    "gpt2": ("transformer.h", {
        "attn": ("attn.c_proj", {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D),
                                 "attn.c_attn.bias": (3 * D,), "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,)}),
        "mlp": ("mlp.c_proj", {"ln_2.weight": (D,), "ln_2.bias": (D,), "mlp.c_fc.weight": (D, F_),
                               "mlp.c_fc.bias": (F_,), "mlp.c_proj.weight": (F_, D), "mlp.c_proj.bias": (D,)})}),
    "llama": ("model.layers", {
        "attn": ("self_attn.o_proj", {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (D, D),
                                      "self_attn.k_proj.weight": (HEAD, D), "self_attn.v_proj.weight": (HEAD, D),
                                      "self_attn.o_proj.weight": (D, D)}),
        "mlp": ("mlp.down_proj", {"post_attention_layernorm.weight": (D,), "mlp.gate_proj.weight": (F_, D),
                                  "mlp.up_proj.weight": (F_, D), "mlp.down_proj.weight": (D, F_)})}),
}
SKIP = {"attn": "attention", "mlp": "mlp"}


class _NoAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


_NO_OPS = {
    GPT2Block: {"attention": {"ln_1": nn.Identity, "attn": _NoAttention}, "mlp": {"ln_2": nn.Identity, "mlp": _NoMLP}},
    LlamaDecoderLayer: {"attention": {"input_layernorm": nn.Identity, "self_attn": _NoAttention},
                        "mlp": {"post_attention_layernorm": nn.Identity, "mlp": _NoMLP}},
}


def _read_skip(monkeypatch, no_ops=_NO_OPS):
    for cls, kinds in no_ops.items():
        original = cls.__init__

        def init(self, config, *args, _original=original, _kinds=kinds, **kwargs):
            _original(self, config, *args, **kwargs)
            index = kwargs.get("layer_idx", args[0] if args else None)
            skip = config.per_layer_config[index].skip if getattr(config, "is_heterogeneous", False) else []
            for kind, modules in _kinds.items():
                if kind in skip:
                    for name, make in modules.items():
                        setattr(self, name, make())

        monkeypatch.setattr(cls, "__init__", init)


@pytest.fixture
def honouring_skip(monkeypatch):
    """GPT-2's and Llama's decoder layers built as a transformers that reads ``per_layer_config``'s ``skip`` builds
    them (see the module doc); other families are left as the installed transformers builds them."""
    _read_skip(monkeypatch)


class _PassingAttention(nn.Module):
    """A wrong no-op: returns its (normalised) input, so the block adds the normalised stream once more."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


def _model(family: str):
    torch.manual_seed(0)
    return perturb(MAKERS[family](), 0.05).eval()


def _zeroed_by_hand(model, family: str, unit: str, blocks):
    """A copy of ``model`` (built again, so no skip applies) with the output projections of ``blocks`` zeroed."""
    prefix, parts = PARTS[family]
    zeroed = _model(family)
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in blocks:
            for p in zeroed.get_submodule(f"{prefix}.{i}.{parts[unit][0]}").parameters():
                p.zero_()
    return zeroed.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def _tensor_bytes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor in the directory's safetensors files, read from their headers by hand."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return out


def _expected_gone(family: str, unit: str, blocks) -> dict[str, int]:
    prefix, parts = PARTS[family]
    return {f"{prefix}.{i}.{name}": 4 * torch.Size(shape).numel() for i in blocks
            for name, shape in parts[unit][1].items()}


# ---------------------------------------------------------------------------------------- the installed release
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_installed_transformers_builds_skipped_modules_so_prune_zeroes(family, tmp_path):
    """With the installed transformers as it is: if a model built from a config that skips block 1's attention
    still has that attention's weights (checked by hand on the built model), prune must zero, say so, and not
    shrink; if it has none, prune must remove (this branch runs once transformers reads skip)."""
    prefix, parts = PARTS[family]
    config = MAKERS[family]().config
    config.per_layer_config = {1: {"skip": ["attention"]}}
    built = set(AutoModelForCausalLM.from_config(config).state_dict())
    reads_skip = not any(f"{prefix}.1.{n}" in built for n in parts["attn"][1])
    src = save_model(_model(family), tmp_path / "m")
    record = prune(src, remove=1, unit="attn", metric="bi", out=tmp_path / "o", **QUIET)
    chosen = [r["block"] for r in record["removed"]]
    assert record["surgery"] == ("removed" if reads_skip else "zeroed")
    if not reads_skip:
        assert record["zeroed"] == [f"{prefix}.{chosen[0]}.{parts['attn'][0]}.{w}"
                                    for w in (("weight", "bias") if family == "gpt2" else ("weight",))]
        release = f"transformers {transformers.__version__}"
        assert f"{release} saves per_layer_config's skip but still builds" in record["note"]
        assert _tensor_bytes(tmp_path / "o") == _tensor_bytes(src)
        assert "per_layer_config" not in json.loads((tmp_path / "o" / "config.json").read_text())


def test_installed_transformers_loads_a_skip_checkpoint_with_random_weights(tmp_path):
    """Why prune does not write ``skip`` where transformers does not read it: a directory whose config skips a
    sublayer and whose weights lack it loads, with that sublayer's weights newly initialised (if the installed
    transformers read skip, the module would be gone and this test is moot)."""
    model = _model("llama")
    config = model.config
    config.per_layer_config = {1: {"skip": ["attention"]}}
    if "model.layers.1.self_attn.o_proj.weight" not in AutoModelForCausalLM.from_config(config).state_dict():
        pytest.skip(f"transformers {transformers.__version__} reads per_layer_config's skip")
    from safetensors.torch import load_file, save_file

    config.per_layer_config = None
    model.save_pretrained(tmp_path)
    kept = {k: t for k, t in load_file(tmp_path / "model.safetensors").items() if ".1.self_attn." not in k}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["per_layer_config"] = {"1": {"skip": ["attention"]}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    attn = loaded.model.layers[1].self_attn
    assert not torch.equal(attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)


def test_zeroed_output_loads_without_layerlab(tmp_path):
    """The fallback output (what every family gets from transformers 5.24) loads in a process where
    ``import layerlab`` fails, with the logits of the model zeroed by hand."""
    model = _model("llama")
    src = save_model(model, tmp_path / "m")
    record = prune(src, remove=2, unit="mlp", metric="bi", out=tmp_path / "o", **QUIET)
    if record["surgery"] != "zeroed":
        pytest.skip("the installed transformers removes the sublayers (covered by the removal tests)")
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    expect = _logits(_zeroed_by_hand(model, "llama", "mlp", [r["block"] for r in record["removed"]]), x)
    got = _plain_logits(tmp_path / "o", x, tmp_path)
    torch.testing.assert_close(got, expect)


def _plain_logits(directory: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The logits of ``directory`` as plain transformers computes them, in a subprocess where layerlab cannot be
    imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "layerlab.py").write_text("raise ImportError('layerlab is not installed here')\n")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "try:\n    import layerlab\nexcept ImportError:\n    pass\nelse:\n    sys.exit('layerlab imported')\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}).eval()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(input_ids=x, use_cache=False).logits, {str(tmp_path / 'y.pt')!r})\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp_path / "y.pt")


# ---------------------------------------------------------------------------- a transformers that reads skip
@pytest.mark.parametrize("unit", ["attn", "mlp"])
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_removal_in_memory(family, unit, honouring_skip):
    model = _model(family)
    smaller, zeroed, why = remove_sublayers(model, unit, [0, 2])
    assert zeroed == [] and why == ""
    gone = _expected_gone(family, unit, [0, 2])
    have = {k: 4 * t.numel() for k, t in model.state_dict().items()}
    left = {k: 4 * t.numel() for k, t in smaller.state_dict().items()}
    assert set(have) - set(left) == set(gone) and not set(left) - set(have)
    assert sum(have.values()) - sum(left.values()) == sum(gone.values())
    assert smaller.config.to_dict()["per_layer_config"] == {"0": {"skip": [SKIP[unit]]}, "2": {"skip": [SKIP[unit]]}}
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(smaller, x), _logits(_zeroed_by_hand(model, family, unit, [0, 2]), x))
    assert present_sublayers(smaller, unit) == [False, True, False, True]
    # again, on the output: the skips merge, and the other unit's skip is kept beside it
    other = "mlp" if unit == "attn" else "attn"
    twice, zeroed, _ = remove_sublayers(smaller, other, [2])
    assert zeroed == []
    assert twice.config.to_dict()["per_layer_config"]["2"] == {"skip": sorted([SKIP[unit], SKIP[other]])}
    expect = _zeroed_by_hand(_zeroed_by_hand(model, family, unit, [0, 2]), family, other, [2])
    torch.testing.assert_close(_logits(twice, x), _logits(expect, x))


@pytest.mark.parametrize("unit", ["attn", "mlp"])
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_prune_removes_in_memory_and_offloaded(family, unit, honouring_skip, tmp_path):
    """prune (in memory and --offload) writes the per-layer skip and leaves the weights out: the safetensors data
    shrinks by exactly the removed parameters' bytes, the output loads (with the transformers that reads skip) and
    computes the model zeroed by hand; analyze and eval read it."""
    model = _model(family)
    src = save_model(model, tmp_path / "m")
    outs = {}
    for mode in ("mem", "off"):
        outs[mode] = prune(src, remove=2, unit=unit, metric="bi", out=tmp_path / mode, offload=mode == "off",
                           **QUIET)
    mem, off = outs["mem"], outs["off"]
    chosen = [r["block"] for r in mem["removed"]]
    assert [r["block"] for r in off["removed"]] == chosen and len(chosen) == 2
    gone = _expected_gone(family, unit, chosen)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    expect = _logits(_zeroed_by_hand(model, family, unit, chosen), x)
    before = _tensor_bytes(src)
    for mode, record in outs.items():
        out = tmp_path / mode
        assert record["surgery"] == "removed" and "zeroed" not in record, mode
        assert sorted(record["removed_weights"]) == sorted(gone)
        after = _tensor_bytes(out)
        assert set(before) - set(after) == set(gone) and not set(after) - set(before)
        assert sum(before.values()) - sum(after.values()) == sum(gone.values())
        assert record["before"]["bytes"] - record["pruned"]["bytes"] == sum(gone.values())
        assert record["pruned"][f"{unit}_sublayers"] == L - 2
        raw = json.loads((out / "config.json").read_text())
        assert {int(k): v for k, v in raw["per_layer_config"].items()} == {i: {"skip": [SKIP[unit]]} for i in chosen}
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(loaded, x), expect)
    assert off["pruned"]["loss"] == pytest.approx(mem["pruned"]["loss"], rel=1e-5)

    import layerlab
    from layerlab.evaluate import evaluate

    report = layerlab.analyze(tmp_path / "mem", tokens=256, spectra=False, progress=False)
    assert len(report.layers) == L
    assert evaluate(tmp_path / "mem", tokens=512, split="validation")["loss"] == pytest.approx(mem["pruned"]["loss"])


def test_family_without_support_falls_back_to_zeroing(honouring_skip, tmp_path):
    """With GPT-2 and Llama reading skip, a family whose layers do not (Qwen 3) is zeroed, and the record says so."""
    config = transformers.Qwen3Config(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=F_,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = perturb(AutoModelForCausalLM.from_config(config), 0.05).eval()
    assert sublayer_removal(model, "attn", [1])[0] is None
    src = save_model(model, tmp_path / "m")
    for mode in ("mem", "off"):
        record = prune(src, remove=1, unit="attn", metric="bi", out=tmp_path / mode, offload=mode == "off", **QUIET)
        i = record["removed"][0]["block"]
        assert record["surgery"] == "zeroed" and record["zeroed"] == [f"model.layers.{i}.self_attn.o_proj.weight"]
        assert "still builds the skipped modules of a qwen3 model" in record["note"]
        assert _tensor_bytes(tmp_path / mode) == _tensor_bytes(src)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / mode)
        assert not loaded.model.layers[i].self_attn.o_proj.weight.any()


@pytest.mark.skipif("model.layers.1.self_attn.o_proj.weight" in AutoModelForCausalLM.from_config(
    LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=F_,
                per_layer_config={1: {"skip": ["attention"]}})).state_dict(),
    reason=f"transformers {transformers.__version__} does not read per_layer_config's skip")
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_removed_output_loads_in_plain_transformers(family, tmp_path):
    """Once the installed transformers reads skip: the removed output loads in a process without layerlab."""
    model = _model(family)
    src = save_model(model, tmp_path / "m")
    record = prune(src, remove=2, unit="attn", metric="bi", out=tmp_path / "o", **QUIET)
    if record["surgery"] != "removed":
        pytest.skip(f"transformers {transformers.__version__} does not leave out a {family} sublayer")
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    expect = _logits(_zeroed_by_hand(model, family, "attn", [r["block"] for r in record["removed"]]), x)
    torch.testing.assert_close(_plain_logits(tmp_path / "o", x, tmp_path), expect)


def test_a_skip_that_computes_otherwise_is_not_trusted(monkeypatch, tmp_path):
    """A transformers that leaves the skipped modules out but computes something else than zeroing (here: the
    skipped attention returns its input): prune checks the logits, zeroes instead, in memory and offloaded (the
    offloaded output rewritten), and says why."""
    _read_skip(monkeypatch, {LlamaDecoderLayer: {"attention": {"self_attn": _PassingAttention}}})
    model = _model("llama")
    assert sublayer_removal(model, "attn", [1])[0] is not None  # the structure alone would pass
    src = save_model(model, tmp_path / "m")
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    for mode in ("mem", "off"):
        record = prune(src, remove=1, unit="attn", metric="bi", out=tmp_path / mode, offload=mode == "off", **QUIET)
        i = record["removed"][0]["block"]
        assert record["surgery"] == "zeroed" and record["zeroed"] == [f"model.layers.{i}.self_attn.o_proj.weight"]
        assert "does not compute what zeroing them computes" in record["note"], mode
        assert _tensor_bytes(tmp_path / mode) == _tensor_bytes(src)
        assert "per_layer_config" not in json.loads((tmp_path / mode / "config.json").read_text())
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / mode).eval()
        torch.testing.assert_close(_logits(loaded, x), _logits(_zeroed_by_hand(model, "llama", "attn", [i]), x))
