"""quantize: packing round trips, the exact allocator, each importance on known models, the packed directory."""

import importlib
import itertools
import json
import math
import random
from fractions import Fraction

import pytest
import torch
from conftest import digest, idle_blocks, perturb, save_model, tiny_cfg
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import layerlab
from layerlab.compress import allocate, quantize, quantize_lines
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
def _brute_force(sizes, bits, widths, cost, fill=False):
    """(key, assignment) of the best of all assignments, enumerated; None if none fits the budget. The budget,
    ``bits`` x the total weights, is compared exactly (``bits`` as the decimal it is written as). The key is
    the summed cost (Hubara et al.'s integer program), or with ``fill`` (LWQ) (-size, cost): the fullest first."""
    budget = Fraction(str(bits)) * sum(sizes)
    best = None
    for combo in itertools.product(widths, repeat=len(sizes)):
        if any(w not in c for w, c in zip(combo, cost)):
            continue
        used = sum(s * w for s, w in zip(sizes, combo))
        if used > budget:
            continue
        total = sum(c[w] for w, c in zip(combo, cost))
        key = (-used, total) if fill else (total,)
        if best is None or key < best[0]:
            best = (key, combo)
    return best


def _used(sizes, alloc):
    return sum(s * w for s, w in zip(sizes, alloc))


def test_integer_program_is_optimal_against_brute_force():
    """min sum of loss deltas s.t. size <= budget, on random small instances, against all assignments. The
    deltas are noisy, as measured ones are, and often negative: many optima leave part of the budget unused,
    which a budget-filling allocator cannot find."""
    widths = (2, 3, 4, 8)
    below = 0
    for seed in range(60):
        rng = random.Random(seed)
        n = rng.randint(2, 6)
        sizes = [rng.choice([64, 128, 192, 256]) if seed % 2 else rng.randint(1, 300) for _ in range(n)]
        cost = [{w: rng.gauss(0.3, 1.0) / w for w in widths if w == 2 or rng.random() > 0.15} for _ in range(n)]
        bits = round(rng.uniform(2.0, 7.5), 2)
        (best_cost,), _ = _brute_force(sizes, bits, widths, cost)
        alloc = allocate(sizes, bits, widths, cost)
        assert all(w in c for w, c in zip(alloc, cost))
        assert _used(sizes, alloc) <= Fraction(str(bits)) * sum(sizes), f"seed {seed}: over the budget"
        assert sum(c[w] for w, c in zip(alloc, cost)) == pytest.approx(best_cost, abs=1e-12), f"seed {seed}"
        (_, fill_cost), _ = _brute_force(sizes, bits, widths, cost, fill=True)
        below += fill_cost > best_cost + 1e-9  # the fullest assignments all cost more: the optimum leaves bits unused
    assert below >= 15, f"only {below} of 60 instances have their optimum below the budget"


def test_integer_program_uses_less_than_the_budget_when_fewer_bits_measure_better():
    """Every block measures better at 2 bits than at any other width: the optimum is 2 bits everywhere,
    an average of 2 under a budget of 3.5 (by hand: any wider block only adds cost)."""
    cost = [{2: -0.01 * (i + 1), 3: 0.0, 4: 0.0, 8: 0.0} for i in range(4)]
    assert allocate([100, 200, 100, 300], 3.5, (2, 3, 4, 8), cost) == [2, 2, 2, 2]
    # one block loses at 2 bits: it gets the cheapest width that fits, 3 (cost 0) rather than 8 (cost 0, larger)
    cost[1] = {2: 0.5, 3: 0.0, 4: 0.0, 8: 0.0}
    assert allocate([100, 200, 100, 300], 3.5, (2, 3, 4, 8), cost) == [2, 3, 2, 2]
    with pytest.raises(LayerlabError, match="no assignment of widths"):
        allocate([1, 1], 2.5, (2, 3, 4, 8), [{3: 0.0}, {3: 0.0}])  # 3 bits each: over the budget


