"""Structure discovery for a ``model_type`` with no adapter entry (issue 13, section 2): the blocks, embedding,
head and final norm read from the module tree and a probe forward, checked against computations that do not go
through layerlab's view.

Families with no entry (and none planned): StableLM (with its parallel residual and q/k norms, which the
block-level view need not know), GPT-Neo (``transformer.h``, learned positions, local attention) and Persimmon
(``final_layernorm``). Per family, a tiny random model from the installed transformers' config class:
- the discovered modules are the ones named here by hand;
- the block-level trace equals ``output_hidden_states`` (HF's last entry is the final norm of the last block's
  output in each of them) and the logit lens at the last block equals the logits;
- ``skip(i)`` equals the model with block i deleted from its ModuleList by hand;
- analyze's fidelity certificate passes on the discovered view, and fails when its final norm is wrong;
- sublayer operations are refused in one line, and discovery fails in one line, naming what it found, where the
  structure is ambiguous or the probe's checks do not hold.
"""

import copy
import importlib

import numpy as np
import pytest
import torch
import transformers
from conftest import FakeTok, perturb
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from layerlab.adapters import MODEL_TYPES
from layerlab.adapters.discover import SUBLAYERS_UNKNOWN, DiscoveredView, discover, discoverable, discovered_view
from layerlab.analysis.analyze import check_fidelity
from layerlab.errors import LayerlabError

V = 320
L = 3
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=L, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)

# model_type -> (config, the paths a person reads off the modeling file: blocks, embedding, final norm, head)
FAMILIES = {
    "stablelm": (lambda: transformers.StableLmConfig(**SMALL, num_key_value_heads=2, use_parallel_residual=True,
                                                     qk_layernorm=True),
                 ("model.layers", "model.embed_tokens", "model.norm", "lm_head")),
    "gpt_neo": (lambda: transformers.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=L, num_heads=2,
                                                  attention_types=[[["global", "local"], 1], [["global"], 1]],
                                                  intermediate_size=64, max_position_embeddings=64, window_size=4),
                ("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head")),
    "persimmon": (lambda: transformers.PersimmonConfig(**SMALL),
                  ("model.layers", "model.embed_tokens", "model.final_layernorm", "lm_head")),
}


def _build(family: str, **overrides):
    torch.manual_seed(0)
    config = FAMILIES[family][0]()
    for k, val in overrides.items():
        setattr(config, k, val)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == family and family not in MODEL_TYPES  # a family with no adapter entry
    return perturb(model, 0.05).eval()  # norms off their init, so that the final norm's form matters


def _paths(family: str, model):
    return [model.get_submodule(p) for p in FAMILIES[family][1]]


def _deleted(family: str, model, i: int):
    """``model`` with block ``i`` deleted by hand: the ModuleList shortened, the config and layer indices fixed."""
    m = copy.deepcopy(model)
    layers = m.get_submodule(FAMILIES[family][1][0])
    del layers[i]
    m.config.num_hidden_layers = len(layers)
    for key in ("layer_types", "attention_layers"):  # per-layer lists (GPT-Neo's global/local attention)
        if isinstance(getattr(m.config, key, None), list):
            setattr(m.config, key, [t for j, t in enumerate(getattr(m.config, key)) if j != i])
    for j, layer in enumerate(layers):
        for mod in layer.modules():
            for attr in ("layer_idx", "layer_id"):
                if isinstance(getattr(mod, attr, None), int):
                    setattr(mod, attr, j)
    return m.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, 10), generator=g)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # right padding on the second row
    return x, mask


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    if SUBLAYERS_UNKNOWN not in msg:
        assert msg.startswith("unsupported architecture '") and "its structure cannot be discovered: " in msg
    return msg


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_discovers_the_modules_named_by_hand(family):
    model = _build(family)
    blocks, embed, norm, head = _paths(family, model)
    arch = discover(model)
    assert (arch.blocks, arch.embed, arch.final_norm, arch.unembed) == FAMILIES[family][1]
    assert arch.parts == {} and arch.causal and arch.placement == arch.form == "unknown"
    v = discovered_view(model)
    assert isinstance(v, DiscoveredView) and v.arch_name == "discovered" and v.causal and v.has_lm_head
    assert [b.module for b in v.blocks] == list(blocks) and v.num_layers == L
    assert v.embed is embed and v.final_norm is norm and v.unembed is head
    assert v.placements() == ["unknown"] * L and v.form == "unknown"  # a parallel StableLM block is not "sequential"
    assert all(b.parts == {} and b.attn_out is None and b.mlp_out is None for b in v.blocks)


