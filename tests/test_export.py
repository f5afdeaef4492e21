"""Parity with Hugging Face GPT-2, both directions (the `export --to gpt2` path), and the folded export of
batch norms (`export --to folded`), checked against the unfolded model on text and random ids."""

import json

import pytest
import torch
from conftest import digest, perturb, save_model, tiny_cfg
from transformers import GPT2LMHeadModel

import layerlab
from layerlab.adapters import load_model
from layerlab.data import ByteTokenizer, embedded_documents
from layerlab.errors import LayerlabError
from layerlab.export import WRITERS, export, fold_norms, from_gpt2, gpt2_config, to_gpt2
from layerlab.norms import set_norm_schedule
from layerlab.registry import EXPORT_TARGETS


@pytest.mark.parametrize("tie", [True, False])
def test_layerlab_to_gpt2_logits_are_equal(tie):
    cfg = tiny_cfg(layers=3, width=48, heads=3, context=24, vocab_size=100, tie_embeddings=tie)
    ours = perturb(layerlab.build_model(cfg)).eval()
    theirs = to_gpt2(ours).eval()
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(x).logits, ours(x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_to_layerlab_logits_are_equal(tie):
    torch.manual_seed(0)
    cfg = tiny_cfg(layers=2, width=32, heads=4, context=20, vocab_size=90, tie_embeddings=tie)
    theirs = perturb(GPT2LMHeadModel(gpt2_config(cfg))).eval()
    ours = from_gpt2(theirs).eval()
    x = torch.randint(0, 90, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits)
    assert (ours.lm_head.weight is ours.embed.weight) == tie


@pytest.mark.parametrize("change", [dict(norm="rmsnorm"), dict(placement="peri"), dict(positions="rope"),
                                    dict(mlp="swiglu")])
def test_non_gpt2_designs_are_refused_with_the_reason(change):
    model = layerlab.build_model(tiny_cfg(**change))
    with pytest.raises(LayerlabError, match="cannot export to gpt2: .* GPT-2 needs"):
        to_gpt2(model)


# ---------------------------------------------------------------- --to folded

VOCAB = 257  # the byte tokenizer's: bytes and end-of-text


def _text_ids(n: int) -> torch.Tensor:
    """``n`` byte ids of real English text (the embedded corpus)."""
    text = b"".join(embedded_documents())
    ids = ByteTokenizer().encode(text[: 4 * n].decode("utf-8", "replace"))[:n]
    return torch.as_tensor([int(i) for i in ids], dtype=torch.long)


def _trained(steps: int, schedule: int, **cfg):
    """A model trained ``steps`` AdamW steps on text, its PRepBN schedule ``schedule`` training forwards long:
    every weight, η, BN affine and running statistic has left its init."""
    torch.manual_seed(0)
    model = layerlab.build_model(tiny_cfg(vocab_size=VOCAB, context=32, **cfg))
    set_norm_schedule(model, schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ids = _text_ids(4096)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=g).tolist()
        batch = torch.stack([ids[s : s + 32] for s in starts])
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _batch_norms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]


FOLDED = {  # id -> config: SLAB's pre-norm case, and every placement whose norms sit next to a linear layer
    "prepbn-pre-tied": dict(norm="prepbn"),
    "prepbn-lns-nobias": dict(norm="prepbn", placement="lns", bias=False),
    "prepbn-sandwich-untied": dict(norm="prepbn", placement="sandwich", tie_embeddings=False),
    "batchnorm-peri": dict(norm="batchnorm", placement="peri"),
    "batchnorm-per-block-dropped": dict(norm="batchnorm", placement=["pre", "peri", "lns"], drop_mlp=[1], bias=False),
}


