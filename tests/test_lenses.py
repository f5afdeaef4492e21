"""The --lenses section (layerlab.analysis.lenses): the logit lens, the linear shortcut (Din et al., 2023) and the
tuned lens (Belrose et al., 2023) per block, fitted on the first 90% of the pass's tokens and evaluated on the rest,
and the early-exit estimate (LayerSkip; Leviathan et al., 2023's speedup), each checked against a computation that
does not go through the section: a least-squares solve on states recorded by hand, the held-out logit lens from
``output_hidden_states``, a simulation of speculative decoding."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, measure_fake_ids, perturb, save_model, tiny_cfg
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from typer.testing import CliRunner

import layerlab
from layerlab.adapters import view
from layerlab.analysis import lenses as lens_mod
from layerlab.analysis.analyze import analyze_model
from layerlab.analysis.sections import SectionContext
from layerlab.cli import app
from layerlab.data import split_ids
from layerlab.errors import LayerlabError
from layerlab.model import build_model
from layerlab.tokenizer import ByteTokenizer

SEQ = 32  # the tiny model's context: the measuring window
TOKENS = 1000  # held out: max(ceil(100), 32) = the last 100 tokens; fit: the first 900


@pytest.fixture(scope="module")
def trained():
    """A 4-block width-32 layerlab model trained for 100 AdamW steps on the embedded corpus's train split (bytes)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(layers=4, width=32, heads=2, context=SEQ, vocab_size=260))
    train = torch.from_numpy(split_ids(ByteTokenizer(), None, "train").astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(0, len(train) - SEQ - 1, (8,), generator=g)
        x = torch.stack([train[s:s + SEQ] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _text_ids() -> list[int]:
    return split_ids(ByteTokenizer(), None, "validation")[: 2 * TOKENS].tolist()


def _ctx(model, ids, tokens=TOKENS, seq_len=SEQ, **options) -> SectionContext:
    return SectionContext(view=view(model), tokenizer=FakeTok(8), ids=ids, tokens=tokens, seq_len=seq_len,
                          batch_size=4, device=torch.device("cpu"), name="m", seed=0, options=options)


@pytest.fixture(scope="module")
def fitted(trained):
    """The section's output on the trained model, with 250 tuned-lens steps (the default)."""
    with torch.no_grad():
        return lens_mod.Lenses().run(_ctx(trained, _text_ids()))


def test_tuned_lens_beats_the_logit_lens_on_held_out_text(fitted):
    rows = fitted.values["lenses"]
    assert [r["block"] for r in rows] == [0, 1, 2, 3]
    for r in rows[:-1]:  # Belrose et al.: the tuned lens is closer to the final distribution at every block
        assert r["tuned_kl"] < r["logit_kl"], r
        assert r["linear_kl"] < r["logit_kl"], r
    last = rows[-1]  # the last block read through the model's own head is the model
    for kind in ("logit", "linear", "tuned"):
        assert last[f"{kind}_kl"] == pytest.approx(0.0, abs=1e-6) and last[f"{kind}_top1"] == 1.0
    assert last["logit_ce"] == last["tuned_ce"] == last["linear_ce"] > 0


def _hand_states(model, windows) -> list[torch.Tensor]:
    """Each block's output at every token of ``windows`` (each run alone), recorded with hooks set up here."""
    out: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: out[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=torch.tensor([w]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([x[0] for x in xs]).double() for xs in out]


def test_linear_shortcut_is_the_least_squares_map_on_the_fit_tokens(trained, fitted):
    ids = _text_ids()
    fit = ids[:900]  # the first 90% of the 1000 tokens
    states = _hand_states(trained, [fit[s:s + SEQ] for s in range(0, len(fit), SEQ)])
    assert states[0].shape[0] == 900
    saved = fitted.artifacts["lenses"]
    assert int(saved["num_layers"]) == 4 and int(saved["hidden_size"]) == 32
    for i in range(3):
        ref = torch.linalg.lstsq(states[i], states[-1], driver="gelsd").solution.T  # h_last ~ A h_i
        torch.testing.assert_close(saved[f"linear.{i}.weight"].double(), ref, rtol=2e-3, atol=2e-4)
    # and it is fitted on the fit split only: the map over all 1000 tokens is measurably another
    every = _hand_states(trained, [ids[s:s + SEQ] for s in range(0, TOKENS, SEQ)])
    other = torch.linalg.lstsq(every[0], every[-1], driver="gelsd").solution.T
    assert (saved["linear.0.weight"].double() - other).abs().max() > 1e-2
    torch.testing.assert_close(saved["linear.3.weight"], torch.eye(32))
    torch.testing.assert_close(saved["tuned.3.weight"], torch.eye(32))


def _lens_reference(model, held: list[int]) -> tuple[list[float], list[float], list[float]]:
    """Held-out logit lens per block from Hugging Face's ``output_hidden_states`` (one window): mean KL(final ||
    lens), mean next-token cross-entropy, top-1 agreement, over the positions that predict a token."""
    with torch.no_grad():
        x = torch.tensor([held])
        out = model(input_ids=x, output_hidden_states=True)
        final = F.log_softmax(out.logits[0, :-1].double(), -1)
        L = model.config.num_hidden_layers
        kl, ce, top = [], [], []
        for i in range(L):
            if i < L - 1:  # hidden_states[i + 1] leaves block i; the last entry is already final-normed
                logp = F.log_softmax(model.lm_head(model.transformer.ln_f(out.hidden_states[i + 1]))[0, :-1]
                                     .double(), -1)
            else:
                logp = final
            kl.append(float((final.exp() * (final - logp)).sum(-1).mean()))
            ce.append(float(F.nll_loss(logp, x[0, 1:])))
            top.append(float((logp.argmax(-1) == final.argmax(-1)).double().mean()))
    return kl, ce, top


V = 320
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                                                   bos_token_id=0, eos_token_id=0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                  num_attention_heads=2, num_key_value_heads=2,
                                                  intermediate_size=64, max_position_embeddings=64)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                         num_attention_heads=2, intermediate_size=64,
                                                         max_position_embeddings=64, use_parallel_residual=True)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_run_and_gpt2s_logit_lens_is_the_hand_computed_one(family, monkeypatch):
    torch.manual_seed(0)
    model = perturb(FAMILIES[family](), scale=0.05).eval()
    tok = FakeTok(V)
    measure_fake_ids(monkeypatch)
    # 400 tokens in windows of 64: the held-out part is one full window (64 > 10%), the last 64 tokens
    entry = analyze_model(model, tok, name="m", path=None, tokens=400, spectra=False, intrinsic=False,
                          progress=False, removal_tokens=0, sections={"lenses": {"steps": 20}})
    rows = entry["lenses"]
    assert len(rows) == 3 and set(lens_mod.KEYS) <= set(rows[0])
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[-1]["logit_kl"] == pytest.approx(0, abs=1e-6) and rows[-1]["logit_top1"] == 1.0
    assert set(entry["_artifacts"]["lenses"]) >= {"linear.0.weight", "tuned.2.bias", "num_layers"}
    if family == "gpt2":
        kl, ce, top = _lens_reference(model, tok.ids[336:400])
        assert [r["logit_kl"] for r in rows] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert [r["logit_ce"] for r in rows] == pytest.approx(ce, rel=1e-5)
        assert [r["logit_top1"] for r in rows] == pytest.approx(top, abs=1e-9)


def _simulated_tokens_per_draft(a: float, d: int, n: int = 200_000) -> float:
    """Speculative decoding with i.i.d. acceptance, simulated: a draft of d tokens is accepted up to the first
    rejection, and the verifier adds one token of its own."""
    accepted = np.random.default_rng(0).random((n, d)) < a
    leading = np.where(accepted.all(1), d, np.argmin(accepted, axis=1))
    return float((leading + 1).mean())


@pytest.mark.parametrize(("a", "c", "d"), [(0.8, 0.25, 3), (0.5, 0.5, 1), (0.95, 1 / 12, 7), (1.0, 0.5, 2)])
def test_early_exit_speedup_is_leviathan_et_al(a, c, d):
    tokens = sum(a ** k for k in range(d + 1))  # 1 + a + ... + a^d, the geometric series in closed form
    assert lens_mod.tokens_per_draft(a, d) == pytest.approx(tokens)
    assert lens_mod.tokens_per_draft(a, d) == pytest.approx(_simulated_tokens_per_draft(a, d), rel=5e-3)
    # each cycle costs d draft steps of c and one full step; it yields the tokens above
    assert lens_mod.speculative_speedup(a, c, d) == pytest.approx(tokens / (d * c + 1))
    assert lens_mod.speculative_speedup(0.8, 0.25, 3) == pytest.approx((1 - 0.8 ** 4) / (0.2 * 1.75))


def test_report_rows_take_the_best_draft_per_exit_block():
    metrics = {f"{k}_{m}": np.zeros(4) for k in lens_mod.LENS_KINDS for m in ("kl", "ce", "top1")}
    metrics["logit_top1"] = np.array([0.9, 0.6, 0.9, 1.0])
    metrics["tuned_top1"] = np.array([0.5, 0.7, 0.95, 1.0])
    rows = lens_mod.lens_rows(metrics)
    for r, a in zip(rows, metrics["logit_top1"]):
        c = (r["block"] + 1) / 4
        brute = {d: (1 - a ** (d + 1)) / ((1 - a) * (d * c + 1)) if a < 1 else 1.0 for d in range(1, 17)}
        best = max(brute.values())
        assert r["early_exit_accept"] == a and r["early_exit_speedup"] == pytest.approx(best)
        assert brute[r["early_exit_draft"]] == pytest.approx(best)
    # a = 0.9 at c = 1/4: d = 5, 6, 7 give 4.6856 / 2.25 = 2.0825, 5.2170 / 2.5 = 2.0868, 5.6953 / 2.75 = 2.0710
    assert rows[0]["early_exit_draft"] == 6 and rows[0]["early_exit_speedup"] == pytest.approx(2.0868, abs=1e-4)
    # a = 0.9 at c = 3/4: d = 1 gives 1.9 / 1.75 = 1.0857, d = 2 gives 2.71 / 2.5 = 1.084
    assert rows[2]["early_exit_draft"] == 1 and rows[2]["early_exit_speedup"] == pytest.approx(1.9 / 1.75)
    assert rows[-1]["early_exit_speedup"] == pytest.approx(1.0)  # drafting with every block gains nothing


def test_lenses_saved_and_loaded_give_the_same_numbers(trained, tmp_path):
    d = save_model(trained, tmp_path / "m")
    (tmp_path / "r1").mkdir()
    quick = dict(tokens=TOKENS, spectra=False, progress=False, removal_tokens=0)
    first = layerlab.analyze(d, sections={"lenses": {"steps": 30}}, **quick)
    entry = first.models[0]
    assert entry["artifacts"] == {"lenses": "lenses.safetensors"}
    first.save_artifacts(tmp_path / "r1")  # what the report writer does beside report.json (report.html skipped)
    saved = load_file(tmp_path / "r1" / "lenses.safetensors")
    # steps 0 would leave the tuned lens at the logit lens: the same numbers show the file was read, not refitted
    for source in (tmp_path / "r1", tmp_path / "r1" / "lenses.safetensors"):
        again = layerlab.analyze(d, sections={"lenses": {"from": source, "steps": 0}}, **quick)
        assert again.models[0]["lenses"] == entry["lenses"]
        assert all(torch.equal(saved[k], again.artifacts["lenses.safetensors"][k]) for k in saved)
    assert any(r["tuned_kl"] != r["logit_kl"] for r in entry["lenses"][:-1])
    # the lenses of another model are refused in one line
    with torch.no_grad():
        other = build_model(tiny_cfg(layers=3, width=32, context=SEQ, vocab_size=260)).eval()
        with pytest.raises(LayerlabError, match="fitted on 4 blocks of width 32; this model has 3 blocks"):
            lens_mod.Lenses().run(_ctx(other, _text_ids(), **{"from": tmp_path / "r1"}))
        wide = build_model(tiny_cfg(layers=4, width=48, heads=2, context=SEQ, vocab_size=260)).eval()
        with pytest.raises(LayerlabError, match="fitted on width 32; this model's is 48"):
            lens_mod.Lenses().run(_ctx(wide, _text_ids(), **{"from": tmp_path / "r1"}))


def test_report_html_draws_the_three_figures(fitted):
    from layerlab.report.html import Page

    page = Page()
    entry = {"name": "m<1>", "lenses": fitted.values["lenses"]}
    lens_mod.Lenses().html(page, [entry], ["m<1>"], ["#1f77b4"])
    html = "".join(page.parts)
    assert page.plots == 3 and html.count("<img") == 3
    for title in ("KL from the final distribution", "Top-1 agreement", "Early exit: implied speedup"):
        assert title in html
    assert "m&lt;1&gt;" in html and "m<1>" not in html  # names are escaped


def test_cli_refuses_a_missing_lenses_file_before_loading(tmp_path):
    d = save_model(build_model(tiny_cfg()), tmp_path / "m")
    r = CliRunner().invoke(app, ["analyze", str(d), "--lenses-from", str(tmp_path / "nope.safetensors"),
                                 "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, LayerlabError) and "no lenses file" in str(r.exception)
    assert not (tmp_path / "o").exists()
    (tmp_path / "x.pt").write_bytes(b"not a lens")
    with pytest.raises(LayerlabError, match="reads a .safetensors file"):
        lens_mod.check_lens_source(tmp_path / "x.pt")


def test_too_few_tokens_is_one_line(trained):
    with pytest.raises(LayerlabError, match="--lenses needs at least 64 tokens"):
        lens_mod.Lenses().run(_ctx(trained, _text_ids()[:60], tokens=60))


def test_an_encoder_gets_none(monkeypatch):
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()
    measure_fake_ids(monkeypatch)
    said = []
    entry = analyze_model(bert, FakeTok(64), name="bert", path=None, tokens=300, spectra=False, progress=False,
                          sections={"lenses": {}}, announce=said.append)
    assert entry["lenses"] is None and "_artifacts" not in entry
    assert any("lenses: bert models have no language-model head" in line for line in said)
