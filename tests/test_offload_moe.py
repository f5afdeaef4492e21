"""``--offload`` on mixture-of-experts checkpoints (issue 13, section 3): Mixtral, Qwen3-MoE and OLMoE.

transformers 5 stores a MoE layer's experts one tensor per expert and projection (what ``save_pretrained``
writes, and what Hub checkpoints hold) and stacks them on load into 3-d parameters (``mlp.experts.gate_up_proj``,
(E, 2I, H): each expert's gate rows then its up rows; ``mlp.experts.down_proj``, (E, H, I)). The offloaded
model reads those parts from the shards and builds the stacked tensors block by block.

Tiny random models built from the installed transformers' config classes (3 layers, hidden 32, 4 experts,
top-2; qwen3_moe with block 1 dense; nothing is downloaded). Checked against computations that do not go through
layerlab's reader:
- every stacked tensor equals the one built here from the per-expert tensors read with the safetensors library,
  under names written here from the transformers modeling code (Mixtral's ``block_sparse_moe.experts.e.w1/w3/w2``,
  the others' ``mlp.experts.e.gate_proj/up_proj/down_proj``), and the in-memory model's parameter; experts are
  stacked in numeric order (12 experts: expert 10 is not read as expert 2's neighbour);
- the offloaded logits equal the in-memory model's; a checkpoint that already stores the stacked tensors is read as
  it is; transformers' own converter (the general path) gives the same tensors; a missing expert is one line;
- through the CLI: ``analyze --offload`` gives the ``--no-offload`` report within 1e-4 (spectra of the linear
  layers included) holding
  one block at a time; ``prune --offload`` (block, and ``--unit mlp``: every expert zeroed, the router kept) writes
  the in-memory prune's tensors, which plain transformers loads with the in-memory prune's logits; ``quantize
  --offload`` chooses the same widths and writes the same packed tensors (Mixtral: under the model's ``mlp.``
  names, where ``save_pretrained`` writes ``block_sparse_moe.``), with the same logits.
"""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_reports_close, dir_tensors, perturb, watch_block_loads
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import layerlab.offload as off
from layerlab.adapters import load_model
from layerlab.cli import app
from layerlab.errors import LayerlabError
from layerlab.offload import open_offloaded

V = 320
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILIES = {
    "mixtral": lambda **kw: transformers.MixtralConfig(**{**SMALL, "num_local_experts": 4, **kw}),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**{**SMALL, "head_dim": 16, "num_experts": 4,
                                                            "moe_intermediate_size": 16, "mlp_only_layers": [1],
                                                            **kw}),
    "olmoe": lambda **kw: transformers.OlmoeConfig(**{**SMALL, "num_experts": 4, **kw}),
}
# the checkpoint's per-expert names, from the transformers modeling code (block i, expert e): gate, up, down
EXPERT_NAMES = {
    "mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
    **{f: ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
           "model.layers.{i}.mlp.experts.{e}.down_proj.weight") for f in ("qwen3_moe", "olmoe")},
}
QUIET = ["--no-progress", "--tokens", "384"]


def _build(family: str, **kw):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](**kw))
    assert model.config.model_type == family
    return perturb(model, 0.05).eval()


def _save(model, path: Path, shard: str | None = "16KB") -> Path:
    """save_pretrained (several shards: a block's experts are spread over files) and the byte tokenizer."""
    from layerlab.data import ByteTokenizer

    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    ByteTokenizer().save(path)
    return path


def _stacked_by_hand(tensors: dict, family: str, i: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (E, 2I, H), down (E, H, I)) of block ``i``: expert e's gate rows then its up rows, stacked."""
    gate, up, down = EXPERT_NAMES[family]
    gate_up = torch.stack([torch.cat([tensors[gate.format(i=i, e=e)], tensors[up.format(i=i, e=e)]], 0)
                           for e in range(experts)])
    return gate_up, torch.stack([tensors[down.format(i=i, e=e)] for e in range(experts)])


def _moe_blocks(model) -> list[int]:
    return [i for i, b in enumerate(model.model.layers) if hasattr(b.mlp, "experts")]


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(request, tmp_path_factory):
    model = _build(request.param)
    return request.param, model, _save(model, tmp_path_factory.mktemp(request.param) / "model")


