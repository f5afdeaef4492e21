"""quantize on mixture-of-experts models (issue 13, section 1): the experts' 3-d weights are quantized too.

Tiny random Mixtral, Qwen3-MoE (with a dense block through ``mlp_only_layers``) and OLMoE models built from
the installed transformers' config classes (3 layers, hidden 32, 4 experts, top-2; nothing is downloaded).
Every expected figure is computed here, without layerlab's packing code:
- :func:`rtn`: round-to-nearest group-wise quantize-dequantize of an (out, in) matrix, written from the format's
  description (min-max per group of ``group`` inputs, float16 scale and offset, the last value repeated as
  padding); the quantized model's logits equal those of the input model with every block weight (the linear
  layers' and each expert's) replaced by it at the block's width, in memory and after loading the written
  directory through layerlab's loader;
- the average width and the weights per block, counted from the blocks' 2-d and 3-d parameters (the router
  excepted: it stays in full precision, as norms do);
- the bytes of the experts' tensors in the written file, from the packed format's arithmetic;
- ZD's share, per expert matrix, and the loss importance's per-block deltas, from their definitions.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import perturb, save_model
from safetensors import safe_open

from layerlab.adapters import load_model
from layerlab.compress import quantize
from layerlab.compress.quantize import Quantizer, _calibration, loss_deltas, zd_scores
from layerlab.errors import LayerlabError
from layerlab.evaluate import evaluate
from layerlab.packed import PackedExperts, check_experts, torchao_int8

V = 320
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=4),
    # block 1 is dense (a plain gate/up/down MLP); the other two are MoE
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, head_dim=16, intermediate_size=48,
                                                     moe_intermediate_size=24, num_experts=4, mlp_only_layers=[1],
                                                     decoder_sparse_step=1),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=24, num_experts=4,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
GROUP = 16
QUIET = {"tokens": 256, "calibration_tokens": 256}


def _build(family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    assert model.config.model_type == family
    return perturb(model, 0.05).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(request, tmp_path_factory):
    model = _build(request.param)
    return request.param, model, save_model(model, tmp_path_factory.mktemp(request.param) / "model")


# ---------------------------------------------------------------------------- the reference, written here
def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of an (out, in) matrix, ``group`` inputs per (scale, offset)."""
    out_f, in_f = w.shape
    g = min(group, 8 * math.ceil(in_f / 8))  # a row shorter than the group is one group of its (8-aligned) width
    n_groups = math.ceil(in_f / g)
    res = torch.empty(out_f, in_f)
    levels = 2 ** bits - 1
    for r in range(out_f):
        row = torch.cat([w[r].float(), w[r, -1:].float().expand(n_groups * g - in_f)])
        for j in range(n_groups):
            vals = row[j * g:(j + 1) * g]
            lo, hi = vals.min(), vals.max()
            scale = ((hi - lo) / levels).half().float()  # both stored as float16
            offset = lo.half().float()
            q = torch.round((vals - offset) / scale).clamp(0, levels) if scale > 0 else torch.zeros_like(vals)
            deq = q * scale + offset
            stop = min((j + 1) * g, in_f)
            res[r, j * g:stop] = deq[:stop - j * g]
    return res


def layers(model):
    return model.model.layers


def block_weights(model, i: int) -> dict[str, torch.Tensor]:
    """Block ``i``'s quantized weights: every 2-d and 3-d parameter but the router's (``mlp.gate.weight``)."""
    return {n: p for n, p in layers(model)[i].named_parameters() if p.ndim in (2, 3) and n != "mlp.gate.weight"}


