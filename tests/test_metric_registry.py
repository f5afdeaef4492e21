"""The metric registry: each per-layer metric is one entry, and the pass, report.html and the docs follow it."""

import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb, tiny_cfg

import layerlab
from layerlab.analysis.analyze import analyze_model
from layerlab.analysis.metric_docs import UPDATE, layer_entry_lines, metrics_table, render_doc
from layerlab.analysis.metrics import (
    FAMILIES,
    KINDS,
    METRICS,
    Family,
    LayerResults,
    Metric,
    Plot,
    layer_results,
    register_metric,
    registered,
)
from layerlab.errors import LayerlabError
from layerlab.report import render_html

DOC = Path(__file__).resolve().parents[1] / "docs" / "report-format.md"
V = 64

# The per-layer keys of report.json, in order: the contract of docs/report-format.md, which this refactor keeps.
REPORT_KEYS = [
    "index", "placement", "angular_distance", "angular_distance_last_token", "block_influence",
    "relative_contribution", "attn_relative_contribution", "attn_cosine", "mlp_relative_contribution", "mlp_cosine",
    "hidden_rms", "variance_growth", "max_abs_activation", "max_abs", "effective_rank", "prompt_entropy",
    "curvature", "intrinsic_dimension", "anisotropy", "logit_lens_loss", "logit_lens_kl", "removal_loss_delta",
    "removal_effect", "router_entropy", "router_max_share", "esd_alpha", "stable_rank",
]


class _FakeTok:
    """A tokenizer stand-in: fixed random ids that analyze measures as they are (see ``_fake_text``)."""

    pad_token_id = 0
    cls_token_id = sep_token_id = None
    ids = torch.randint(1, V, (4000,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(autouse=True)
def _fake_text(monkeypatch):
    module = importlib.import_module("layerlab.analysis.analyze")
    monkeypatch.setattr(module, "split_ids", lambda tok, data, split: np.asarray(tok.ids))


def _model():
    torch.manual_seed(0)
    return perturb(layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V)), scale=0.02).eval()


def _analyze(model=None, **kw) -> dict:
    kw = {"tokens": 300, "seq_len": 16, "batch_size": 4, "removal_tokens": 64, "spectra": False,
          "intrinsic": False, **kw}
    return analyze_model(model or _model(), _FakeTok(), name="m", path=None, progress=False, **kw)


@pytest.fixture(scope="module")
def entry():
    """One tiny model's report entry, with every accumulator on."""
    mp = pytest.MonkeyPatch()
    module = importlib.import_module("layerlab.analysis.analyze")
    mp.setattr(module, "split_ids", lambda tok, data, split: np.asarray(tok.ids))
    try:
        yield _analyze(spectra=True, intrinsic=True, tokens=600)
    finally:
        mp.undo()


def _headers(page: str) -> list[str]:
    """The per-layer table's column headers, as keys."""
    table = page[page.index('<table class="numbers">'):]
    return [h.replace("<wbr>", "") for h in re.findall(r"<th>(.*?)</th>", table[: table.index("</thead>")])]


def _alts(page: str) -> list[str]:
    return re.findall(r'alt="([^"]*)"', page)


# ---------------------------------------------------------------------------------------------- the contract
def test_doc_matches_the_registry():
    text = DOC.read_text(encoding="utf-8")
    assert render_doc(text) == text, f"docs/report-format.md disagrees with the metric registry; run {UPDATE}"


def test_layer_keys_are_the_report_contract(entry):
    assert list(METRICS) == REPORT_KEYS[2:]
    for layer in entry["layers"]:
        assert list(layer) == REPORT_KEYS
    doc = DOC.read_text(encoding="utf-8")
    for key in REPORT_KEYS:
        assert f'"{key}": ' in doc


def test_table_and_figures_follow_the_registry(entry):
    page = render_html({"models": [entry]})
    expanded = [f"max_abs.{p}" for p in ("resid", "attn", "mlp", "gate")]
    want = [k for key in REPORT_KEYS if key not in METRICS or METRICS[key].table
            for k in (expanded if key == "max_abs" else [key])]
    assert _headers(page) == [k for k in want if k != "removal_effect"]  # a causal LM: no removal effect at all
    titles = re.findall(r"<h3>([^<]*)</h3>", page)
    drawn = [t for t in FAMILIES if t in titles or f"<h2>{t}</h2>" in page]
    # every family with a finite series for this (dense) model is drawn, in registry order; routing is MoE only
    assert drawn == [t for t in FAMILIES if t != "Expert routing"]


@pytest.mark.parametrize("key", list(METRICS))
def test_every_metric_is_declared_in_full_and_measured(key, entry):
    m = METRICS[key]
    assert m.key == key and m.kind in KINDS and m.doc and "\n" not in m.doc
    assert all(p.family in FAMILIES for p in m.plots)
    assert f"`{key}`" in metrics_table() and any(f'"{key}": ' in line for line in layer_entry_lines())
    values = [layer[key] for layer in entry["layers"]]
    if key in ("removal_effect", "router_entropy", "router_max_share"):  # encoders only; MoE blocks only
        assert values == [None] * 3
        return
    for v in values:
        for x in (v.values() if isinstance(v, dict) else [v]):
            assert isinstance(x, float) and math.isfinite(x), (key, v)


