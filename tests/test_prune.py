"""prune: each metric's choice on a model where the answer is known, exact surgery, safety."""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import digest, idle_blocks, perturb, save_model, tiny_cfg
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerlab
from layerlab.adapters import load_model, view
from layerlab.compress import METRICS, prune, without_blocks
from layerlab.compress.removal import present_sublayers, without_sublayers
from layerlab.errors import LayerlabError
from layerlab.evaluate import masked_loss_sum
from layerlab.model import CACHE_NAME, output_cache

QUIET = {"tokens": 512, "measure_tokens": 512}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained 5-block model (pre placement).

    Trained, so that removing any block or sublayer costs loss; with random weights, removing one
    can lower the loss and the "right answer" would not be known.
    """
    from layerlab.train import train

    run = tmp_path_factory.mktemp("m") / "run"
    train(preset="debug", overrides={"layers": 5, "steps": 300, "eval_every": 300}, out=run, progress=False,
          echo=lambda *a: None)
    return run


@pytest.fixture(scope="module")
def known(trained, tmp_path_factory):
    """The trained model with blocks 2 and 3 made to do nothing."""
    model = idle_blocks(AutoModelForCausalLM.from_pretrained(trained), [2, 3])
    return save_model(model, tmp_path_factory.mktemp("m") / "known")


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
    before = digest(known)
    prune(known, remove=1, out=tmp_path / "a", **QUIET)
    assert digest(known) == before
    with pytest.raises(LayerlabError, match="--remove must be between 1 and 4 for a 5-layer model, got 5"):
        prune(known, remove=5, out=tmp_path / "b", **QUIET)
    with pytest.raises(LayerlabError, match="refusing to write into the input directory"):
        prune(known, remove=1, out=known / "inside", **QUIET)
    with pytest.raises(LayerlabError, match="already exists and is not empty"):
        prune(known, remove=1, out=tmp_path / "a", **QUIET)
    with pytest.raises(LayerlabError, match="unknown metric 'cosine'; valid: angular, bi, loss"):
        prune(known, remove=1, metric="cosine", out=tmp_path / "c", **QUIET)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    lns = save_model(layerlab.build_model(tiny_cfg(layers=3, placement="lns", vocab_size=320)), tmp_path / "lns")
    with pytest.raises(LayerlabError, match="LNS"):
        prune(lns, remove=1, out=tmp_path / "d", **QUIET)
    assert not (tmp_path / "d").exists(), "an output is written whole or not at all"


def test_cli_prune_and_eval(known, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, ["prune", str(known), "--remove", "1", "--out", str(tmp_path / "p"),
                                 "--tokens", "512", "--measure-tokens", "512"])
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


# ---------------------------------------------------------------- --unit attn | mlp

ZERO_ATTN, ZERO_MLP = [1, 3], [2, 4]  # the sublayers of known_sub that do nothing


def _measured_loss(model, held, unit: str | None = None, skip: int | None = None) -> float:
    """Mean next-token loss on ``held``, with the ``unit`` sublayer of block ``skip`` adding nothing."""
    total, count = 0.0, 0
    with torch.no_grad(), view(model).skip_sublayers(unit or "attn", *([] if skip is None else [skip])):
        for ids, mask in held:
            part, n = masked_loss_sum(view(model).forward(ids, mask).logits, ids, mask)
            total, count = total + part, count + n
    return total / count


@pytest.fixture(scope="module")
def known_sub(trained, tmp_path_factory):
    """The trained model with the attention of blocks 1, 3 and the MLP of blocks 2, 4 made to do nothing,
    and every other sublayer made to matter.

    Different blocks for each kind, so that a metric that confused the kinds would pick the wrong ones.

    Zeroing alone does not make the other sublayers matter: after 300 steps the later ones barely
    work (removing block 2's attention moved the measured loss by ~1e-3 nats, and which way depends
    on the machine, as the run is not bitwise reproducible across CPUs and thread counts), so the
    greedy ``loss`` metric could rightly find one of them as free to remove as a zeroed one. So the
    model learns the text the metrics measure (the first tokens of the training split) by heart, with
    the zeroed projections frozen: their output stays exactly zero, so no gradient reaches the rest of
    those sublayers, and the live sublayers train for the network without them. Removing any live
    sublayer then costs tenths of a nat, removing a zeroed one exactly nothing; checked below.
    """
    from layerlab.compress.prune import _held_batches

    torch.manual_seed(0)
    model, tok, _ = load_model(trained)
    zeroed = [getattr(model.blocks[i], unit).proj for unit, blocks in (("attn", ZERO_ATTN), ("mlp", ZERO_MLP))
              for i in blocks]
    with torch.no_grad():
        for proj in zeroed:
            proj.weight.zero_()
            proj.bias.zero_()
            proj.requires_grad_(False)
    held = _held_batches(model, tok, None, QUIET["measure_tokens"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(100):
        for ids, mask in held:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    assert not any(p.any() for proj in zeroed for p in proj.parameters()), "the zeroed sublayers stay zero"
    base = _measured_loss(model, held)
    for unit, gone in (("attn", ZERO_ATTN), ("mlp", ZERO_MLP)):
        for i in range(len(model.blocks)):
            cost = _measured_loss(model, held, unit, i) - base
            if i in gone:
                assert cost == 0, f"removing the zeroed {unit} of block {i} costs {cost}"
            else:
                assert cost > 0.05, f"fixture: removing the {unit} of block {i} costs only {cost:.2e} nats"
    return save_model(model, tmp_path_factory.mktemp("m") / "known_sub")


@pytest.mark.parametrize("unit", ["attn", "mlp"])
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_each_metric_removes_the_sublayers_that_do_nothing(known_sub, tmp_path, metric, unit):
    expect = ZERO_ATTN if unit == "attn" else ZERO_MLP
    rec = prune(known_sub, remove=2, metric=metric, unit=unit, out=tmp_path / "out", **QUIET)
    assert rec["removed"] == [{"block": i, "unit": unit} for i in expect] and rec["surgery"] == "removed"
    assert "removed_blocks" not in rec, "whole blocks stay"
    assert rec["after"]["loss"] == pytest.approx(rec["before"]["loss"], abs=1e-5)
    assert rec["after"]["layers"] == 5 and rec["after"][f"{unit}_sublayers"] == 3
    assert rec["after"]["bytes"] < rec["before"]["bytes"]
    man = json.loads((tmp_path / "out" / "layerlab.json").read_text())
    assert man["unit"] == man["args"]["unit"] == unit and man["removed"] == rec["removed"]
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert getattr(out.config, f"drop_{unit}") == expect
    assert not [k for k in out.state_dict() if k.startswith(tuple(f"blocks.{i}.{unit}." for i in expect))]


def _fwd(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw)


@pytest.mark.parametrize("unit", ["attn", "mlp"])
@pytest.mark.parametrize("placement", ["pre", "peri", "sandwich", "lns"])
def test_sublayer_surgery_equals_skipping_and_the_cache_still_works(placement, unit, tmp_path):
    torch.manual_seed(0)
    positions = "rope" if placement == "peri" else "learned"
    cfg = tiny_cfg(layers=4, vocab_size=320, placement=placement, positions=positions)
    model = perturb(layerlab.build_model(cfg), 0.05).eval()
    smaller, zeroed = without_sublayers(model, unit, [0, 2])  # block 0: the cache must not assume layer 0 has keys
    assert zeroed == []
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad(), view(model).skip_sublayers(unit, 0, 2):
        expect = view(model).forward(x).logits
    torch.testing.assert_close(_fwd(smaller, x, use_cache=False).logits, expect, atol=1e-5, rtol=0)
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    parts = ("ln1", "attn", "ln1_out") if unit == "attn" else ("ln2", "mlp", "ln2_out")
    gone = tuple(f"blocks.{i}.{p}." for i in (0, 2) for p in parts)
    assert getattr(loaded.cfg, f"drop_{unit}") == [0, 2] and (loaded.blocks[0].attn is None) == (unit == "attn")
    assert not [k for k in loaded.state_dict() if k.startswith(gone)]
    torch.testing.assert_close(_fwd(loaded, x, use_cache=False).logits, expect, atol=1e-5, rtol=0)
    # the KV cache: two tokens after a cached prefix equal the full forward, and generation agrees
    past = output_cache(_fwd(loaded, x[:, :6], use_cache=True))
    step = _fwd(loaded, x[:, 6:8], **{CACHE_NAME: past}, use_cache=True).logits
    torch.testing.assert_close(step, expect[:, 6:8], atol=1e-5, rtol=0)
    with torch.no_grad():
        cached = loaded.generate(x[:, :4], max_new_tokens=6, do_sample=False)
        uncached = loaded.generate(x[:, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def _llama_biased():
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                        attention_bias=True, mlp_bias=True))


@pytest.mark.parametrize("unit", ["attn", "mlp"])
@pytest.mark.parametrize("make", [_gpt2, _llama_biased])
def test_hugging_face_sublayers_are_zeroed_and_stay_plain_transformers(make, unit, tmp_path):
    torch.manual_seed(0)
    model = perturb(make(), 0.02).eval()
    smaller, zeroed = without_sublayers(model, unit, [1, 2])
    proj = view(model).arch.out_proj[unit]
    assert zeroed == [f"{view(model).arch.blocks}.{i}.{proj}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    assert present_sublayers(model, unit) == [True] * 4, "the input is not modified"
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad(), view(model).skip_sublayers(unit, 1, 2):
        expect = view(model).forward(x).logits
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_fwd(loaded, x, use_cache=False).logits, expect, atol=1e-5, rtol=0)
    assert present_sublayers(loaded, unit) == [True, False, False, True]
    with pytest.raises(LayerlabError, match="block 1 has no"):  # a zeroed sublayer is not removed twice
        without_sublayers(loaded, unit, [1])


def test_sublayer_refusals_and_bounds(known_sub, tmp_path):
    for placement in ("post", "mix"):
        d = save_model(layerlab.build_model(tiny_cfg(layers=4, placement=placement, mix_alpha=0.5, vocab_size=320)),
                  tmp_path / placement)
        with pytest.raises(LayerlabError, match="--unit attn needs blocks that add each sublayer to the residual "
                                                "stream .*; this model has post blocks"):
            prune(d, remove=1, unit="attn", out=tmp_path / f"{placement}-out", **QUIET)
    with pytest.raises(LayerlabError, match="--remove must be between 1 and 4 for a model with 5 MLP sublayers"):
        prune(known_sub, remove=5, unit="mlp", out=tmp_path / "x", **QUIET)
    with pytest.raises(LayerlabError, match="unknown unit 'ffn'; valid: attn, block, mlp"):
        prune(known_sub, remove=1, unit="ffn", out=tmp_path / "x", **QUIET)
    prune(known_sub, remove=2, unit="attn", metric="bi", out=tmp_path / "p", **QUIET)
    # the pruned model has 3 attention sublayers left; those gone are not candidates again
    with pytest.raises(LayerlabError, match="between 1 and 2 for a model with 3 attention sublayers"):
        prune(tmp_path / "p", remove=3, unit="attn", out=tmp_path / "x", **QUIET)
    rec = prune(tmp_path / "p", remove=1, unit="attn", metric="angular", out=tmp_path / "p2", **QUIET)
    assert rec["removed"][0]["block"] not in ZERO_ATTN and rec["scores"]["angular_distance"][1] is None
    assert not (tmp_path / "x").exists()


def test_config_drop_fields_are_checked_and_round_trip(tmp_path):
    from layerlab.config import ModelConfig, check_fields
    from layerlab.recipe import read_yaml

    assert ModelConfig(layers=4, drop_attn=[3, 1, 1]).drop_attn == [1, 3]
    assert check_fields({"drop-mlp": "0,2", "drop_attn": "1"}, from_text=True) == {"drop_mlp": [0, 2], "drop_attn": [1]}
    (tmp_path / "c.yaml").write_text("model:\n  drop_attn: [1]\n")
    assert read_yaml(tmp_path / "c.yaml") == {"drop_attn": [1]}
    with pytest.raises(LayerlabError, match="drop_attn names block 4, but the model has blocks 0..3"):
        ModelConfig(layers=4, drop_attn=[4])
    with pytest.raises(LayerlabError, match="drop_mlp: block 0 is post; only pre, peri, lns, sandwich blocks"):
        ModelConfig(layers=4, placement="mix", mix_alpha=0.5, drop_mlp=[0])
    with pytest.raises(LayerlabError, match="at least one block must keep its attention"):
        ModelConfig(layers=2, drop_attn=[0, 1])
    model = layerlab.build_model(tiny_cfg(layers=4, drop_mlp=[1, 3]))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["drop_mlp"] == [1, 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").cfg.drop_mlp == [1, 3]


def test_block_pruning_renumbers_the_dropped_sublayers():
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(layers=5, vocab_size=320, drop_attn=[1, 3], drop_mlp=[0])))
    smaller = without_blocks(model.eval(), [2])
    assert smaller.cfg.drop_attn == [1, 2] and smaller.cfg.drop_mlp == [0]
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad(), view(model).skip(2):
        expect = view(model).forward(x).logits
    torch.testing.assert_close(_fwd(smaller, x, use_cache=False).logits, expect)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_healing_keeps_zeroed_sublayers_zero(tmp_path, mode):
    torch.manual_seed(0)
    src = save_model(perturb(_gpt2(), 0.02), tmp_path / "gpt2")
    before = AutoModelForCausalLM.from_pretrained(src).state_dict()
    rec = prune(src, remove=2, unit="attn", metric="bi", heal_steps=3, heal=mode, out=tmp_path / "h", **QUIET)
    assert rec["surgery"] == "zeroed" and len(rec["zeroed"]) == 4 and "does not shrink" in rec["note"]
    assert rec["after"]["bytes"] == rec["before"]["bytes"]
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert type(healed) is GPT2LMHeadModel
    after = healed.state_dict()
    removed = [r["block"] for r in rec["removed"]]
    for i in removed:
        attn = f"transformer.h.{i}.attn"
        assert not after[f"{attn}.c_proj.weight"].any() and not after[f"{attn}.c_proj.bias"].any()
        # no gradient reached the removed attention: its input projection is untouched too
        assert torch.equal(after[f"{attn}.c_attn.weight"], before[f"{attn}.c_attn.weight"])
    kept = f"transformer.h.{next(i for i in range(4) if i not in removed)}.attn.c_proj.weight"
    assert not torch.equal(after[kept], before[kept]), "the rest was healed"


def test_cli_prune_unit(known_sub, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, ["prune", str(known_sub), "--remove", "2", "--unit", "mlp", "--metric", "bi",
                                 "--out", str(tmp_path / "p"), "--tokens", "512", "--measure-tokens", "512"])
    assert r.exit_code == 0, r.output
    assert f"removed the MLP sublayer of blocks {ZERO_MLP} by bi" in r.output and "mlp" in r.output
    r = CliRunner().invoke(app, ["prune", "--help"])
    assert "--unit" in r.output


# ---------------------------------------------------------------- which text each phase reads

def _embedded_splits() -> tuple[str, str]:
    """The embedded corpus' training and validation splits under the byte tokenizer, built by hand from the
    definition (every pydoc topic, sorted by name, as utf-8 bytes followed by eos 256; the last 10% of that
    stream is validation), each token as one character so that a window of ids is a substring."""
    from pydoc_data.topics import topics

    stream = "".join(topics[name].encode("utf-8").decode("latin-1") + chr(256) for name in sorted(topics))
    n_val = int(len(stream) * 0.1)
    return stream[: len(stream) - n_val], stream[len(stream) - n_val :]


def record_reads(monkeypatch, module) -> list[tuple[str, torch.Tensor]]:
    """Record the token ids every forward of ``module``'s command feeds the model, as (phase, ids): ``score``
    inside the table's measure (``Quality``: ``lm_loss`` here), ``heal`` inside healing, ``choose`` anywhere else.

    The ids are taken where the model reads them, at its input embedding (a pre-hook: healing's peft wrapper
    calls ``forward`` directly, past any hook on the model itself), whichever data function produced them."""
    reads: list[tuple[str, torch.Tensor]] = []
    phase = ["choose"]
    hooked: set[int] = set()

    def hook(model):
        emb = model.get_input_embeddings()
        if id(emb) not in hooked:
            hooked.add(id(emb))
            emb.register_forward_pre_hook(lambda m, args: reads.append((phase[0], args[0].detach().cpu().clone())))
        return model

    def in_phase(name, fn):
        def wrapped(model, *args, quality=None, **kwargs):
            phase[0] = name
            try:
                return fn(*([quality] if quality is not None else []), hook(model), *args, **kwargs)
            finally:
                phase[0] = "choose"
        return wrapped

    open_input = module.open_input

    def opened(*args, **kwargs):
        loaded = open_input(*args, **kwargs)
        hook(loaded.model)
        return loaded

    monkeypatch.setattr(module, "open_input", opened)
    # every row of the table is measured by the compressors' Quality (lm_loss for these causal LMs)
    from layerlab.compress.common import Quality

    score = in_phase("score", Quality.__call__)
    monkeypatch.setattr(Quality, "__call__", lambda self, model, *a, **k: score(model, *a, quality=self, **k))
    if hasattr(module, "run_heal"):
        monkeypatch.setattr(module, "run_heal", in_phase("heal", module.run_heal))
    return reads


def _rows(reads, phase: str) -> set[str]:
    return {"".join(map(chr, row.tolist())) for p, ids in reads if p == phase for row in ids}


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_chooses_on_the_training_split_and_is_scored_on_the_validation_split(
        known_sub, tmp_path, monkeypatch, metric, unit):
    """Every window the metric reads lies in the training split of the embedded corpus, every window the
    perplexity reads in the validation split (both built by hand above), and the record names both."""
    prune_module = importlib.import_module("layerlab.compress.prune")  # the module; the package exports prune()
    reads = record_reads(monkeypatch, prune_module)
    rec = prune(known_sub, remove=1, metric=metric, unit=unit, out=tmp_path / "out", **QUIET)
    train, val = _embedded_splits()
    chosen, scored = _rows(reads, "choose"), _rows(reads, "score")
    assert chosen and scored
    outside = [r for r in chosen if r not in train]
    assert not outside, f"{len(outside)} of {len(chosen)} windows the metric read are not training text"
    assert all(r in val for r in scored)
    assert sum(map(len, chosen)) == 512 and len(train) > 2 * 512  # the first 512 tokens, as --measure-tokens says
    assert rec["chosen_on"] == f"embedded train split, first 512 of {len(train):,} tokens"
    assert rec["before"]["slice"] == f"embedded validation split, first 512 of {len(val):,} tokens"
    man = json.loads((tmp_path / "out" / "layerlab.json").read_text())
    assert man["chosen_on"] == rec["chosen_on"]


def _two_alphabet_corpus(path):
    """A corpus whose training split and validation split share no byte: 900 documents of 9 letters a-m
    (8,100 bytes + 900 eos = the first 9,000 tokens) and one of 999 letters n-z (+ eos: the last 1,000 of
    10,000 tokens, i.e. the last 10%). Its first 90% of *bytes* (8,189) run 89 bytes into the last document."""
    import random

    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefghijklm") for _ in range(9)) for _ in range(900)]
    docs.append("".join(rng.choice("nopqrstuvwxyz") for _ in range(999)))
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_with_own_data_choosing_healing_and_scoring_read_disjoint_text(known, tmp_path, monkeypatch, metric):
    """On a user's corpus the metric and healing read only training letters (a-m), the perplexities only
    validation letters (n-z), even when --measure-tokens asks for more than the training split holds."""
    prune_module = importlib.import_module("layerlab.compress.prune")  # the module; the package exports prune()
    data = _two_alphabet_corpus(tmp_path / "corpus.jsonl")
    reads = record_reads(monkeypatch, prune_module)
    rec = prune(known, remove=1, metric=metric, out=tmp_path / "out", data=str(data), tokens=None,
                measure_tokens=12_000, heal_steps=2)
    neutral = {chr(0), chr(256)}  # the padding of a short last window (pad id 0), and eos
    letters = {p: {c for row in _rows(reads, p) for c in row} - neutral for p in ("choose", "heal", "score")}
    assert letters["choose"] <= set("abcdefghijklm") and len(letters["choose"]) == 13
    assert letters["heal"] <= set("abcdefghijklm") and letters["heal"]
    assert letters["score"] <= set("nopqrstuvwxyz") and len(letters["score"]) == 13
    # all of the training split, nothing more (byte 0 is only padding: the corpus has none)
    assert sum(len(r) - r.count(chr(0)) for r in _rows(reads, "choose")) == 9_000
    assert rec["chosen_on"] == rec["healed_on"] == f"{data} train split, all 9,000 tokens"
    assert rec["before"]["slice"] == f"{data} validation split, all 1,000 tokens"


def test_block_measures_equal_a_hand_computation(trained):
    """The block metrics' angular distances and block influence, recomputed from the blocks' own inputs and
    outputs (hooks written here) with the papers' formulas: d = arccos(cos)/pi of each window's last token,
    mean over windows (Gromov et al.); BI = 1 - cos(x_l, x_l+1), mean over all tokens (ShortGPT)."""
    import math

    from layerlab.compress.prune import _held_batches, by_angular, by_bi, stream_measures

    model, tok, _ = load_model(trained)
    got = stream_measures(model, tok, None, 600, "block")
    held = _held_batches(model, tok, None, 600)  # 9 full windows of 64 and one of 24: padding is skipped
    L = len(model.blocks)
    ang, cos_sum, windows, tokens = torch.zeros(L + 1, L + 1, dtype=torch.float64), [0.0] * L, 0, 0
    for ids, mask in held:
        states = {}
        hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a, k: states.__setitem__(0, a[0] if a else
                                                            k["hidden_states"]), with_kwargs=True)]
        for i, b in enumerate(model.blocks):
            hooks.append(b.register_forward_hook(lambda m, a, o, i=i: states.__setitem__(i + 1, o[0] if
                                                                                      isinstance(o, tuple) else o)))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for h in hooks:
            h.remove()
        x = [states[i].double() for i in range(L + 1)]
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())  # right padding: the real tokens are the first n
            last = [x[i][r, n - 1] for i in range(L + 1)]
            for i in range(L + 1):
                for j in range(L + 1):
                    c = float(last[i] @ last[j] / (last[i].norm() * last[j].norm()))
                    ang[i, j] += math.acos(max(-1.0, min(1.0, c))) / math.pi
            for i in range(L):
                a, b = x[i][r, :n], x[i + 1][r, :n]
                cos_sum[i] += float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum())
            windows, tokens = windows + 1, tokens + n
    assert tokens == 600 and windows == 10
    torch.testing.assert_close(torch.tensor(got["angular_distance"], dtype=torch.float64), ang / windows,
                               atol=2e-4, rtol=0)  # float32 forward; arccos is steep near 0
    assert got["influence"] == pytest.approx([1 - c / tokens for c in cos_sum], abs=1e-5)
    for n in (1, 2, 3):
        ends = [float(ang[s, s + n]) / windows for s in range(L + 1 - n)]
        start = min(range(len(ends)), key=ends.__getitem__)
        assert by_angular(model, tok, n, None, 600)[0] == list(range(start, start + n))
        bi = [1 - c / tokens for c in cos_sum]
        assert by_bi(model, tok, n, None, 600)[0] == sorted(sorted(range(L), key=bi.__getitem__)[:n])