def reference(model, widths: list[int], blocks: list[int] | None = None):
    """A copy of ``model`` whose block weights are replaced by :func:`rtn` at each block's width: linear layers
    matrix by matrix, an experts module's 3-d weights expert by expert."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in range(len(layers(ref))) if blocks is None else blocks:
            for p in block_weights(ref, i).values():
                if p.ndim == 3:
                    p.copy_(torch.stack([rtn(p[e], widths[i], GROUP) for e in range(p.shape[0])]))
                else:
                    p.copy_(rtn(p, widths[i], GROUP))
    return ref


def tensor_bytes(directory) -> int:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# ---------------------------------------------------------------------------- quantize on MoE models
def test_moe_blocks_are_quantized_with_their_experts(moe, tmp_path):
    family, model, path = moe
    assert any(p.ndim == 3 for p in model.parameters())  # the experts hold 3-d weights
    if family == "qwen3_moe":
        assert not any(p.ndim == 3 for p in layers(model)[1].parameters())  # the dense block
    record = quantize(path, bits=3.5, out=tmp_path / "q", importance="lim", group=GROUP, baselines=False, **QUIET)
    alloc = record["allocation"]
    assert set(alloc) == {3, 4}

    # the weights per block and the average width, counted by hand over the 2-d and 3-d block weights
    sizes = [sum(p.numel() for p in block_weights(model, i).values()) for i in range(3)]
    assert record["weights_per_block"] == sizes
    expert_share = sum(p.numel() for i in range(3) for p in block_weights(model, i).values() if p.ndim == 3)
    assert expert_share > sum(sizes) / 2  # most of the block weights: leaving them out would change every figure
    avg = sum(s * b for s, b in zip(sizes, alloc, strict=True)) / sum(sizes)
    assert record["after"]["avg_bits"] == pytest.approx(avg, abs=1e-12)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["avg_bits"] == pytest.approx(avg, abs=1e-12)

    # logits: the quantized model (in memory, and loaded back by layerlab's loader) = the hand-quantized input
    x = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    want = logits(reference(model, alloc), x)
    in_memory = Quantizer(model, GROUP).quantized_copy(alloc)
    loaded = load_model(tmp_path / "q").model
    experts = [m for m in loaded.modules() if isinstance(m, PackedExperts)]
    moe_blocks = [0, 2] if family == "qwen3_moe" else [0, 1, 2]
    assert [m.bits for m in experts] == [alloc[i] for i in moe_blocks]
    for got in (logits(in_memory, x), logits(loaded, x)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (logits(model, x) - want).abs().max() > 1e-3  # the quantization does change the logits
    # eval of the written directory reads the same loss that quantize measured in memory
    assert evaluate(tmp_path / "q", tokens=256)["loss"] == pytest.approx(record["after"]["loss"], abs=1e-5)

    # the file: no full-precision expert weight, and the experts' packed tensors take the bytes the format says
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        got_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys if ".experts." in k)
    expert_keys = [k.rsplit(".", 1)[1] for k in keys if ".experts." in k]
    assert expert_keys and all(k.startswith(("qweight_", "scale_", "offset_")) for k in expert_keys)
    want_bytes = 0
    for i in range(3):
        for p in block_weights(model, i).values():
            if p.ndim == 3:
                e, o, n = p.shape
                g = min(GROUP, 8 * math.ceil(n / 8))
                groups = math.ceil(n / g)
                want_bytes += e * o * (groups * g * alloc[i] // 8) + 2 * (e * o * groups * 2)  # codes, fp16 pairs
    assert got_bytes == want_bytes


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_four_bits_on_an_moe_is_four_bits_over_every_block_weight(family, tmp_path):
    model = _build(family)
    path = save_model(model, tmp_path / "model")
    record = quantize(path, bits=4, out=tmp_path / "q", importance="zd", group=GROUP, baselines=False, **QUIET)
    assert record["allocation"] == [4, 4, 4] and record["after"]["avg_bits"] == 4.0
    # the file's tensors: the input's, less the block weights in float32, plus each of their (out, in) matrices
    # at 4 bits per (padded) weight and a float16 (scale, offset) per group
    packed = 0
    for i in range(3):
        for p in block_weights(model, i).values():
            *_, n = p.shape
            rows = p.numel() // n
            g = min(GROUP, 8 * math.ceil(n / 8))
            packed += rows * (math.ceil(n / g) * g * 4 // 8 + math.ceil(n / g) * 4)
    block = sum(p.numel() for i in range(3) for p in block_weights(model, i).values())
    assert tensor_bytes(tmp_path / "q") == tensor_bytes(path) - 4 * block + packed
    assert record["after"]["bytes"] == tensor_bytes(tmp_path / "q")  # the size it reports is the file's
    assert record["after"]["disk_bytes"] < 0.6 * record["input_disk_bytes"]
    assert math.isfinite(record["after"]["loss"])


def test_at_eight_bits_linears_keep_torchao_and_experts_use_the_packing(tmp_path):
    """8 bits: the 2-d linear layers take torchao's int8 format (where torchao is installed), the experts' 3-d
    weights layerlab's packing, whose loaded weights are the round-to-nearest 8-bit ones."""
    model = _build("mixtral")
    path = save_model(model, tmp_path / "model")
    quantize(path, bits=8, out=tmp_path / "q", importance="zd", group=GROUP, baselines=False, **QUIET)
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    linear = "torchao-int8" if torchao_int8() is not None else "packed"
    assert {s["format"] for n, s in modules.items() if not n.endswith(".experts")} == {linear}
    assert [s["format"] for n, s in modules.items() if n.endswith(".experts")] == ["packed"] * 3
    loaded = load_model(tmp_path / "q").model
    for i in range(3):
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(layers(model)[i].mlp.experts, name).detach()
            want = torch.stack([rtn(w[e], 8, GROUP) for e in range(w.shape[0])])
            assert torch.equal(getattr(layers(loaded)[i].mlp.experts, name), want)
    x = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(loaded, x), logits(Quantizer(model, GROUP).quantized_copy([8, 8, 8]), x))


