"""Recursive blocks with layer-wise LoRA (Bae et al., 2024, Relaxed Recursive Transformers) and ``convert --to
recursive``.

Every check compares with a computation written here from the stored tensors: a hand-written forward over the
shared weights and each block's LoRA, hand-averaged plain models, the Eckart-Young error of a truncated SVD, closed
forms for parameter counts."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import dir_tensors, fit_on_bytes, perturb, save_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import layerlab
from layerlab.cli import app, parse_extra
from layerlab.compress.recursive import to_recursive
from layerlab.config import ModelConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.model import num_params
from layerlab.recipe import resolve

V, C, T = 64, 32, 10
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(layers=4, width=C, heads=2, context=32, vocab_size=V), **kw})


def build(seed=0, scale=0.05, **kw):
    torch.manual_seed(seed)
    return perturb(layerlab.build_model(cfg(**kw)), scale=scale, seed=seed).eval()


def ids(B=2, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ a hand-written forward from the state dict


def ref_forward(sd, weight_of, layers, heads=2, gated=False):
    """A Pre-LN GPT written out from the tensors of ``sd``: ``weight_of(i, path)`` gives block i's (out, in) weight,
    the biases and norms are read as ``blocks.{i}.{path}.bias`` / ``blocks.{i}.ln1.weight``."""
    x = ids()
    h = sd["embed.weight"][x] + sd["pos.weight"][:T]
    D = C // heads
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)

    def lin(i, path, a):
        return a @ weight_of(i, path).T + sd[f"blocks.{i}.{path}.bias"]

    def ln(name, a):
        return F.layer_norm(a, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    for i in range(layers):
        a = ln(f"blocks.{i}.ln1", h)
        q, k, v = lin(i, "attn.qkv", a).split(C, dim=-1)
        q, k, v = (t.view(2, T, heads, D).transpose(1, 2) for t in (q, k, v))
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(mask, float("-inf"))
        h = h + lin(i, "attn.proj", (s.softmax(-1) @ v).transpose(1, 2).reshape(2, T, C))
        m = lin(i, "mlp.fc", ln(f"blocks.{i}.ln2", h))
        if gated:
            g, u = m.chunk(2, dim=-1)
            m = F.silu(g) * u
        else:
            m = F.gelu(m, approximate="tanh")
        h = h + lin(i, "mlp.proj", m)
    return ln("ln_f", h) @ sd["embed.weight"].T  # tied head


@pytest.mark.parametrize("layers,loops,rank,mlp", [(4, 2, 3, "gelu"), (6, 3, 0, "gelu"), (6, 2, 5, "swiglu")])
def test_recursive_model_is_a_loop_over_shared_weights_with_per_block_lora(layers, loops, rank, mlp):
    """Block i runs unique block i % K's weights plus its own B_i A_i (CYCLE; Bae et al., Sec. 3)."""
    model = build(layers=layers, loops=loops, loop_lora_rank=rank, mlp=mlp)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    K = layers // loops

    def weight_of(i, path):
        w = sd[f"loop_shared.{i % K}.{path}.weight"]
        return w + sd[f"blocks.{i}.{path}.lora_B"] @ sd[f"blocks.{i}.{path}.lora_A"] if rank else w

    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, ref_forward(sd, weight_of, layers, gated=mlp == "swiglu"),
                                   rtol=1e-5, atol=1e-5)
    assert len(model.blocks) == layers and all(b.attn.qkv.shared is model.loop_shared[i % K].attn.qkv
                                               for i, b in enumerate(model.blocks))
    # hidden states: one per block (and the final one), as for any L-block model
    with torch.no_grad():
        assert len(model(ids(), output_hidden_states=True).hidden_states) == layers + 1


def test_shared_weights_are_stored_once_and_counted_once(tmp_path):
    L, N, r = 6, 3, 4
    K = L // N
    model = build(layers=L, loops=N, loop_lora_rank=r)
    # closed form: embeddings, positions, K x (qkv 3C^2 + proj C^2 + fc 4C^2 + proj 4C^2), per block the biases
    # (3C + C + 4C + C), two LayerNorms (4C) and the LoRA factors r (in + out) of each linear, the final norm
    per_block = 9 * C + 4 * C + r * ((C + 3 * C) + 2 * C + (C + 4 * C) + (4 * C + C))
    expect = V * C + 32 * C + K * 12 * C * C + L * per_block + 2 * C
    assert num_params(model) == expect
    save_model(model, tmp_path)
    stored = dir_tensors(tmp_path)
    weights = sorted(k for k in stored if k.endswith(".weight") and any(p in k for p in LINEARS))
    assert weights == sorted(f"loop_shared.{k}.{p}.weight" for k in range(K) for p in LINEARS)
    assert sum(v.numel() for k, v in stored.items() if k != "lm_head.weight") == expect
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.blocks[K].mlp.fc.shared is back.loop_shared[0].mlp.fc
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
    # a training step moves the one shared weight through every block that runs it
    back.train()
    back(x, labels=x).loss.backward()
    assert back.loop_shared[0].attn.qkv.weight.grad is not None and back.blocks[L - 1].mlp.fc.lora_B.grad is not None


