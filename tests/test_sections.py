"""The analysis-section plumbing (layerlab.analysis.sections): a section registered here runs after the pass on
the pass's tokens, its keys join the model's entry, its artifacts are written beside report.json, report.html
draws it, and the CLI refuses what cannot run in one line."""

import json

import pytest
import torch
from conftest import FakeTok, measure_fake_ids, perturb, save_model, tiny_cfg
from safetensors.torch import load_file
from typer.testing import CliRunner

import layerlab
from layerlab.analysis.sections import Section, SectionOutput, sections_for
from layerlab.cli import app
from layerlab.errors import LayerlabError
from layerlab.model import build_model
from layerlab.registry import SECTIONS


class _Count(Section):
    """Counts the real tokens its batches hold, and saves a tensor: what the plumbing must carry."""

    name = "count_test"
    keys = ("count_test", "count_test_seed")
    title = "Token count"
    doc = "a stand-in section"
    needs_lm_head = True
    seen: list = []

    def run(self, ctx):
        n = sum(int(mask.sum()) for _, mask in ctx.batches())
        type(self).seen.append((ctx.name, ctx.options, ctx.loss))
        return SectionOutput({"count_test": n, "count_test_seed": ctx.seed},
                             artifacts={"count": {"n": torch.tensor([n])}})

    def html(self, page, models, names, colors):
        for m, name in zip(models, names):
            page.add(f"<p class=count-test>{name}: {m['count_test']}</p>")


@pytest.fixture
def count_section():
    SECTIONS.register("count_test", _Count)
    _Count.seen = []
    try:
        yield _Count
    finally:
        SECTIONS._entries.pop("count_test")


def test_a_section_runs_on_the_pass_tokens_and_writes_its_artifact(tmp_path, count_section):
    model = perturb(build_model(tiny_cfg(vocab_size=300, context=32)))
    d = save_model(model, tmp_path / "m")
    out = tmp_path / "r"
    report = layerlab.analyze(d, d, out=out, tokens=200, spectra=False, progress=False,
                              sections={"count_test": {"k": 3}}, seed=7)
    first, second = report.models
    # the pass's own count of real tokens, and the sections' options and seed, reach the section unchanged
    assert first["count_test"] == first["samples"]["tokens"] > 0
    assert first["count_test_seed"] == 7
    assert count_section.seen[0][1] == {"k": 3} and count_section.seen[0][2] == first["loss"]
    assert first["artifacts"] == {"count": "count.safetensors"}
    assert second["name"] == "m'" and second["artifacts"] == {"count": "count-m_.safetensors"}
    assert int(load_file(out / "count.safetensors")["n"]) == first["count_test"]
    assert (out / second["artifacts"]["count"]).exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"][0]["count_test"] == first["count_test"]
    html = (out / "report.html").read_text()
    assert 'id="section-count_test"' in html and html.count("class=count-test") == 2


def test_a_section_needing_a_head_is_none_on_an_encoder(count_section, monkeypatch):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()
    said = []
    measure_fake_ids(monkeypatch)
    entry = layerlab.analysis.analyze_model(bert, FakeTok(300), name="bert", path=None, tokens=100,
                                            spectra=False, progress=False, sections={"count_test": {}},
                                            announce=said.append)
    assert entry["count_test"] is None and entry["count_test_seed"] is None
    assert "artifacts" not in entry and count_section.seen == []
    assert any("no language-model head" in line for line in said)


def test_unknown_section_is_the_registry_error():
    with pytest.raises(LayerlabError, match="unknown analysis section 'lense'.*lenses"):
        sections_for(["lense"])


def test_sections_run_in_registry_order():
    assert [s.name for s in sections_for(["ffn", "interventions"])] == ["interventions", "ffn"]


def test_cli_refuses_sections_with_trajectory_and_offload(tmp_path):
    d = save_model(build_model(tiny_cfg()), tmp_path / "m")
    r = CliRunner().invoke(app, ["analyze", str(d), "--trajectory", "--interventions"])
    assert isinstance(r.exception, LayerlabError) and "drop --interventions" in str(r.exception)
    r = CliRunner().invoke(app, ["analyze", str(d), "--offload", "--ffn", "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, LayerlabError) and "drop --offload" in str(r.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_chromium_draws_every_section(tmp_path):
    """The three built-in sections on one report, loaded in headless Chromium: each has its heading, every plot
    loads, and the FFN memories are one <details> per block."""
    import re
    import shutil

    browser = pytest.importorskip("browser")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH")
    model = perturb(build_model(tiny_cfg(vocab_size=300, context=32, layers=4)))
    d = save_model(model, tmp_path / "m")
    out = tmp_path / "r"
    layerlab.analyze(d, out=out, tokens=640, spectra=False, progress=False,
                     sections={"interventions": {}, "lenses": {"steps": 5}, "ffn": {"top": 2, "experts": 4}})
    page = (out / "report.html").read_text()
    dom = browser.dump_dom(out / "report.html")
    for name in ("interventions", "lenses", "ffn"):
        assert f'id="section-{name}"' in dom
    loaded = re.search(r'data-plots-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == page.count('<img class="plot') > 7
    ffn_part = dom.split('id="section-ffn"')[1]
    assert ffn_part.count("<details") >= 4  # one per block (the per-layer numbers' <details> comes after)
    assert (out / "lenses.safetensors").exists()