def test_zd_standardises_each_expert_matrix_on_its_own():
    model = _build("mixtral")
    with torch.no_grad():  # one expert's matrices on another scale: per-expert standardisation is then needed
        layers(model)[0].mlp.experts.gate_up_proj[0] *= 20
    want = []
    for i in range(3):
        outliers, total = 0, 0
        for p in block_weights(model, i).values():
            for m in (p if p.ndim == 3 else p[None]):  # each expert's (out, in) matrix, or the linear's weight
                m = m.detach().double()
                mean = m.sum() / m.numel()
                std = math.sqrt(float(((m - mean) ** 2).sum()) / (m.numel() - 1))
                outliers += int(((m - mean).abs() > std).sum())
                total += m.numel()
        want.append(outliers / total)
    assert zd_scores(Quantizer(model, GROUP)) == pytest.approx(want, abs=1e-12)


def test_loss_importance_quantizes_each_block_with_its_experts(tmp_path):
    model = _build("qwen3_moe")
    path = save_model(model, tmp_path / "model")
    loaded = load_model(path)
    held = _calibration(loaded.model, loaded.tokenizer, None, 64)
    deltas = loss_deltas(Quantizer(loaded.model, GROUP), held, (2, 4))

    def loss(m) -> float:
        total, count = 0.0, 0
        for ids, _ in held:
            lg = logits(m, ids)
            total += float(F.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
        return total / count

    base = loss(model)
    for i in range(3):
        for bits in (2, 4):
            want = loss(reference(model, [bits] * 3, blocks=[i])) - base
            assert deltas[i][bits] == pytest.approx(want, abs=1e-5)
    assert deltas[0][2] > 0


# ---------------------------------------------------------------------------- the packed experts module
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_experts_hold_the_round_to_nearest_weights_in_the_packed_format(bits):
    experts = _build("mixtral").model.layers[0].mlp.experts
    p = PackedExperts.from_module(experts, bits=bits, group=GROUP)
    assert p.fmt == "packed" and not [n for n, _ in p.named_buffers() if "qdata" in n]  # never torchao's int8
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name).detach()
        want = torch.stack([rtn(w[e], bits, GROUP) for e in range(w.shape[0])])
        assert torch.equal(getattr(p, name), want)
        e, o, n = w.shape
        g = min(GROUP, 8 * math.ceil(n / 8))
        assert getattr(p, f"qweight_{name}").numel() == e * o * math.ceil(n / g) * g * bits // 8


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_compute_what_the_experts_module_computes_on_the_rounded_weights(implementation, dtype):
    """The packed module runs the experts class's own forward, under either experts implementation and in the
    model's dtype: it equals the original module with its weights replaced by :func:`rtn` (rounded to ``dtype``)."""
    model = _build("olmoe").to(dtype)
    model.set_experts_implementation(implementation)
    experts = model.model.layers[0].mlp.experts
    assert experts.config._experts_implementation == implementation
    p = PackedExperts.from_module(experts, bits=3, group=GROUP)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)
            w.copy_(torch.stack([rtn(w[e], 3, GROUP) for e in range(w.shape[0])]))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 32, generator=g).to(dtype)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g).to(dtype)
    with torch.no_grad():
        got, want = p(x, index, weights), experts(x, index, weights)
    assert got.dtype == dtype and torch.equal(got, want)


def test_experts_forms_it_cannot_pack_are_one_line_errors():
    experts = _build("mixtral").model.layers[0].mlp.experts
    experts.down_proj_bias = torch.nn.Parameter(torch.zeros(4, 32))
    with pytest.raises(LayerlabError, match=r"^quantize supports experts with 3-d weights only; .*down_proj_bias$"):
        check_experts(experts, "model.layers.0.mlp.experts")
    del experts.down_proj_bias
    experts.is_transposed = True
    with pytest.raises(LayerlabError, match=r"^quantize does not support experts stored as \(experts, in, out\)"):
        check_experts(experts)