def test_a_fresh_recursive_model_starts_as_the_plain_recursive_one():
    """From scratch the LoRA's B is zero (Hu et al., 2021): every block of a loop position computes the same."""
    model = layerlab.build_model(cfg(loops=2, loop_lora_rank=4)).eval()
    for b in model.blocks:
        for p in LINEARS:
            lin = b.get_submodule(p)
            assert not lin.lora_B.any() and lin.lora_A.abs().sum() > 0
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, model.blocks[2].attn.qkv.weight, rtol=0, atol=0)


# ------------------------------------------------------------------ conversion: the paper's inits and SVD LoRA

# which blocks of a 6-block model initialise each of the K = 3 unique blocks (2 loops), written out from the paper:
# average ties k with k + K, stepwise takes every N-th block, lower the first K
SOURCES = {"average": [[0, 3], [1, 4], [2, 5]], "stepwise": [[0], [2], [4]], "lower": [[0], [1], [2]]}


@pytest.mark.parametrize("init", sorted(SOURCES))
def test_rank_zero_conversion_equals_a_hand_tied_plain_model(init):
    """At rank 0 the converted model is the plain model whose block i holds the mean of SOURCES[init][i % 3]."""
    plain = build(layers=6, scale=0.1)
    rec = to_recursive(plain, loops=2, rank=0, init=init)
    tied = build(layers=6, scale=0.1)
    sd = tied.state_dict()
    with torch.no_grad():
        for i in range(6):
            for p in LINEARS:
                src = [plain.state_dict()[f"blocks.{j}.{p}.weight"] for j in SOURCES[init][i % 3]]
                sd[f"blocks.{i}.{p}.weight"].copy_(sum(src) / len(src))
        torch.testing.assert_close(rec(ids()).logits, tied(ids()).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rec(ids()).logits, plain(ids()).logits, atol=1e-3)  # tying changed something


@pytest.mark.parametrize("init", sorted(SOURCES))
def test_full_rank_conversion_is_the_original_model(init):
    """With a LoRA of full rank, W_shared + B_i A_i = W_i: the original function to float rounding."""
    plain = build(layers=6, scale=0.1, mlp="swiglu")
    rec = to_recursive(plain, loops=2, rank=C, init=init)
    assert num_params(rec) > num_params(plain)  # full rank stores more than it saves
    with torch.no_grad():
        torch.testing.assert_close(rec(ids()).logits, plain(ids()).logits, rtol=0, atol=1e-4)


def test_partial_rank_lora_is_the_best_approximation_of_the_residual():
    """Eckart-Young: the rank-r LoRA leaves W_i - (W_shared + B A) with spectral norm sigma_{r+1} of the residual
    and Frobenius norm sqrt(sum_{j > r} sigma_j^2)."""
    plain, r = build(layers=4, scale=0.1), 3
    rec = to_recursive(plain, loops=2, rank=r, init="average")
    psd = plain.state_dict()
    for i in range(4):
        for p in LINEARS:
            W = psd[f"blocks.{i}.{p}.weight"].double()
            shared = (psd[f"blocks.{i % 2}.{p}.weight"].double() + psd[f"blocks.{i % 2 + 2}.{p}.weight"].double()) / 2
            sigma = torch.linalg.svdvals(W - shared)
            got = rec.blocks[i].get_submodule(p).weight.detach().double()
            assert float(torch.linalg.matrix_norm(W - got, ord=2)) == pytest.approx(float(sigma[r]), rel=1e-4)
            assert float(torch.linalg.matrix_norm(W - got)) == pytest.approx(float(sigma[r:].norm()), rel=1e-4)


# ------------------------------------------------------------------ names and bad input


def test_loops_are_fields_on_the_command_line_and_in_yaml(tmp_path):
    over = check_fields(parse_extra(["--loops", "3", "--loop-lora-rank=4", "--layers", "6"]), from_text=True,
                        source="command line")
    m = resolve("tiny", None, over).model
    assert (m.layers, m.loops, m.loop_lora_rank) == (6, 3, 4)
    path = tmp_path / "c.yaml"
    path.write_text("layers: 12\nloops: 2\nloop_lora_rank: 8\n")
    m = resolve(None, path, {}).model
    assert (m.loops, m.loop_lora_rank) == (2, 8)


