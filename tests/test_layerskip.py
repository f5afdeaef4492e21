"""LayerSkip (Elhoushi et al., 2024): self-speculative decoding, layer dropout and the early-exit loss."""

import json

import pytest
import torch
from conftest import perturb, save_model, tiny_cfg
from typer.testing import CliRunner

import layerlab
from layerlab.cli import app
from layerlab.errors import LayerlabError
from layerlab.generate import sample, self_speculative_greedy

DESIGNS = [{}, {"positions": "rope"}, {"wiring": "denseformer"}, {"drop_attn": [1]}]


def _model(seed=0, scale=0.3, **kw):
    torch.manual_seed(seed)
    return perturb(layerlab.build_model(tiny_cfg(layers=4, context=48, **kw)), scale, seed=seed).eval()


@torch.no_grad()
def _brute(model, ids, tokens, exit_block, draft):
    """The self-speculative loop by full recomputation, no cache: greedy tokens of the whole model, and the
    number of drafted and accepted tokens, the draft read from the exit block's hidden state."""
    seq, drafted, accepted = ids, 0, 0
    while seq.shape[1] - ids.shape[1] < tokens:
        d = min(draft, tokens - (seq.shape[1] - ids.shape[1]) - 1)
        guess = seq
        for _ in range(d):
            out = model(guess, output_hidden_states=True)
            if exit_block + 1 < len(model.blocks):  # hidden_states[i]: the input of block i
                logits = model.lm_head(model.ln_f(out.hidden_states[exit_block + 1][:, -1]))
            else:  # the last entry is after the final norm
                logits = out.logits[:, -1]
            guess = torch.cat([guess, logits.argmax(-1, keepdim=True)], dim=1)
        k, ok = 0, True
        for i in range(d + 1):
            best = model(seq).logits[:, -1].argmax(-1, keepdim=True)  # whole-model greedy token
            if i < d and ok and int(best) == int(guess[0, seq.shape[1]]):
                k += 1
            else:
                ok = False
            seq = torch.cat([seq, best], dim=1)
            if not ok:
                break
        drafted, accepted = drafted + d, accepted + k
    return seq[:, : ids.shape[1] + tokens], drafted, accepted


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: next(iter(d), "plain"))
def test_self_speculative_output_and_acceptance_equal_a_cacheless_reference(design):
    model = _model(**design)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    seen = set()
    for exit_block in range(4):
        for draft in (1, 3, 5):
            got = self_speculative_greedy(model, ids, 24, exit_block, draft)
            ref, drafted, accepted = _brute(model, ids, 24, exit_block, draft)
            assert torch.equal(ref, plain)  # the reference is greedy decoding
            assert torch.equal(got.ids, plain), (exit_block, draft)
            assert (got.drafted, got.accepted) == (drafted, accepted), (exit_block, draft)
            seen.add(accepted < drafted)
    assert seen == {True, False}  # both rejections (cache roll-back) and full acceptance happened


def test_drafting_with_every_block_accepts_everything_and_verifies_once_per_draft_plus_one():
    model = _model()
    ids = torch.tensor([[3, 1, 4]])
    got = self_speculative_greedy(model, ids, 20, exit_block=3, draft=4)
    assert got.acceptance == 1.0 and got.steps == 4  # 20 tokens = 4 verifications of 4 drafts + 1


def test_sample_with_an_exit_block_reports_and_equals_greedy_and_refuses_bad_input(tmp_path):
    save_model(_model(vocab_size=320), tmp_path)
    notes = []
    text = sample(tmp_path, "ab", tokens=20, temperature=0, exit_block=1, draft=3, echo=notes.append)
    assert text == sample(tmp_path, "ab", tokens=20, temperature=0)
    assert len(notes) == 1 and "tokens/s" in notes[0] and "accepted" in notes[0]
    assert "equal to plain greedy decoding" in notes[0]
    with pytest.raises(LayerlabError, match="beyond the depth"):
        sample(tmp_path, "ab", tokens=5, temperature=0, exit_block=4)
    with pytest.raises(LayerlabError, match="--temperature 0"):
        sample(tmp_path, "ab", tokens=5, exit_block=1)
    with pytest.raises(LayerlabError, match="--draft"):
        sample(tmp_path, "ab", tokens=5, temperature=0, exit_block=1, draft=0)
    res = CliRunner().invoke(app, ["sample", str(tmp_path), "--prompt", "ab", "--tokens", "5", "--temperature",
                                   "0", "--exit-block", "9"])
    assert res.exit_code != 0 and isinstance(res.exception, LayerlabError)  # main() prints it as one line
    assert "beyond the depth" in str(res.exception) and "\n" not in str(res.exception)


