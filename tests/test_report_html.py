"""The HTML report: a self-contained page from a synthetic report.json, written atomically, drawn by Chromium."""

import base64
import io
import math
import os
import re
import shutil
from html import escape

import numpy as np
import pytest

from layerlab.report import render_html, write_html
from layerlab.report.plots import span_matrix

NAME = "gpt<b>&tiny"  # must come out escaped
IMG = re.compile(r'<img class="plot[^"]*"[^>]*>')


def _angular(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of arccos(cos(a_i, b_i)) / pi."""
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0))) / np.pi)


def _distance_matrix(states: list[np.ndarray]) -> list[list[float | None]]:
    n = len(states)
    return [[_angular(states[i], states[j]) if j >= i else None for j in range(n)] for i in range(n)]


def make_report(num_layers: int = 6, models: int = 2, causal: bool = True) -> dict:
    """A report.json-shaped dict with deterministic values.

    Model 0 is causal when ``causal``; every odd-numbered model (and all of them when not ``causal``) is an
    encoder with ``removal_effect`` instead of ``removal_loss_delta`` and no logit lens. Some values are None
    or NaN, and one encoder series (intrinsic dimension) is missing entirely.
    """
    rng = np.random.default_rng(1234)
    out = []
    for m in range(models):
        is_causal = causal and m % 2 == 0
        width, tokens = 24, 8
        # A random walk of token states: steps of varied size, so that some blocks matter more than others.
        steps = rng.uniform(0.2, 1.4, num_layers)
        states = [rng.normal(size=(tokens, width))]
        for scale in steps:
            states.append(states[-1] + scale * rng.normal(size=(tokens, width)))
        all_tok = _distance_matrix(states)
        last_tok = _distance_matrix([s[-1:] for s in states])
        pick = last_tok if is_causal else all_tok
        best = {}
        for n in range(1, num_layers):
            d = [pick[start][start + n] for start in range(num_layers - n + 1)]
            best[str(n)] = {"start": int(np.argmin(d)), "distance": float(min(d))}

        layers = []
        for i in range(num_layers):
            resid = float(rng.uniform(5, 20)) * (40.0 if i == 2 else 1.0)  # a massive activation in block 2
            layers.append({
                "index": i, "placement": "pre",
                "angular_distance": all_tok[i][i + 1],
                "angular_distance_last_token": last_tok[i][i + 1],
                "block_influence": 1 - math.cos(math.pi * all_tok[i][i + 1]),
                "relative_contribution": float(steps[i] / (1 + i) ** 0.5),
                "attn_relative_contribution": float(rng.uniform(0.1, 0.8)),
                "attn_cosine": float(rng.uniform(-0.2, 0.2)),
                "mlp_relative_contribution": float(rng.uniform(0.1, 0.8)),
                "mlp_cosine": float(rng.uniform(-0.3, 0.1)),
                "hidden_rms": float(np.sqrt(np.mean(states[i + 1] ** 2))),
                "variance_growth": float(np.var(states[i + 1]) / np.var(states[i])),
                "max_abs_activation": resid,
                "max_abs": {"resid": resid, "attn": float(rng.uniform(1, 5)), "mlp": float(rng.uniform(2, 9))},
                "effective_rank": float(rng.uniform(5, 20)),
                "prompt_entropy": float(rng.uniform(0.5, 0.95)),
                "curvature": float(rng.uniform(1.0, 2.5)),
                "intrinsic_dimension": float(rng.uniform(5, 15)) if is_causal else None,
                "anisotropy": float(rng.uniform(0.05, 0.6)),
                "logit_lens_loss": float(6.0 - 4.0 * i / num_layers + rng.uniform(0, 0.3)) if is_causal else None,
                "logit_lens_kl": float(4.0 - 3.5 * i / num_layers) if is_causal else None,
                "removal_loss_delta": float(steps[i] * 0.3) if is_causal else None,
                "removal_effect": None if is_causal else float(steps[i] * 0.05),
                "esd_alpha": float(rng.uniform(2.5, 6.0)),
                "stable_rank": float(rng.uniform(4, 20)),
            })
        layers[1]["effective_rank"] = None
        layers[min(3, num_layers - 1)]["curvature"] = float("nan")
        layers[0]["logit_lens_kl"] = None
        emb_max, final_max = 4.0, 30.0
        top = max(range(num_layers), key=lambda i: layers[i]["max_abs_activation"])
        out.append({
            "name": NAME if m == 0 else f"encoder-{m}" if not is_causal else f"causal-{m}",
            "path": f"runs/model-{m}",
            "arch": "layerlab" if is_causal else "bert",
            "causal": is_causal,
            "num_layers": num_layers,
            "hidden_size": width,
            "placements": ["pre"] * num_layers,
            "loss": 2.1 if is_causal else None,
            "layers": layers,
            "embedding": {"hidden_rms": float(np.sqrt(np.mean(states[0] ** 2))), "max_abs_activation": emb_max},
            "final_norm_max_abs": final_max,
            "angular_distance_matrix": all_tok,
            "angular_distance_matrix_last_token": last_tok if is_causal else None,
            "best_block_to_prune": best,
            "max_activation": {"value": layers[top]["max_abs_activation"], "layer": top, "point": "resid"},
            "weights": [{"block": i, "name": "attn.qkv", "shape": [3 * width, width],
                         "esd_alpha": layers[i]["esd_alpha"], "stable_rank": layers[i]["stable_rank"]}
                        for i in range(num_layers)],
            "samples": {"tokens": 4096, "token_sample": 512, "sequences": 16},
        })
    return {
        "format": "layerlab-report/1",
        "models": out,
        "provenance": {"data": "embedded <test>", "tokens": 4096, "seq_len": 256,
                       "versions": {"layerlab": "0.1.0", "torch": "2.13.0"}, "created": "2026-11-23T15:00:00Z"},
    }


@pytest.fixture(scope="module")
def report():
    return make_report()


@pytest.fixture(scope="module")
def page(report):
    return render_html(report)


def _h3(page: str) -> list[str]:
    return re.findall(r"<h3>([^<]*)</h3>", page)


def test_page_is_one_self_contained_document(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    assert refs, "the plots are <img src=...>"
    assert not [r for r in refs if r.lower().startswith(("http://", "https://", "//"))]
    assert all(r.startswith("data:image/png;base64,") for r in refs)
    assert "<link" not in page and not re.search(r"<script[^>]*\bsrc", page)


def test_page_escapes_report_text(page):
    assert "gpt&lt;b&gt;&amp;tiny" in page
    assert NAME not in page
    assert "embedded &lt;test&gt;" in page


def test_page_has_the_plots_heatmaps_and_summary(report, page):
    imgs = IMG.findall(page)
    assert len(imgs) >= 7
    assert f'data-plots="{len(imgs)}"' in page
    assert all(re.search(r'alt="[^"]+"', img) for img in imgs)
    assert len([img for img in imgs if "heatmap" in img]) == 2  # one per model
    titles = _h3(page)
    for family in ("Layer similarity", "Contribution", "Hidden-state growth", "Representation quality",
                   "Logit lens", "Layer removal", "Weight spectra"):
        assert family in titles
    assert "Max activations" in page and "<details>" in page
    causal, encoder = report["models"]
    for model in (causal, encoder):
        for n in (1, 2, 3):
            start = model["best_block_to_prune"][str(n)]["start"]
            assert (f"block {start}" if n == 1 else f"blocks {start}..{start + n - 1}") in page
    # order: summary, metric families, heatmaps, max activations, per-layer table
    marks = ["<h2>Summary", "<h3>Layer similarity", "<h2>Angular distance", "<h2>Max activations", "<details>"]
    assert [page.index(m) for m in marks] == sorted(page.index(m) for m in marks)


def test_plots_are_small_pngs(page):
    from PIL import Image

    for img in IMG.findall(page):
        data = base64.b64decode(re.search(r"base64,([^\"]+)", img).group(1))
        width = int(re.search(r'width="(\d+)"', img).group(1))
        with Image.open(io.BytesIO(data)) as png:
            assert png.format == "PNG" and png.width == width


def test_summary_ranks_blocks_by_removal(report, page):
    for model in report["models"]:
        causal = model["causal"]
        key, label = ("removal_loss_delta", "loss increase") if causal else ("removal_effect", "removal effect")
        values = [layer[key] for layer in model["layers"]]
        top, bottom = int(np.argmax(values)), int(np.argmin(values))
        card = page[page.index(escape(model["name"]) + "</h3>"):]  # the first such heading is the summary card
        most = re.search(r"Most important blocks(.*?)</th><td>(.*?)</td>", card)
        least = re.search(r"Least important blocks(.*?)</th><td>(.*?)</td>", card)
        assert label in most.group(1) and label in least.group(1)
        assert most.group(2).startswith(f"<b>{top}</b>") and least.group(2).startswith(f"<b>{bottom}</b>")


def test_empty_series_and_families_are_skipped():
    report = make_report(num_layers=4, models=1, causal=False)  # one encoder: no logit lens, no loss delta
    for layer in report["models"][0]["layers"]:
        layer["esd_alpha"] = None
        layer["stable_rank"] = float("nan")
    page = render_html(report)
    titles = _h3(page)
    assert "Logit lens" not in titles and "Weight spectra" not in titles
    assert "Layer removal" in titles and "Layer similarity" in titles
    assert "Intrinsic dimension" not in page  # the only series of that panel is all None
    assert 'class="plot heatmap"' in page


def test_degenerate_reports_render():
    assert "no models" in render_html({})
    page = render_html({"models": [{"name": "x", "layers": []}], "provenance": {}})
    assert "<b>x</b>" in page and 'data-plots="0"' in page


def test_span_matrix_reads_distances_across_n_blocks():
    # 3 blocks: states 0..3, d(i, j) = j - i + i / 10 in the upper triangle
    matrix = [[None if j < i else (j - i) + i / 10 for j in range(4)] for i in range(4)]
    span = span_matrix(matrix)
    assert span.shape == (3, 3)
    np.testing.assert_allclose(span[0], [1, 2, 3])
    np.testing.assert_allclose(span[1, :2], [1.1, 2.1])
    np.testing.assert_allclose(span[2, :1], [1.2])
    assert np.isnan(span[1, 2]) and np.isnan(span[2, 1:]).all()


def test_twelve_layer_two_model_page_is_small():
    assert len(render_html(make_report(num_layers=12, models=2)).encode()) < 2_000_000


def test_write_html_is_atomic(tmp_path, report, page, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old")
    write_html(report, path)
    assert path.read_text(encoding="utf-8") == page  # rendering is deterministic
    assert os.listdir(tmp_path) == ["report.html"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_html({"models": []}, path)
    assert os.listdir(tmp_path) == ["report.html"]  # the temp file is gone and the old page is intact
    assert "Layer similarity" in path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_chromium_draws_the_page(tmp_path, page):
    browser = pytest.importorskip("browser")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH")
    html_path = tmp_path / "report.html"
    html_path.write_text(page, encoding="utf-8")

    dom = browser.dump_dom(html_path)
    expected = len(IMG.findall(page))
    loaded = re.search(r'data-plots-loaded="(\d+)"', dom)
    assert loaded, "the page's load handler did not run"
    assert int(loaded.group(1)) == expected >= 7

    png = browser.screenshot(html_path, tmp_path / "report.png")
    rgb = browser.load_rgb(png)
    assert rgb.shape[:2] == (3000, 1200)
    assert browser.non_white_fraction(rgb) > 0.05
    # The models' line colours cover far more pixels than the small swatches next to their names.
    assert browser.count_near(rgb, "#1f77b4") > 2000 and browser.count_near(rgb, "#ff7f0e") > 2000
    colours = np.unique((rgb // 32).reshape(-1, 3), axis=0)
    assert len(colours) >= 20


def test_table_columns_follow_the_metric_registry():
    from layerlab.analysis.metrics import METRICS

    report = make_report(num_layers=3, models=1)
    for layer in report["models"][0]["layers"]:
        layer["from_another_version"] = 1.5  # a key the registry does not know: shown, after the known ones
        layer.pop("angular_distance")
        layer["angular_distance"] = 0.2  # moved to the end of the entry: the registry still puts it first
    table = render_html(report).split('<table class="numbers">')[1].split("</thead>")[0]
    heads = [h.replace("<wbr>", "") for h in re.findall(r"<th>(.*?)</th>", table)]
    known = [h for h in heads if h.split(".")[0] in METRICS]
    assert heads[:3] == ["index", "placement", "angular_distance"] and heads[-1] == "from_another_version"
    assert [h.split(".")[0] for h in known] == sorted((h.split(".")[0] for h in known), key=list(METRICS).index)