def _table_dp(units, bits, widths, cost):
    """An independent exact solver for the integer program: least cost for every exact total of bit-units."""
    budget = math.floor(Fraction(str(bits)) * sum(units))
    best = {0: 0.0}
    for u, c in zip(units, cost):
        new = {}
        for s, v in best.items():
            for w in widths:
                if w in c and s + u * w <= budget and v + c[w] < new.get(s + u * w, math.inf):
                    new[s + u * w] = v + c[w]
        best = new
    return min(best.values())


@pytest.mark.parametrize("sizes", ["equal", "two kinds"])
def test_integer_program_is_exact_at_real_shapes(sizes):
    """80 blocks x 4 widths, the sizes of a 70B-parameter Llama block (or blocks of two sizes), measured-like
    deltas: the same optimum as an independent table over the budget."""
    rng = random.Random(0)
    block = 4 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    n = 80
    sizes = [block] * n if sizes == "equal" else [block if rng.random() < 0.5 else block // 2 for _ in range(n)]
    cost = [{w: abs(rng.gauss(1, 0.5)) * 4.0 ** -w + rng.gauss(0, 1e-3) for w in (2, 3, 4, 8)} for _ in range(n)]
    for bits in (2.5, 3.25, 4.0, 6.5):
        alloc = allocate(sizes, bits, (2, 3, 4, 8), cost)
        assert _used(sizes, alloc) <= bits * sum(sizes)
        g = math.gcd(*sizes)
        expect = _table_dp([s // g for s in sizes], bits, (2, 3, 4, 8), cost)
        assert sum(c[w] for w, c in zip(alloc, cost)) == pytest.approx(expect, abs=1e-12)


@pytest.mark.parametrize("bits", [2.5, 3.0, 3.25, 3.5, 5.0, 7.0])
def test_allocator_hits_the_budget_exactly(bits):
    sizes = [1000] * 12
    alloc = allocate(sizes, bits, (2, 3, 4, 8), ranked_cost(list(range(12)), bits, (2, 3, 4, 8)), fill=True)
    assert sum(s * b for s, b in zip(sizes, alloc)) / sum(sizes) == bits


@pytest.mark.parametrize("seed", range(6))
def test_filling_allocator_is_optimal_against_brute_force(seed):
    """LWQ's rule (``fill``): the fullest average within the budget, then the least cost."""
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    sizes = [rng.choice([64, 128, 192, 256]) for _ in range(n)]
    widths = (2, 3, 4, 8)
    cost = [{w: rng.random() * (9 - w) for w in widths if rng.random() > 0.1 or w == 8} for _ in range(n)]
    bits = round(rng.uniform(2.2, 7.5), 2)
    if _brute_force(sizes, bits, widths, cost, fill=True) is None:
        with pytest.raises(LayerlabError):
            allocate(sizes, bits, widths, cost, fill=True)
        return
    (neg_used, best_cost), _ = _brute_force(sizes, bits, widths, cost, fill=True)
    alloc = allocate(sizes, bits, widths, cost, fill=True)
    assert _used(sizes, alloc) == -neg_used
    assert sum(c[w] for w, c in zip(alloc, cost)) == pytest.approx(best_cost)


def test_ranked_allocation_gives_the_most_important_blocks_the_higher_width():
    importance = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]
    alloc = allocate([10] * 6, 3.5, (2, 3, 4, 8), ranked_cost(importance, 3.5, (2, 3, 4, 8)), fill=True)
    assert alloc == [3, 4, 3, 4, 4, 3]


# ---------------------------------------------------------------------------- importance on known models
def test_lim_ranks_blocks_that_change_nothing_lowest():
    torch.manual_seed(0)
    model = idle_blocks(perturb(layerlab.build_model(tiny_cfg(layers=4))), [1, 2]).eval()
    held = [(torch.randint(0, 64, (2, 16)), torch.ones(2, 16, dtype=torch.long))]
    lim, fidelity = lim_scores(model, held)
    assert fidelity["passed"] and fidelity["max_abs_logit_diff"] == 0.0  # float32 on CPU: the same forward
    assert lim[1] == pytest.approx(0, abs=1e-6) and lim[2] == pytest.approx(0, abs=1e-6)
    assert min(lim[0], lim[3]) > 1e-4
    alloc = allocate([1] * 4, 3.0, (2, 4), ranked_cost(lim, 3.0, (2, 4)), fill=True)
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
    alloc = allocate([1] * 3, 8 / 3, (2, 4), ranked_cost([1 - z for z in zd], 8 / 3, (2, 4)), fill=True)
    assert alloc == [2, 2, 4]


# ---------------------------------------------------------------------------- the command
def loaded_avg_bits(out) -> float:
    return json.loads((out / "config.json").read_text())["quantization_config"]["avg_bits"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(layers=4, width=64, context=64, vocab_size=259)), 0.02)
    return save_model(model, tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("importance,output", [("lim", "compressed-tensors"), ("zd", "compressed-tensors"),
                                               ("loss", "compressed-tensors"), ("lim", "layerlab")])
def test_quantize_writes_a_packed_model_that_loads_back(small, tmp_path, importance, output):
    before = digest(small)
    record = quantize(small, bits=3.5, out=tmp_path / "q", importance=importance, group=32, output=output,
                      **QUIET)
    assert record["format"] == output and record["format_note"] is None
    assert digest(small) == before  # the input is never modified
    out = tmp_path / "q"
    manifest = json.loads((out / "layerlab.json").read_text())
    assert manifest["command"] == "quantize" and manifest["args"]["bits"] == 3.5
    alloc = manifest["allocation"]
    assert manifest["budget_bits"] == 3.5 and manifest["after"]["avg_bits"] == sum(alloc) / 4
    assert set(alloc) <= {2, 3, 4, 8}
    if importance != "loss":  # LWQ's rule uses the two widths around --bits and fills the budget
        assert sorted(alloc) == [3, 3, 4, 4]
    else:  # the integer program may use any width, and less than the budget
        assert sum(alloc) / 4 <= 3.5
    assert loaded_avg_bits(out) == sum(alloc) / 4
    assert set(manifest["runs"]) == {"original", "uniform 3", "uniform 4", "random order", importance}
    runs = record["runs"]
    assert runs["uniform 3"]["bytes"] < runs["random order"]["bytes"] < runs["uniform 4"]["bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    if output == "layerlab":
        packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
        assert len(packed) == 4 * 4 and [loaded.blocks[i].mlp.fc.bits for i in range(4)] == alloc
    else:  # compressed-tensors' own modules, one config group (one width) per block
        packed = [m for m in loaded.modules() if getattr(m, "quantization_scheme", None) is not None]
        assert len(packed) == 4 * 4
        assert [loaded.blocks[i].mlp.fc.quantization_scheme.weights.num_bits for i in range(4)] == alloc
    # the file holds the packed codes: block weights at ~3.5 bits plus group scales, the rest in fp32
    original_bytes = (small / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < original_bytes * 0.6
    from layerlab.evaluate import evaluate

    assert evaluate(out, tokens=256)["loss"] == pytest.approx(manifest["after"]["loss"], abs=1e-5)


def test_the_loss_program_records_the_bits_it_uses(small, tmp_path, monkeypatch):
    """With deltas by which 2 bits measure best in every block (stand-ins for measured ones, which can be
    negative), the program uses 2 bits under a 3.5-bit budget, and the record, the printed lines, the
    manifest and the written config all give 2.0 next to the budget of 3.5."""
    qmod = importlib.import_module("layerlab.compress.quantize")  # the module; the package exports quantize()
    monkeypatch.setattr(qmod, "loss_deltas", lambda q, held, widths, progress=False:
                        [{w: -0.01 if w == 2 else 0.0 for w in widths} for _ in q.blocks])
    rec = quantize(small, bits=3.5, out=tmp_path / "q", importance="loss", group=32, **QUIET)
    assert rec["allocation"] == [2, 2, 2, 2] and rec["budget_bits"] == 3.5 and rec["after"]["avg_bits"] == 2.0
    assert rec["after"]["bytes"] < rec["runs"]["uniform 3"]["bytes"]
    lines = quantize_lines(rec)
    assert "average 2.000 bits per block weight, of a budget of 3.5" in lines
    man = json.loads((tmp_path / "q" / "layerlab.json").read_text())
    assert man["budget_bits"] == 3.5 and man["after"]["avg_bits"] == 2.0 and loaded_avg_bits(tmp_path / "q") == 2.0


@pytest.mark.parametrize("importance", ["lim", "zd", "loss"])
def test_importance_is_measured_on_the_training_split_and_scored_on_the_validation_split(
        small, tmp_path, monkeypatch, importance):
    """Every window the importance reads lies in the training split of the embedded corpus, every window
    the perplexities read in the validation split (both built by hand in test_prune); ZD reads no text."""
    from test_prune import _embedded_splits, _rows, record_reads

    reads = record_reads(monkeypatch, importlib.import_module("layerlab.compress.quantize"))
    rec = quantize(small, bits=3.5, out=tmp_path / "q", importance=importance, group=32, baselines=False, **QUIET)
    train, val = _embedded_splits()
    chosen, scored = _rows(reads, "choose"), _rows(reads, "score")
    assert scored and all(r in val for r in scored)
    if importance == "zd":
        assert not chosen and rec["chosen_on"] is None
        assert "chosen on the weights alone (no text)" in quantize_lines(rec)
        return
    outside = [r for r in chosen if r not in train]
    assert chosen and not outside, f"{len(outside)} of {len(chosen)} windows read are not training text"
    assert sum(map(len, chosen)) == 256
    assert rec["chosen_on"] == f"embedded train split, first 256 of {len(train):,} tokens"
    assert rec["before"]["slice"] == f"embedded validation split, first 256 of {len(val):,} tokens"
    assert f"chosen on the {rec['chosen_on']}" in quantize_lines(rec)


@pytest.mark.parametrize("importance", ["lim", "loss"])
def test_with_own_data_the_importance_reads_only_training_text(small, tmp_path, monkeypatch, importance):
    """A user's corpus whose two splits share no letter (test_prune): asked for more calibration tokens than
    the training split holds, the importance reads training letters only, the perplexities validation ones."""
    from test_prune import _rows, _two_alphabet_corpus, record_reads

    data = _two_alphabet_corpus(tmp_path / "corpus.jsonl")
    reads = record_reads(monkeypatch, importlib.import_module("layerlab.compress.quantize"))
    rec = quantize(small, bits=3, widths=(2, 4), out=tmp_path / "q", importance=importance, group=32,
                   baselines=False, data=str(data), tokens=None, calibration_tokens=12_000)
    letters = {p: {c for row in _rows(reads, p) for c in row} - {chr(256)} for p in ("choose", "score")}
    assert letters["choose"] <= set("abcdefghijklm") and len(letters["choose"]) == 13
    assert letters["score"] <= set("nopqrstuvwxyz") and len(letters["score"]) == 13
    assert rec["chosen_on"] == f"{data} train split, first 8,960 of 9,000 tokens"  # 140 whole windows of 64
    assert rec["before"]["slice"] == f"{data} validation split, all 1,000 tokens"


def test_quantized_gpt2_loads_with_the_hugging_face_class(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=259, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    src = save_model(gpt2, tmp_path / "gpt2")
    quantize(src, bits=2.5, out=tmp_path / "q", importance="zd", widths=(2, 3), group=32, output="layerlab",
             **QUIET)
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
    assert "average 3.000 bits per block weight, of a budget of 3\n" in r.output
    assert "chosen on the embedded train split, first 256 of" in r.output
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


@pytest.mark.parametrize("first", ["import layerlab.packed", "import transformers, layerlab.packed"])
def test_the_package_imports_in_any_order(first):
    """Importing ``layerlab.packed`` before transformers used to fail: transformers' import registers layerlab's
    model, whose module imports ``layerlab.packed`` while it was half-initialised."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", f"{first}; from layerlab.packed import PackedLinear, register_quantizer"
                        "; register_quantizer(); import transformers; print(transformers.AutoConfig)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