@pytest.mark.parametrize("kw,message", [
    (dict(loops=3), "loops must be a positive divisor of layers 4, got 3"),
    (dict(loops=0), "loops must be a positive divisor of layers 4, got 0"),
    (dict(loops=2, loop_lora_rank=-1), "loop_lora_rank must be non-negative, got -1"),
    (dict(loop_lora_rank=2), "loop_lora_rank 2 needs loops > 1"),
    (dict(loops=2, ffn_sharing="all"), "loops 2 does not combine with ffn_sharing 'all'"),
    (dict(loops=2, drop_mlp=[1]), "loops 2 does not combine with drop_mlp"),
])
def test_bad_loops_are_one_line_errors(kw, message):
    with pytest.raises(LayerlabError, match=message) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


def test_compressors_and_export_refuse_a_recursive_model(tmp_path):
    from layerlab.compress.convert import convert
    from layerlab.compress.prune import prune
    from layerlab.compress.quantize import quantize
    from layerlab.export import export

    d = save_model(build(loops=2, loop_lora_rank=2), tmp_path / "m")
    runs = {"prune": lambda out: prune(d, remove=1, out=out), "quantize": lambda out: quantize(d, bits=4, out=out),
            "convert": lambda out: convert(d, to="rmsnorm", out=out), "export": lambda out: export(d, out=out)}
    for command, run in runs.items():
        with pytest.raises(LayerlabError, match=f"{command} handles layerlab models of the plain design.*loops=2"):
            run(tmp_path / command)
        assert not (tmp_path / command).exists()
    with pytest.raises(LayerlabError, match="convert handles layerlab models of the plain design.*loops=2"):
        convert(d, to="recursive", loops=2, out=tmp_path / "again")
    plain = save_model(build(), tmp_path / "plain")
    with pytest.raises(LayerlabError, match="--loops, --lora-rank, --init and --heal-steps are options of --to "
                                            "recursive"):
        convert(plain, to="rmsnorm", loops=2, out=tmp_path / "rms")
    assert not (tmp_path / "rms").exists()


# ------------------------------------------------------------------ convert --to recursive, end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 4-block Pre-LN model trained 30 steps on the embedded corpus (bytes), saved with its tokenizer."""
    torch.manual_seed(0)
    model = layerlab.build_model(ModelConfig(layers=4, width=C, heads=2, context=32, vocab_size=320))
    return save_model(fit_on_bytes(model, 30, 100_000), tmp_path_factory.mktemp("m") / "trained")


def test_convert_to_recursive_via_the_cli_heals_and_writes_a_model_that_loads(trained, tmp_path):
    out = tmp_path / "rec"
    res = CliRunner().invoke(app, ["convert", str(trained), "--to", "recursive", "--loops", "2", "--lora-rank", "2",
                                   "--init", "stepwise", "--heal-steps", "3", "--tokens", "256", "--no-progress",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 loops, LoRA rank 2, init stepwise" in res.output and "healed" in res.output
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (back.cfg.loops, back.cfg.loop_lora_rank, back.cfg.layers) == (2, 2, 4)
    man = json.loads((out / "layerlab.json").read_text())
    assert man["command"] == "convert" and man["args"]["to"] == "recursive" and man["stages"] == [
        "before", "recursive", "healed"]
    # parameter counts: closed form of the recursive model (K = 2 unique blocks, rank 2; vocab 320, context 32)
    per_block = 13 * C + 2 * (4 * C + 2 * C + 5 * C + 5 * C)
    assert man["recursive"]["params"] == man["healed"]["params"] == 320 * C + 32 * C + 2 * 12 * C * C + 4 * per_block \
        + 2 * C == num_params(back)
    assert man["before"]["params"] == num_params(AutoModelForCausalLM.from_pretrained(trained))
    assert all(math.isfinite(man[s]["loss"]) for s in ("before", "recursive", "healed"))
    # the written model is the healed one: its loss on the same slice is the record's
    from layerlab.data import ByteTokenizer
    from layerlab.evaluate import lm_loss

    assert lm_loss(back, ByteTokenizer(), None, 256)["loss"] == pytest.approx(man["healed"]["loss"], abs=1e-5)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the staging directory is gone

    # bad input is one line, and nothing is written
    for argv, message in [(["--loops", "3"], "--loops 3 does not divide the model's 4 blocks"),
                          ([], "needs --loops N"), (["--loops", "2", "--init", "middle"], "unknown recursive init"),
                          (["--loops", "2", "--lora-rank", "-1"], "--lora-rank must be non-negative")]:
        res = CliRunner().invoke(app, ["convert", str(trained), "--to", "recursive", *argv, "--out",
                                       str(tmp_path / "bad")])
        assert isinstance(res.exception, LayerlabError) and message in str(res.exception), res.output
        assert "\n" not in str(res.exception)
        assert not (tmp_path / "bad").exists()
