"""quantize: packing round trips, the exact allocator, each importance on known models, the packed directory."""

import itertools
import json
import random

import pytest
import torch
from conftest import digest, idle_blocks, perturb, save_model, tiny_cfg
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import layerlab
from layerlab.compress import allocate, quantize
from layerlab.compress.quantize import Quantizer, lim_scores, ranked_cost, zd_scores
from layerlab.errors import LayerlabError
from layerlab.packed import (
    PACKED,
    TORCHAO,
    PackedLinear,
    dequantize_groups,
    pack_bits,
    quantize_groups,
    torchao_int8,
    unpack_bits,
)

QUIET = {"tokens": 256, "calibration_tokens": 256}


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)  # really bits/8 bytes a value
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_pack_uses_every_bit():
    """All-ones codes pack to all-0xFF bytes: no bit of the storage is wasted."""
    for bits in (2, 3, 5):
        assert torch.equal(pack_bits(torch.full((16,), (1 << bits) - 1, dtype=torch.uint8), bits),
                           torch.full((2 * bits,), 255, dtype=torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [64, 40])  # 40: the last group is padded
def test_group_quantization_error_is_within_half_a_step(bits, in_features):
    w = torch.randn(6, in_features, generator=torch.Generator().manual_seed(0))
    codes, scale, offset = quantize_groups(w, bits, 16)
    assert codes.shape == (6, 64 if in_features == 64 else 48) and int(codes.max()) < (1 << bits)
    back = dequantize_groups(codes, scale, offset, in_features)
    step = scale.float().repeat_interleave(16, dim=1)[:, :in_features]
    assert ((back - w).abs() <= step / 2 + 2e-3 * w.abs().amax()).all()  # half a step, plus float16 rounding
    assert (back - w).abs().max() > 0  # it did quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_equals_its_dequantized_weight(bits):
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(24, 32, generator=g), torch.randn(24, generator=g), torch.randn(5, 32, generator=g)
    m = PackedLinear.from_weight(w, b, bits=bits, group=16)
    assert m.fmt == (TORCHAO if bits == 8 and torchao_int8() is not None else PACKED)
    torch.testing.assert_close(m(x), x @ m.dequantized().T + b)
    err = (m.dequantized() - w).abs().mean()
    assert err < {2: 0.4, 3: 0.2, 4: 0.1, 8: 0.01}[bits]


# ---------------------------------------------------------------------------- allocation
def _brute_force(sizes, bits, widths, cost):
    budget = bits * sum(sizes) + 1e-9
    best = None
    for combo in itertools.product(widths, repeat=len(sizes)):
        if any(w not in c for w, c in zip(combo, cost)):
            continue
        used = sum(s * w for s, w in zip(sizes, combo))
        if used > budget:
            continue
        key = (-used, sum(c[w] for w, c in zip(combo, cost)))  # fill the budget first, then least cost
        if best is None or key < best[0]:
            best = (key, combo)
    return best


@pytest.mark.parametrize("bits", [2.5, 3.0, 3.25, 3.5, 5.0, 7.0])
def test_allocator_hits_the_budget_exactly(bits):
    sizes = [1000] * 12
    alloc = allocate(sizes, bits, (2, 3, 4, 8), ranked_cost(list(range(12)), bits, (2, 3, 4, 8)))
    assert sum(s * b for s, b in zip(sizes, alloc)) / sum(sizes) == bits


@pytest.mark.parametrize("seed", range(6))
def test_allocator_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    sizes = [rng.choice([64, 128, 192, 256]) for _ in range(n)]
    widths = (2, 3, 4, 8)
    cost = [{w: rng.random() * (9 - w) for w in widths if rng.random() > 0.1 or w == 8} for _ in range(n)]
    bits = round(rng.uniform(2.2, 7.5), 2)
    if _brute_force(sizes, bits, widths, cost) is None:
        with pytest.raises(LayerlabError):
            allocate(sizes, bits, widths, cost)
        return
    (neg_used, best_cost), _ = _brute_force(sizes, bits, widths, cost)
    alloc = allocate(sizes, bits, widths, cost)
    assert sum(s * w for s, w in zip(sizes, alloc)) == -neg_used
    assert sum(c[w] for w, c in zip(alloc, cost)) == pytest.approx(best_cost)


def test_ranked_allocation_gives_the_most_important_blocks_the_higher_width():
    importance = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]
    alloc = allocate([10] * 6, 3.5, (2, 3, 4, 8), ranked_cost(importance, 3.5, (2, 3, 4, 8)))
    assert alloc == [3, 4, 3, 4, 4, 3]


# ---------------------------------------------------------------------------- importance on known models
def test_lim_ranks_blocks_that_change_nothing_lowest():
    torch.manual_seed(0)
    model = idle_blocks(perturb(layerlab.build_model(tiny_cfg(layers=4))), [1, 2]).eval()
    held = [(torch.randint(0, 64, (2, 16)), torch.ones(2, 16, dtype=torch.long))]
    lim = lim_scores(model, held)
    assert lim[1] == pytest.approx(0, abs=1e-6) and lim[2] == pytest.approx(0, abs=1e-6)
    assert min(lim[0], lim[3]) > 1e-4
    alloc = allocate([1] * 4, 3.0, (2, 4), ranked_cost(lim, 3.0, (2, 4)))
    assert alloc == [4, 2, 2, 4]