@pytest.mark.parametrize("cfg", FOLDED.values(), ids=FOLDED.keys())
def test_folded_export_has_the_same_logits(tmp_path, cfg):
    """export --to folded writes a norm-free layerlab model whose logits equal the trained model's in eval (to
    float32 rounding) on text and on random ids; the input directory is untouched."""
    model = _trained(steps=8, schedule=4, **cfg)
    bns = _batch_norms(model)
    assert bns and all(m.running_mean.abs().min() > 0 and (m.running_var - 1).abs().min() > 0 for _, m in bns)
    assert all(m.weight.abs().min() > 0 and m.bias.abs().min() > 0 for _, m in bns)
    for name, m in model.named_modules():
        if hasattr(m, "repbn"):
            assert m.gamma == 0.0 and m.repbn.eta.detach().abs().item() > 0, name
    src = save_model(model, tmp_path / "run")
    before = digest(src)
    out = export(src, to="folded", out=tmp_path / "folded")
    assert digest(src) == before
    folded = load_model(out).model
    assert folded.cfg.norm == "none" and not _batch_norms(folded)
    assert not [n for n, _ in folded.named_parameters() if n.startswith("ln_f") or ".ln" in n or "norm" in n]
    text = _text_ids(4096)[-64:].view(2, 32)
    rand = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ids in (text, rand):
            want = model(ids).logits
            assert want.abs().max() > 0.5, "a model whose logits are all near zero would prove little"
            torch.testing.assert_close(folded(ids).logits, want)
    results = json.loads((out / "layerlab.json").read_text())["results"]
    assert results["max_abs_logit_diff"] < 1e-5 and "ln_f -> lm_head" in results["folded"]
    assert (folded.lm_head.weight is folded.embed.weight) is False


def test_folded_export_runs_the_toolkit(tmp_path):
    """The folded model is an ordinary layerlab model directory: analyze measures it, with the loss of the
    unfolded model, and it generates."""
    from layerlab.analysis import analyze_model

    src = save_model(_trained(steps=8, schedule=4, norm="prepbn"), tmp_path / "run")
    out = export(src, to="folded", out=tmp_path / "folded")
    kw = dict(path=None, tokens=128, removal_tokens=128, spectra=False, intrinsic=False, progress=False)
    entries = [analyze_model(*load_model(d)[:2], name=d.name, **kw) for d in (src, out)]
    assert len(entries[1]["layers"]) == 3
    assert entries[1]["loss"] == pytest.approx(entries[0]["loss"], rel=1e-5)
    ids = load_model(out).model.generate(torch.tensor([[104, 105]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 5)


@pytest.mark.parametrize("cfg, message", [
    (dict(norm="prepbn", steps=2, schedule=4), r"cannot fold prepbn while γ = 0\.5 > 0 \(2 of 4 training forwards"),
    (dict(norm="batchnorm", placement="post"), r"cannot fold the norms of block 0 \(placement 'post'\): .*"
                                                 r"placements that fold: pre, peri, lns, sandwich$"),
    (dict(norm="batchnorm", placement="mix", mix_alpha=0.34), r"block 0 \(placement 'post'\)"),
    (dict(norm="layernorm"), r"needs a norm that is a fixed per-channel affine in eval \(batchnorm, prepbn.*\); "
                             r"this model's norm is 'layernorm'"),
], ids=["prepbn-gamma", "post", "mix", "layernorm"])
def test_what_cannot_fold_is_refused_in_one_line(tmp_path, cfg, message):
    steps, schedule = cfg.pop("steps", 1), cfg.pop("schedule", 1)
    src = save_model(_trained(steps=steps, schedule=schedule, **cfg), tmp_path / "run")
    with pytest.raises(LayerlabError, match=message) as e:
        export(src, to="folded", out=tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_every_export_target_has_a_writer():
    assert set(WRITERS) == set(EXPORT_TARGETS)


def test_fold_check_catches_a_wrong_fold(monkeypatch):
    """fold_norms compares the folded model with the original before anything is written: a fold that drops
    η (RepBN's η·x) is caught."""
    from layerlab.norms import RepBN

    model = _trained(steps=4, schedule=4, norm="prepbn")
    right = RepBN.eval_affine
    monkeypatch.setattr(RepBN, "eval_affine", lambda self: (right(self)[0] - self.eta.detach(), right(self)[1]))
    with pytest.raises(LayerlabError, match="the folded model's logits differ from the original's by up to"):
        fold_norms(model)