# ---------------------------------------------------------------- training: layer dropout and early-exit loss
from contextlib import nullcontext  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from layerlab.config import TrainConfig  # noqa: E402
from layerlab.train import loop  # noqa: E402


def test_layer_drop_rates_are_the_papers_closed_forms():
    exp = loop.layer_drop_rates(5, 0.2, "exp")
    assert exp == pytest.approx([0.0, 0.2 * (2 ** 0.25 - 1), 0.2 * (2 ** 0.5 - 1), 0.2 * (2 ** 0.75 - 1), 0.2])
    assert loop.layer_drop_rates(5, 0.2, "linear") == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_layer_dropout_skips_each_block_for_whole_sequences_at_its_rate_and_never_in_eval():
    model = _model()
    x = torch.randint(0, 64, (1, 6))
    ref = model(x).logits
    loop.add_layer_dropout(model, 0.8, "linear")  # rates 0, 0.267, 0.533, 0.8
    assert torch.equal(model(x).logits, ref)  # eval mode: no block dropped
    model.train()
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda b, a, o, i=i: seen.__setitem__(i, (a[0], o)))
    torch.manual_seed(0)
    model(torch.randint(0, 64, (4000, 2)))
    for i, want in enumerate([0.0, 0.8 / 3, 1.6 / 3, 0.8]):
        inp, out = seen[i]
        skipped = (out == inp).flatten(1).all(1)  # the whole sequence passed unchanged
        untouched = (out != inp).flatten(1).all(1)
        assert bool((skipped | untouched).all())  # per sequence, never per token
        assert float(skipped.float().mean()) == pytest.approx(want, abs=0.03), i


def test_early_exit_curricula_pick_the_blocks_of_the_reference_schedules():
    assert loop.early_exit_blocks(4, 10, 100, "gradual") == [3]  # 0.2 >= (4 - l) / 4 only for l = 3
    assert loop.early_exit_blocks(4, 25, 100, "gradual") == [2, 3]
    assert loop.early_exit_blocks(4, 50, 100, "gradual") == [0, 1, 2, 3]
    assert loop.early_exit_blocks(4, 0, 100, "rotational", 2) == [0, 2, 3]
    assert loop.early_exit_blocks(4, 1, 100, "rotational", 2) == [1, 3]
    assert loop.early_exit_blocks(4, 7, 100, "none") == [0, 1, 2, 3]


def test_early_exit_loss_is_the_weighted_sum_of_every_blocks_head_loss():
    model = _model().train()
    tc = TrainConfig(early_exit_loss=True, early_exit_curriculum="none", early_exit_scale=0.5)
    run = SimpleNamespace(tc=tc, model=model, sched=SimpleNamespace(steps=10), autocast=nullcontext)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    total, last = (t.detach() for t in loop._early_exit_loss(run, model, x, y, step=0))
    # by hand: run the blocks one by one, read each through ln_f + lm_head
    h = model.embed(x) + model.pos(torch.arange(8))[None]
    losses = []
    for block in model.blocks:
        h = block(h)
        losses.append(F.cross_entropy(model.lm_head(model.ln_f(h)).reshape(-1, 64), y.reshape(-1)))
    raw = [0.5 * 1, 0.5 * 3, 0.5 * 6, 10.0]  # (1 + .. + (l+1)), halved below the last block
    want = sum(r * loss for r, loss in zip(raw, losses, strict=True)) / sum(raw)
    assert float(total) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(last) == pytest.approx(float(losses[-1].detach()), rel=1e-5)


def test_training_with_layer_dropout_and_early_exit_loss_runs_and_records_its_fields(tmp_path):
    from layerlab.train import train

    over = {"steps": 4, "eval_every": 4, "save_every": 4, "log_every": 1, "layers": 4, "layer_dropout": 0.3,
            "early_exit_loss": True}
    res = train(preset="debug", overrides=over, out=tmp_path / "ls", progress=False, echo=lambda *a: None)
    assert res.step == 4 and res.val_loss == res.val_loss  # finite, not NaN
    saved = json.loads((tmp_path / "ls" / "layerlab.json").read_text())["args"]["train"]
    assert saved["layer_dropout"] == 0.3 and saved["early_exit_loss"] is True
    with pytest.raises(LayerlabError, match="layer_dropout"):
        TrainConfig(layer_dropout=1.0)