def test_stacked_experts_are_built_from_the_per_expert_tensors(moe):
    family, model, d = moe
    tensors = dir_tensors(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[n.format(i=0, e=e)] for n in EXPERT_NAMES[family] for e in range(4)}) > 1  # over shards
    assert not any("experts.gate_up_proj" in k for k in tensors)  # stored per expert
    om = open_offloaded(d)
    blocks = _moe_blocks(model)
    assert blocks == ([0, 2] if family == "qwen3_moe" else [0, 1, 2])
    for i in blocks:
        with om.block(i) as block:
            gate_up, down = _stacked_by_hand(tensors, family, i, 4)
            assert torch.equal(block.mlp.experts.gate_up_proj, gate_up)
            assert torch.equal(block.mlp.experts.down_proj, down)
            assert torch.equal(gate_up, model.model.layers[i].mlp.experts.gate_up_proj)  # as from_pretrained
            # the rest of the block: each parameter as the in-memory model holds it (Mixtral's router renamed)
            for n, p in model.model.layers[i].named_parameters():
                assert torch.equal(block.get_parameter(n), p), n
        assert om.held == set()
    # a block's bytes: its parameters' in memory (stacked experts counted through their parts)
    assert om.block_bytes == [sum(p.numel() * 4 for p in b.parameters()) for b in model.model.layers]
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(om.model(ids).logits, model(ids).logits)
    assert om.held == set()


def test_experts_are_stacked_in_numeric_order(tmp_path):
    """12 experts: names sort as 0, 1, 10, 11, 2, ... as text; transformers stacks them as numbers."""
    model = _build("qwen3_moe", num_experts=12, num_hidden_layers=1, mlp_only_layers=[])
    d = _save(model, tmp_path / "m", shard=None)
    om = open_offloaded(d)
    gate_up, down = _stacked_by_hand(dir_tensors(d), "qwen3_moe", 0, 12)
    with om.block(0) as block:
        assert torch.equal(block.mlp.experts.gate_up_proj, gate_up)
        assert torch.equal(block.mlp.experts.down_proj, down)
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(om.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_transformers_own_converter_gives_the_same_tensors(family, tmp_path, monkeypatch):
    """The general path (transformers' WeightConverter run on the tensors read), forced here, builds the same."""
    model = _build(family)
    d = _save(model, tmp_path / "m")
    monkeypatch.setattr(off.fusion, "_stack_then_concat", lambda converter: None)
    om = open_offloaded(d)
    tensors = dir_tensors(d)
    for i in range(3):
        with om.block(i) as block:
            gate_up, down = _stacked_by_hand(tensors, family, i, 4)
            assert torch.equal(block.mlp.experts.gate_up_proj, gate_up)
            assert torch.equal(block.mlp.experts.down_proj, down)


def test_a_checkpoint_that_stores_the_stacked_tensors_is_read_as_it_is(tmp_path):
    model = _build("mixtral")
    d = tmp_path / "fused"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    model.config.save_pretrained(d)
    with safe_open(d / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    om = open_offloaded(d)
    assert om._fusions == {}
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(om.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("general", [False, True])
def test_a_missing_expert_is_one_line(general, tmp_path, monkeypatch):
    """Block 1's expert 3 lacks its gate matrix: refused when opened (stacked by layerlab: the parts are counted
    first) or when block 1 is read (transformers' converter, forced), never a tensor of the wrong shape."""
    model = _build("mixtral")
    d = _save(model, tmp_path / "m", shard=None)
    tensors = dir_tensors(d)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    line = (r"^offload cannot build model\.layers\.1\.mlp\.experts\.gate_up_proj from its 7 checkpoint tensors "
            r"\(.*\): [^\n]*; use --no-offload$")
    if not general:
        with pytest.raises(LayerlabError, match=line):
            open_offloaded(d)
        return
    monkeypatch.setattr(off.fusion, "_stack_then_concat", lambda converter: None)
    om = open_offloaded(d)
    with om.block(0):
        pass
    with pytest.raises(LayerlabError, match=line):
        with om.block(1):
            pass


def test_a_stacked_tensor_with_none_of_its_parts_is_one_line(tmp_path):
    model = _build("mixtral")
    d = _save(model, tmp_path / "m", shard=None)
    tensors = {k: t for k, t in dir_tensors(d).items() if not re.search(r"layers\.2\..*\.w[13]\.", k)}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayerlabError, match=r"^offload cannot read model\.layers\.2\.mlp\.experts\.gate_up_proj of "
                                            r"this mixtral checkpoint: transformers builds it on load \(.*w1.*\), "
                                            r"and the checkpoint holds none of those tensors; use --no-offload$"):
        open_offloaded(d)


def test_analyze_offload_equals_in_memory(moe, tmp_path, monkeypatch):
    family, model, d = moe
    reports = {}
    for mode in ("--no-offload", "--offload"):
        monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / f"cache{mode}"))  # each computes its own spectra
        loads = watch_block_loads(monkeypatch)
        r = CliRunner().invoke(app, ["analyze", str(d), mode, *QUIET, "--out", str(tmp_path / mode)])
        assert r.exit_code == 0, r.output
        reports[mode] = json.loads((tmp_path / mode / "report.json").read_text())["models"][0]
        if mode == "--offload":
            assert loads and max(held for _, held, _ in loads) == 1
    mem, offl = reports["--no-offload"], reports["--offload"]
    assert mem["offload"] is False and offl["offload"] is True
    assert offl["weights"] and all(w["esd_alpha"] is not None for w in offl["weights"])  # spectra computed
    assert assert_reports_close(mem, offl, 1e-4) > 100