def test_trace_equals_output_hidden_states_and_lens_equals_logits(family):
    model = _build(family)
    v = discovered_view(model)
    norm = _paths(family, model)[2]
    x, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, use_cache=False, output_hidden_states=True)
        with v.trace() as t:
            traced = v.forward(x, mask).logits
        hs = out.hidden_states
        assert len(hs) == L + 1
        for i in range(L):
            torch.testing.assert_close(t.resid_in[i], hs[i])
            if i + 1 < L:
                torch.testing.assert_close(t.resid_out[i], hs[i + 1])
        # HF's last hidden state is after the final norm in each family here
        torch.testing.assert_close(norm(t.resid_out[-1]), hs[L])
        torch.testing.assert_close(t.final, hs[L])
        torch.testing.assert_close(v.logits_from_hidden(t.resid_out[-1]), out.logits)
    torch.testing.assert_close(traced, out.logits)  # tracing leaves the computation as it is
    assert t.attn == t.mlp == t.mid == [None] * L  # nothing inside a block is known


def test_skip_equals_the_model_with_the_block_deleted(family):
    model = _build(family)
    v = discovered_view(model)
    x, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        before = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        with v.trace() as t:
            v.forward(x, mask)
        for i in range(L):
            want = _deleted(family, model, i)(input_ids=x, attention_mask=mask, use_cache=False).logits
            with v.skip(i):
                plain = v.forward(x, mask).logits
            with v.skip(i, replay=t):
                replayed = v.forward(x, mask).logits
            torch.testing.assert_close(plain[real], want[real])
            torch.testing.assert_close(replayed[real], want[real])
            assert (want[real] - before[real]).abs().max() > 1e-3  # removing a block changes the logits
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask, use_cache=False).logits, before)


def test_fidelity_certificate_passes_and_catches_a_wrong_final_norm(family):
    model = _build(family)
    v = discovered_view(model)
    x, mask = _batch()
    with torch.no_grad():
        with v.trace() as t:
            out = v.forward(x, mask)
        states = [t.resid_in[0], *t.resid_out]
        f = check_fidelity(v, x, mask, states, out)
        assert f["passed"] and f["layers_checked"] == L and f["max_abs_logit_diff"] <= 1e-4
        assert f["max_rel_hidden_diff"] <= 1e-4
        torch.manual_seed(5)
        wrong = perturb(nn.LayerNorm(32), 0.3, seed=5)  # a norm, but not the model's
        v.final_norm = wrong
        with pytest.raises(LayerlabError, match=f"diverges from the plain forward at block {L - 1}") as e:
            check_fidelity(v, x, mask, states, out)
    assert "\n" not in str(e.value)


def test_sublayer_operations_are_refused_in_one_line():
    model = _build("stablelm")
    v = discovered_view(model)
    for op in (lambda: v.skip_sublayers("attn", 0).__enter__(), lambda: v.skip_sublayers("mlp", 1).__enter__(),
               lambda: v.replace(0, "ln1", nn.Identity()), lambda: v.out_proj_path(0, "mlp")):
        with pytest.raises(LayerlabError, match=SUBLAYERS_UNKNOWN) as e:
            op()
        assert "stablelm" in _one_line(e)
    assert isinstance(model.model.layers[0].input_layernorm, nn.LayerNorm)  # replace left the model alone


def test_a_list_of_that_length_inside_a_block_is_not_the_blocks():
    model = _build("persimmon")
    model.model.layers[1].experts = nn.ModuleList(nn.Identity() for _ in range(L))  # never runs
    v = discovered_view(model)
    assert [b.module for b in v.blocks] == list(model.model.layers)


def test_two_lists_or_none_of_num_hidden_layers_fail_in_one_line():
    model = _build("stablelm")
    model.model.extra = nn.ModuleList(nn.Linear(2, 2) for _ in range(L))
    with pytest.raises(LayerlabError, match="2 nn.ModuleLists of num_hidden_layers=3") as e:
        discover(model)
    assert "model.layers" in _one_line(e) and "model.extra" in str(e.value)
    model = _build("gpt_neo")
    model.config.num_layers = 5
    with pytest.raises(LayerlabError, match=r"no nn.ModuleList of num_hidden_layers=5 .*transformer.h \(3\)") as e:
        discover(model)
    _one_line(e)