def test_zd_is_the_share_beyond_one_std():
    torch.manual_seed(0)
    model = layerlab.build_model(tiny_cfg(layers=3)).eval()
    with torch.no_grad():
        for m in model.blocks[1].modules():
            if isinstance(m, torch.nn.Linear):  # uniform: a share 1 - 1/sqrt(3) lies beyond one std
                m.weight.copy_(torch.rand_like(m.weight))
        for m in model.blocks[2].modules():
            if isinstance(m, torch.nn.Linear):  # sparse spikes: only the 1% of spikes lie beyond one std
                m.weight.copy_((torch.rand_like(m.weight) < 0.01).float() * 5)
    zd = zd_scores(Quantizer(model, 16))
    assert zd[1] == pytest.approx(1 - 1 / 3**0.5, abs=0.03)
    assert zd[2] == pytest.approx(0.01, abs=0.006)
    assert zd[0] == pytest.approx(0.317, abs=0.04)  # Gaussian init
    # smaller ZD is more important (LWQ): the spiky block gets the higher width
    alloc = allocate([1] * 3, 8 / 3, (2, 4), ranked_cost([1 - z for z in zd], 8 / 3, (2, 4)))
    assert alloc == [2, 2, 4]


# ---------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(layers=4, width=64, context=64, vocab_size=259)), 0.02)
    return save_model(model, tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("importance", ["lim", "zd", "loss"])
def test_quantize_writes_a_packed_model_that_loads_back(small, tmp_path, importance):
    before = digest(small)
    record = quantize(small, bits=3.5, out=tmp_path / "q", importance=importance, group=32, **QUIET)
    assert digest(small) == before  # the input is never modified
    out = tmp_path / "q"
    manifest = json.loads((out / "layerlab.json").read_text())
    assert manifest["command"] == "quantize" and manifest["args"]["bits"] == 3.5
    alloc = manifest["allocation"]
    assert sum(alloc) / 4 == 3.5 and manifest["after"]["avg_bits"] == 3.5 and set(alloc) <= {2, 3, 4, 8}
    if importance != "loss":  # LWQ's rule uses the two widths around --bits; the integer program may use any
        assert sorted(alloc) == [3, 3, 4, 4]
    assert set(manifest["runs"]) == {"original", "uniform 3", "uniform 4", "random order", importance}
    runs = record["runs"]
    assert runs["uniform 3"]["bytes"] < runs["random order"]["bytes"] < runs["uniform 4"]["bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * 4 and [loaded.blocks[i].mlp.fc.bits for i in range(4)] == alloc
    # the file holds the packed codes: block weights at ~3.5 bits plus group scales, the rest in fp32
    original_bytes = (small / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < original_bytes * 0.6
    from layerlab.evaluate import evaluate

    assert evaluate(out, tokens=256)["loss"] == pytest.approx(manifest["after"]["loss"], abs=1e-5)


def test_quantized_gpt2_loads_with_the_hugging_face_class(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=259, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    src = save_model(gpt2, tmp_path / "gpt2")
    quantize(src, bits=2.5, out=tmp_path / "q", importance="zd", widths=(2, 3), group=32, **QUIET)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(loaded) is GPT2LMHeadModel and isinstance(loaded.transformer.h[0].attn.c_attn, PackedLinear)
    ids = torch.randint(0, 259, (2, 12))
    ref = loaded(ids).logits
    q = Quantizer(gpt2, 32)  # the same widths applied in memory give the same logits
    alloc = json.loads((tmp_path / "q" / "layerlab.json").read_text())["allocation"]
    torch.testing.assert_close(q.quantized_copy(alloc)(ids).logits, ref)
    assert loaded.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


def test_bad_arguments_are_one_line_errors(small, tmp_path):
    for kwargs, message in [
        ({"bits": 9}, "--bits must be between 2 and 8"),
        ({"bits": 1.5}, "--bits must be between"),
        ({"bits": 3, "importance": "hessian"}, "importance"),
        ({"bits": 3, "group": 12}, "--group"),
        ({"bits": 3, "widths": (0, 4)}, "--widths"),
    ]:
        with pytest.raises(LayerlabError, match=message):
            quantize(small, out=tmp_path / "x", **{**QUIET, **kwargs})
    with pytest.raises(LayerlabError, match="input directory"):
        quantize(small, bits=3, out=small / "inside", **QUIET)
    assert not (tmp_path / "x").exists()


def test_cli_quantize(small, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, ["quantize", str(small), "--bits", "3", "--widths", "2,4", "--group", "32",
                                 "--tokens", "256", "--calibration-tokens", "256", "--no-baselines",
                                 "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "lim" in r.output and "avg bits" in r.output
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "q"), "--bits", "3", "--out", str(tmp_path / "qq")])
    assert isinstance(r.exception, LayerlabError) and "already quantized" in str(r.exception)


def test_without_torchao_eight_bits_use_the_packed_format(monkeypatch):
    import layerlab.packed as packed

    monkeypatch.setattr(packed, "torchao_int8", lambda: None)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    m = PackedLinear.from_weight(w, None, bits=8, group=16)
    assert m.fmt == PACKED and m.qweight.shape == (8, 32)
    assert (m.dequantized() - w).abs().max() < 0.02


def test_a_quantized_model_is_not_pruned_or_converted(small, tmp_path):
    from layerlab.compress import convert, prune

    quantize(small, bits=4, out=tmp_path / "q", baselines=False, group=32, **QUIET)
    with pytest.raises(LayerlabError, match="already quantized; prune the full-precision model"):
        prune(tmp_path / "q", remove=1, out=tmp_path / "p")
    with pytest.raises(LayerlabError, match="already quantized; convert"):
        convert(tmp_path / "q", to="rmsnorm", out=tmp_path / "c")
    from layerlab.evaluate import evaluate  # but analysis and evaluation read it like any model

    assert evaluate(tmp_path / "q", tokens=256)["loss"] > 0