def test_switches_turn_their_metrics_off():
    layer = _analyze(spectra=False, intrinsic=False)["layers"][1]
    assert layer["esd_alpha"] is None and layer["stable_rank"] is None and layer["intrinsic_dimension"] is None
    assert math.isfinite(layer["effective_rank"]) and math.isfinite(layer["block_influence"])


# ---------------------------------------------------------------------------------------------- one entry
def test_a_toy_metric_is_one_entry():
    """Registered here, in the test only: the report's layers, the page's figure and table, and the docs follow."""
    toy = Metric("toy_mean_rms", "stream", lambda r: (r.entering["rms"] + r.leaving["rms"]) / 2,
                 "mean RMS of the streams entering and leaving the block", "a test's toy", 1.0,
                 (Plot("Hidden-state growth", "Toy mean RMS", "toy", ylabel="RMS"),))
    doc = DOC.read_text(encoding="utf-8")
    with registered(toy):
        entry = _analyze()
        page = render_html({"models": [entry]})
        listed = render_doc(doc)
    rms = [entry["embedding"]["hidden_rms"]] + [layer["hidden_rms"] for layer in entry["layers"]]
    for i, layer in enumerate(entry["layers"]):
        assert list(layer)[-1] == "toy_mean_rms"
        assert layer["toy_mean_rms"] == pytest.approx((rms[i] + rms[i + 1]) / 2, rel=1e-12)
    assert _headers(page)[-1] == "toy_mean_rms"
    assert ("Hidden-state growth against block index: RMS of the stream leaving the block; Variance growth; "
            "Toy mean RMS") in _alts(page)
    assert '"toy_mean_rms": 1.0' in listed and "| `toy_mean_rms` | mean RMS of the streams entering" in listed
    assert "Hidden-state growth › Toy mean RMS" in listed
    # and gone again: the registry, the report and the docs are as before
    assert "toy_mean_rms" not in METRICS and render_doc(doc) == doc
    assert "toy_mean_rms" not in _analyze()["layers"][0]


def test_a_toy_streaming_metric_brings_its_own_running_sum():
    """A running sum the pass did not keep, in a figure of its own and without a table column."""
    toy = Metric("toy_mean_square", "stream", lambda r: r.leaving["toy_mean_square"], "mean of x^2 over x_l+1",
                 plots=(Plot("Toy figure", "Mean square", "leaving the block"),), table=False,
                 sums=lambda b: b.tokens.pow(2).mean(-1).sum(-1))  # (S,): per token mean_c x^2, summed
    with registered(toy, families=(Family("Toy figure", "A test's figure."),)):
        entry = _analyze()
        page = render_html({"models": [entry]})
    for layer in entry["layers"]:  # mean over tokens of mean_c x^2 = sum x^2 / (N C) = RMS^2
        assert layer["toy_mean_square"] == pytest.approx(layer["hidden_rms"] ** 2, rel=1e-6)  # float32 sums
    assert "<h3>Toy figure</h3>" in page and "A test&#x27;s figure." in page
    assert "toy_mean_square" not in _headers(page)
    assert "Toy figure" not in FAMILIES and "toy_mean_square" not in METRICS


def test_layer_results_split_blocks_states_and_matrices():
    S = [[0.0, 0.1, 0.2], [None, 0.0, 0.3], [None, None, 0.0]]
    res = {"m": S, "per_state": [1.0, 2.0, 3.0], "per_block": [5.0, 6.0], "gone": None, "loss": 2.5}
    r0, r1 = layer_results(res, 2, causal=True)
    assert (r0.block["m"], r1.block["m"]) == (0.1, 0.3)
    assert (r1.entering["per_state"], r1.leaving["per_state"], r1.block["per_block"]) == (2.0, 3.0, 6.0)
    assert r0.block["gone"] is None and r0.model == {"loss": 2.5} and r0.matrices is None
    assert r0.tokens.numel() == 0 and r0.sequences == []
    with pytest.raises(LayerlabError, match="expected 2 blocks or 3 states"):
        layer_results({"odd": [1.0]}, 2, causal=True)


@pytest.mark.parametrize("bad, message", [
    (dict(kind="streem"), "unknown accumulator kind 'streem'; valid: .*did you mean 'stream'"),
    (dict(plots=(Plot("Layer similarit", "p", "l"),)), "unknown plot family 'Layer similarit'"),
    (dict(key="block_influence"), "per-layer key 'block_influence' is already taken"),
    (dict(key="index"), "per-layer key 'index' is already taken"),
    (dict(kind="sample", sums=lambda b: b.tokens.sum()), "only a 'stream' metric keeps running sums"),
    (dict(switch="lenses"), "unknown switch 'lenses'"),
    (dict(doc="two\nlines"), "needs a one-line description"),
])
def test_bad_entries_are_refused(bad, message):
    fields = dict(key="toy", kind="stream", compute=lambda r: 0.0, doc="a toy") | bad
    with pytest.raises(LayerlabError, match=message):
        register_metric(Metric(**fields))
    assert "toy" not in METRICS


def test_compute_takes_layer_results_only():
    r = LayerResults(0, True, leaving={"rms": 2.0}, entering={"rms": 1.0})
    assert METRICS["hidden_rms"].compute(r) == 2.0