def test_a_logit_scale_after_the_head_fails_in_one_line():
    """Granite divides its logits by logits_scaling after the head: the logit lens would not be the model's."""
    torch.manual_seed(0)
    granite = perturb(AutoModelForCausalLM.from_config(transformers.GraniteConfig(
        **SMALL, num_key_value_heads=2, logits_scaling=4.0)), 0.05).eval()
    assert granite.config.model_type not in MODEL_TYPES
    with pytest.raises(LayerlabError, match="logits are not the output of the head lm_head") as e:
        discover(granite)
    _one_line(e)
    granite.config.logits_scaling = 1.0  # the same model, without the scale: discovered
    assert discover(granite).final_norm == "model.norm"


def test_a_change_to_what_the_head_reads_outside_any_module_fails_in_one_line():
    model = _build("persimmon")
    model.lm_head.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    with pytest.raises(LayerlabError, match="model.final_layernorm runs between the last block and the head, but"
                       ) as e:
        discover(model)
    _one_line(e)


def test_two_modules_between_the_last_block_and_the_head_fail_unless_one_is_inert():
    model = _build("persimmon")
    model.extra_norm = perturb(nn.LayerNorm(32), 0.3, seed=2)
    model.lm_head.register_forward_pre_hook(lambda m, args: (model.extra_norm(args[0]),))
    with pytest.raises(LayerlabError, match=r"2 modules run between the last block and the head "
                       r"\(model.final_layernorm, extra_norm\)") as e:
        discover(model)
    _one_line(e)
    model = _build("persimmon")
    model.drop = nn.Dropout(0.5)  # identity in eval mode: not a candidate for the final norm
    model.lm_head.register_forward_pre_hook(lambda m, args: (model.drop(args[0]),))
    assert discover(model).final_norm == "model.final_layernorm"


def test_a_stream_changed_between_blocks_fails_in_one_line():
    """Something outside the blocks changes the stream between two of them: skipping a block would not be
    deleting it."""
    model = _build("gpt_neo")

    def plus_one(module, args, kwargs):
        if args:
            return (args[0] + 1, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + 1}

    model.transformer.h[1].register_forward_pre_hook(plus_one, with_kwargs=True)
    with pytest.raises(LayerlabError, match="entering block 1 of transformer.h is not block 0's output") as e:
        discover(model)
    _one_line(e)


def test_a_model_without_a_language_model_head_fails_in_one_line():
    torch.manual_seed(0)
    with pytest.raises(LayerlabError, match="StableLmModel is not a causal language model") as e:
        discover(AutoModel.from_config(FAMILIES["stablelm"][0]()))
    _one_line(e)


def test_analyze_runs_on_a_discovered_view(monkeypatch):
    """The design analyze adopts: with ``discovered_view`` in place of ``view``, the whole metric set runs, the
    fidelity certificate passes, and the entry is labelled "discovered"; the logit lens at the last block is
    the model's own prediction (KL 0)."""
    module = importlib.import_module("layerlab.analysis.analyze")
    monkeypatch.setattr(module, "split_ids", lambda tok, data, split: np.asarray(tok.ids))
    monkeypatch.setattr(module, "view", discovered_view)
    model = _build("stablelm")
    entry = module.analyze_model(model, FakeTok(V), name="m", path=None, tokens=64, seq_len=16, batch_size=4,
                                 removal_tokens=32, spectra=False, intrinsic=False, progress=False)
    assert entry["arch"] == "discovered" and entry["placements"] == ["unknown"] * L
    assert entry["fidelity"]["passed"] and entry["fidelity"]["max_abs_logit_diff"] <= 1e-4
    layers = entry["layers"]
    assert abs(layers[-1]["logit_lens_kl"]) < 1e-5 and np.isfinite(entry["loss"])
    assert all(np.isfinite(layer["removal_loss_delta"]) for layer in layers)


def test_a_model_whose_later_tokens_change_earlier_logits_fails_in_one_line():
    """A ForCausalLM class made non-causal (every position reads the last token's embedding) is refused: the
    causal reductions (last-token distances, the next-token loss) would not mean what they say."""
    model = _build("stablelm")
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: out + out[:, -1:])
    with pytest.raises(LayerlabError, match="a later token changes earlier logits") as e:
        discover(model)
    _one_line(e)


def test_discoverable_is_what_transformers_loads_as_a_causal_lm():
    assert all(discoverable(f) for f in (*FAMILIES, "granite", "cohere"))
    assert not discoverable("not_a_model_type") and not discoverable(None)
    assert not discoverable("t5")  # an encoder-decoder: transformers has no causal LM of that type


def test_a_probe_forward_that_raises_fails_in_one_line():
    model = _build("persimmon")

    def boom(module, args):
        raise ValueError("boom\nmore detail")

    model.model.layers[2].register_forward_pre_hook(boom)
    with pytest.raises(LayerlabError, match="its probe forward failed: boom$") as e:
        discover(model)
    _one_line(e)


