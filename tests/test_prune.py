"""prune: each metric's choice on a model where the answer is known, exact surgery, safety."""

import hashlib
import json

import pytest
import torch
from conftest import perturb, tiny_cfg
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerlab
from layerlab.adapters import view
from layerlab.compress import METRICS, prune, without_blocks
from layerlab.data import ByteTokenizer
from layerlab.errors import LayerlabError

QUIET = {"echo": lambda *a: None, "tokens": 512}


def _save(model, path):
    model.save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def _identity_blocks(model, blocks):
    """Zero the output projections of ``blocks``: each then adds nothing to the residual stream."""
    with torch.no_grad():
        for i in blocks:
            for proj in (model.blocks[i].attn.proj, model.blocks[i].mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A briefly trained 5-block model whose blocks 2 and 3 are then made to do nothing.

    Trained, so that removing any other block costs loss; with random weights, removing a
    block can lower the loss and the "right answer" would not be known.
    """
    from layerlab.train import train

    run = tmp_path_factory.mktemp("m") / "run"
    train(preset="debug", overrides={"layers": 5, "steps": 300, "eval_every": 300}, out=run, progress=False,
          echo=lambda *a: None)
    model = _identity_blocks(AutoModelForCausalLM.from_pretrained(run), [2, 3])
    return _save(model, tmp_path_factory.mktemp("m") / "known")


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_each_metric_removes_the_blocks_that_do_nothing(known, tmp_path, metric):
    rec = prune(known, remove=2, metric=metric, out=tmp_path / "out", **QUIET)
    assert rec["removed_blocks"] == [2, 3]
    assert rec["after"]["loss"] == pytest.approx(rec["before"]["loss"], abs=1e-5)
    assert rec["after"]["layers"] == 3 and rec["after"]["bytes"] < rec["before"]["bytes"]
    man = json.loads((tmp_path / "out" / "layerlab.json").read_text())
    assert man["command"] == "prune" and man["removed_blocks"] == [2, 3] and man["args"]["metric"] == metric


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=4, n_head=2,
                                      bos_token_id=256, eos_token_id=256))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


@pytest.mark.parametrize("make", [_gpt2, _llama, lambda: layerlab.build_model(tiny_cfg(layers=4, vocab_size=320,
                                                                                       placement="mix"))])
def test_surgery_equals_skipping_and_stays_plain_transformers(make, tmp_path):
    torch.manual_seed(0)
    model = perturb(make(), 0.02).eval()
    smaller = without_blocks(model, [1, 2])
    x = torch.randint(0, 320, (2, 12))
    v = view(model)
    with torch.no_grad(), v.skip(1, 2):
        expect = v.forward(x).logits
    with torch.no_grad():
        got = smaller(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, expect)
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, use_cache=False).logits, expect)
        ids = loaded.generate(x[:, :4], max_new_tokens=3, do_sample=False)  # the cache is renumbered too
    assert ids.shape == (2, 7)


def test_mix_schedule_is_kept_per_block():
    model = layerlab.build_model(tiny_cfg(layers=4, placement="mix", mix_alpha=0.5))
    smaller = without_blocks(model, [0])
    assert smaller.cfg.placement == ["post", "pre", "pre"]


def test_input_untouched_and_bad_arguments(known, tmp_path):
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in known.iterdir()}
    prune(known, remove=1, out=tmp_path / "a", **QUIET)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in known.iterdir()} == digest
    with pytest.raises(LayerlabError, match="--remove must be between 1 and 4 for a 5-layer model, got 5"):
        prune(known, remove=5, out=tmp_path / "b", **QUIET)
    with pytest.raises(LayerlabError, match="refusing to write into the input directory"):
        prune(known, remove=1, out=known / "inside", **QUIET)
    with pytest.raises(LayerlabError, match="already exists and is not empty"):
        prune(known, remove=1, out=tmp_path / "a", **QUIET)
    with pytest.raises(LayerlabError, match="unknown metric 'cosine'; valid: angular, bi, loss"):
        prune(known, remove=1, metric="cosine", out=tmp_path / "c", **QUIET)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    lns = _save(layerlab.build_model(tiny_cfg(layers=3, placement="lns", vocab_size=320)), tmp_path / "lns")
    with pytest.raises(LayerlabError, match="LNS"):
        prune(lns, remove=1, out=tmp_path / "d", **QUIET)
    assert not (tmp_path / "d").exists(), "an output is written whole or not at all"


def test_cli_prune_and_eval(known, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, ["prune", str(known), "--remove", "1", "--out", str(tmp_path / "p"),
                                 "--tokens", "512"])
    assert r.exit_code == 0, r.output
    assert "before" in r.output and "pruned" in r.output and "removed blocks" in r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "p"), "--tokens", "512"])
    assert r.exit_code == 0 and "perplexity" in r.output and "bits/byte" in r.output


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_healing_lowers_the_pruned_loss_and_writes_a_plain_model(known, tmp_path, mode):
    from safetensors import safe_open

    rec = prune(known, remove=2, metric="bi", out=tmp_path / "h", heal_steps=30, heal=mode, **QUIET)
    assert set(rec) >= {"before", "pruned", "healed", "after"}
    assert rec["healed"]["loss"] < rec["pruned"]["loss"]
    assert rec["after"] == rec["healed"]
    with safe_open(tmp_path / "h" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k], "adapters are merged, not saved"
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert healed.config.layers == 3 and type(healed).__name__ == "LayerlabForCausalLM"


def test_bad_heal_mode(known, tmp_path):
    with pytest.raises(LayerlabError, match="unknown heal mode 'qlora'; valid: full, lora"):
        prune(known, remove=1, heal_steps=5, heal="qlora", out=tmp_path / "x", **QUIET)