@pytest.mark.parametrize("unit", ["block", "mlp"])
def test_prune_offload_writes_the_in_memory_prune(moe, unit, tmp_path):
    family, model, d = moe
    args = ["--remove", "1", "--unit", unit, "--metric", "bi", "--tokens", "300", "--measure-tokens", "300"]
    for mode in ("--no-offload", "--offload"):
        r = CliRunner().invoke(app, ["prune", str(d), *args, mode, "--out", str(tmp_path / mode)])
        assert r.exit_code == 0, r.output
    mem_dir, off_dir = tmp_path / "--no-offload", tmp_path / "--offload"
    rec = json.loads((off_dir / "layerlab.json").read_text())
    a, b = dir_tensors(off_dir), dir_tensors(mem_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    src = dir_tensors(d)
    if unit == "block":
        kept = [i for i in range(3) if i not in _removed(rec)]
        for new, old in enumerate(kept):  # the kept block's experts under the new index, by hand
            for name in EXPERT_NAMES[family]:
                for e in range(4):
                    if name.format(i=old, e=e) in src:
                        assert torch.equal(a[name.format(i=new, e=e)], src[name.format(i=old, e=e)])
    else:
        (i,) = _removed(rec)
        for name in EXPERT_NAMES[family]:
            for e in range(4):
                assert not a[name.format(i=i, e=e)].any()  # every expert's matrices zeroed
        router = [k for k in src if re.fullmatch(rf"model\.layers\.{i}\.(mlp|block_sparse_moe)\.gate\.weight", k)]
        assert router and all(torch.equal(a[k], src[k]) for k in router)  # the router kept
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    pa = transformers.AutoModelForCausalLM.from_pretrained(off_dir).eval()
    pb = transformers.AutoModelForCausalLM.from_pretrained(mem_dir).eval()
    assert pa.config.num_hidden_layers == (2 if unit == "block" else 3)
    with torch.no_grad():
        assert torch.equal(pa(ids).logits, pb(ids).logits)


def _removed(rec: dict) -> list[int]:
    """The blocks (or the blocks whose MLP) prune removed, from its layerlab.json."""
    return sorted(r["block"] for r in rec["removed"])


def test_quantize_offload_equals_in_memory(moe, tmp_path, monkeypatch):
    family, model, d = moe
    args = ["--bits", "3.5", "--widths", "3,4", "--group", "16", "--tokens", "300", "--calibration-tokens", "300",
            "--no-baselines"]
    for mode in ("--no-offload", "--offload"):
        loads = watch_block_loads(monkeypatch)
        r = CliRunner().invoke(app, ["quantize", str(d), *args, mode, "--out", str(tmp_path / mode)])
        assert r.exit_code == 0, r.output
        if mode == "--offload":
            assert loads and max(held for _, held, _ in loads) == 1
    mem_dir, off_dir = tmp_path / "--no-offload", tmp_path / "--offload"
    a, b = dir_tensors(off_dir), dir_tensors(mem_dir)
    # the same names as save_pretrained writes (Mixtral's MoE layer under its checkpoint name, block_sparse_moe)
    assert sorted(a) == sorted(b)
    assert any("experts.qweight" in k for k in a)  # the experts were packed
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    qa, qb = load_model(off_dir).model, load_model(mem_dir).model
    with torch.no_grad():
        assert torch.equal(qa(ids).logits, qb(ids).logits)


def test_a_float32_checkpoint_read_in_bfloat16_equals_from_pretrained(tmp_path):
    """``--dtype bfloat16``: each expert's matrix cast as from_pretrained casts it, then stacked."""
    d = _save(_build("olmoe"), tmp_path / "m")
    om = open_offloaded(d, dtype="bfloat16")
    gate_up, down = _stacked_by_hand(dir_tensors(d), "olmoe", 1, 4)
    with om.block(1) as block:
        assert block.mlp.experts.gate_up_proj.dtype == torch.bfloat16
        assert torch.equal(block.mlp.experts.gate_up_proj, gate_up.to(torch.bfloat16))
        assert torch.equal(block.mlp.experts.down_proj, down.to(torch.bfloat16))
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(om.model(ids).logits, ref(ids).logits)