@pytest.mark.parametrize("family", ["stablelm", "gpt_neo"])
def test_cli_analyze_and_block_prune_a_discovered_family(family, tmp_path):
    """Through the CLI, with no monkeypatching: ``analyze`` discovers the structure (report labelled
    "discovered", the fidelity certificate passed), ``prune`` removes a block into a directory that plain
    transformers loads with the same logits as the model with that block deleted by hand (GPT-Neo: its per-block
    global/local attention list is cut with it), ``prune --unit attn`` is refused in one line, and ``quantize``
    (4 bits) and ``eval`` of its input and output report finite figures."""
    import json

    from conftest import save_model
    from typer.testing import CliRunner

    from layerlab.cli import app

    src = save_model(_build(family), tmp_path / "m")
    run = CliRunner().invoke
    r = run(app, ["analyze", str(src), "--tokens", "256", "--removal-tokens", "128", "--no-spectra",
                  "--no-progress", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    entry = json.loads((tmp_path / "r" / "report.json").read_text())["models"][0]
    assert entry["arch"] == "discovered" and entry["fidelity"]["passed"] and entry["num_layers"] == L
    for layer in entry["layers"]:  # what attention and the MLP add is unknown here, not zero
        assert layer["attn_relative_contribution"] is None and layer["mlp_cosine"] is None
        assert layer["block_influence"] is not None and layer["removal_loss_delta"] is not None

    r = run(app, ["prune", str(src), "--remove", "1", "--measure-tokens", "256", "--tokens", "256",
                  "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    (i,) = json.loads((tmp_path / "p" / "layerlab.json").read_text())["removed_blocks"]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    x, _ = _batch()
    with torch.no_grad():
        expect = _deleted(family, AutoModelForCausalLM.from_pretrained(src).eval(), i)(input_ids=x).logits
        torch.testing.assert_close(pruned(input_ids=x).logits, expect)

    r = run(app, ["prune", str(src), "--remove", "1", "--unit", "attn", "--out", str(tmp_path / "a")])
    assert r.exit_code != 0 and SUBLAYERS_UNKNOWN in str(r.exception) and not (tmp_path / "a").exists()

    # quantize and eval read the discovered blocks too
    r = run(app, ["quantize", str(src), "--bits", "4", "--importance", "lim", "--calibration-tokens", "256",
                  "--no-baselines", "--tokens", "256", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "q" / "layerlab.json").read_text())
    assert rec["after"]["avg_bits"] == pytest.approx(4.0) and np.isfinite(rec["after"]["loss"])
    assert rec["after"]["bytes"] < rec["before"]["bytes"]
    for d in (src, tmp_path / "q"):
        r = run(app, ["eval", str(d), "--tokens", "256"])
        assert r.exit_code == 0, r.output
        assert "perplexity" in r.output


def _cli_error(argv: list[str], capsys) -> str:
    """The one line that ``layerlab ARGV`` writes to stderr as it exits with status 2, nothing on stdout."""
    import sys

    from layerlab.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["layerlab", *argv])
        with pytest.raises(SystemExit) as e:
            main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "", (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_refuses_an_undiscoverable_family_and_offload_of_a_discovered_one_in_one_line(tmp_path, capsys):
    """Through the CLI: Granite (a logit scale after the head) fails discovery in one line that names what was
    found, for analyze and prune; a discovered family (its structure comes from a probe forward of the whole
    model) is refused ``--offload`` in one line that says to measure it in memory. Nothing is written."""
    from conftest import save_model

    torch.manual_seed(0)
    granite = perturb(AutoModelForCausalLM.from_config(transformers.GraniteConfig(
        **SMALL, num_key_value_heads=2, logits_scaling=4.0)), 0.05).eval()
    src = save_model(granite, tmp_path / "granite")
    for argv in (["analyze", str(src), "--tokens", "128", "--no-spectra", "--out", str(tmp_path / "r")],
                 ["prune", str(src), "--remove", "1", "--out", str(tmp_path / "p")]):
        err = _cli_error(argv, capsys)
        assert "'granite'" in err and "logits are not the output of the head lm_head" in err, err
    src = save_model(_build("persimmon"), tmp_path / "persimmon")
    err = _cli_error(["analyze", str(src), "--offload", "--tokens", "128", "--out", str(tmp_path / "r")], capsys)
    assert "offload needs a family with an adapter entry" in err and "'persimmon' has none" in err, err
    assert "--no-offload" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()
