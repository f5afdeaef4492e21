"""Growth (layerlab.grow): stacking and interpolation against hand-built models, MSG's function preservation and its
masks, one-line errors, `layerlab grow` end to end, and `train --grow-at` resuming exactly."""

import json

import pytest
import torch
from conftest import ctrl_c_at, digest, perturb, save_model, tiny_cfg
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerlab.cli import app
from layerlab.config import ModelConfig, TrainConfig
from layerlab.errors import LayerlabError
from layerlab.grow import GrowSpec, collapse, grow_model, parse_spec, plan, set_mask
from layerlab.model import build_model, num_params
from layerlab.train import train

QUIET = {"progress": False, "echo": lambda *a, **k: None}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return perturb(build_model(tiny_cfg(**kw)), scale=0.1, seed=seed).eval()


def _ids(B=2, T=12, seed=1, V=64):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------ stack and interp: the block order by hand
@pytest.mark.parametrize("method,layers,order", [
    ("stack", "2x", [0, 1, 2, 0, 1, 2]),
    ("stack", "7", [0, 1, 2, 0, 1, 2, 0]),  # the whole stack twice, then its bottom block on top
    ("interp", "2x", [0, 0, 1, 1, 2, 2]),
    ("interp", "7", [0, 0, 0, 1, 1, 2, 2]),  # floor(j * 3 / 7): the earlier blocks take the extra copy
])
def test_stack_and_interp_equal_a_hand_built_model(method, layers, order):
    old = _model()
    grown, _ = grow_model(old, GrowSpec(layers), method)
    # the reference: a model of the new depth whose block j is loaded by hand from old block order[j]
    ref = build_model(tiny_cfg(layers=len(order))).eval()
    ref.embed.load_state_dict(old.embed.state_dict())
    ref.pos.load_state_dict(old.pos.state_dict())
    ref.ln_f.load_state_dict(old.ln_f.state_dict())
    for j, i in enumerate(order):
        ref.blocks[j].load_state_dict(old.blocks[i].state_dict())
    assert grown.cfg.layers == len(order) and not grown.cfg.msg_blocks
    x = _ids()
    torch.testing.assert_close(_logits(grown, x), _logits(ref, x), rtol=0, atol=0)
    for j, i in enumerate(order):
        assert torch.equal(grown.blocks[j].attn.qkv.weight, old.blocks[i].attn.qkv.weight)


# ------------------------------------------------------------------ MSG
def _plain(grown):
    """The same weights in a model built without masks (no hooks at all): MSG's model at mask 1."""
    cfg = ModelConfig(**{**grown.cfg.to_dict(), "msg_blocks": [], "msg_width": 0, "msg_hidden": 0, "msg_mask": 1.0})
    plain = build_model(cfg).eval()
    plain.load_state_dict(grown.state_dict())
    return plain


@pytest.mark.parametrize("norm,placement,kw", [
    ("layernorm", "pre", {}), ("rmsnorm", "pre", {"mlp": "swiglu", "positions": "rope"}), ("layernorm", "post", {}),
    ("rmsnorm", "peri", {}), ("layernorm", "sandwich", {}), ("layernorm", "mix", {}), ("layernorm", "lns", {}),
    ("rmsnorm", "pre", {"block": "parallel"}), ("layernorm", "pre", {"drop_attn": [1]}),
])
@pytest.mark.parametrize("spec", [GrowSpec("2x"), GrowSpec(None, 64), GrowSpec("5", 48)])
def test_msg_keeps_the_function_at_growth_and_is_the_plain_model_at_one(norm, placement, kw, spec):
    old = _model(norm=norm, placement=placement, **kw)
    grown, _ = grow_model(old, spec, "msg", seed=3)
    perturb(grown, scale=0.0)  # (no-op) the new weights stay as drawn: N(0, 0.02), norms at 1 and 0
    x = _ids()
    assert grown.cfg.msg_mask == 0.0
    # at growth: the original model's logits (the original model is the independent reference)
    torch.testing.assert_close(_logits(grown, x), _logits(old, x), rtol=0, atol=2e-5)
    # half-way, the new structures contribute
    set_mask(grown, 0.5)
    assert (_logits(grown, x) - _logits(old, x)).abs().max() > 1e-3
    # at 1: the plain model of the grown shape with the same weights
    set_mask(grown, 1.0)
    plain = _plain(grown)
    torch.testing.assert_close(_logits(grown, x), _logits(plain, x), rtol=0, atol=2e-5)
    collapse(grown)  # masks removed in place: exactly the plain model's forward
    assert not grown.cfg.msg_blocks and not grown.cfg.msg_width
    torch.testing.assert_close(_logits(grown, x), _logits(plain, x), rtol=0, atol=0)


def test_msg_layernorm_statistics_are_over_the_old_coordinates():
    """A width-grown LayerNorm at mask 0 computes (x - mean_C) / std_C over the old C coordinates and gives 0 on the
    new ones (written out here; torch's layer_norm over all C' coordinates would not)."""
    old = _model()
    grown, _ = grow_model(old, GrowSpec(None, 64), "msg")
    ln = grown.blocks[0].ln1
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.1), ln.bias.normal_(0.0, 0.1)
    x = torch.randn(3, 64)
    C = 32
    old_part = x[:, :C]
    mean, var = old_part.mean(-1, keepdim=True), old_part.var(-1, unbiased=False, keepdim=True)
    want = torch.cat([(old_part - mean) / torch.sqrt(var + ln.eps) * ln.weight[:C] + ln.bias[:C],
                      torch.zeros(3, 64 - C)], dim=-1)
    torch.testing.assert_close(ln(x), want, rtol=1e-5, atol=1e-6)


def test_msg_masks_survive_save_and_load_and_generate(tmp_path):
    old = _model()
    grown, _ = grow_model(old, GrowSpec("2x", 64), "msg")
    set_mask(grown, 0.3)
    save_model(grown, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.cfg == grown.cfg and back.cfg.msg_mask == 0.3
    x = _ids(B=1, T=5)
    torch.testing.assert_close(_logits(back, x), _logits(grown, x), rtol=0, atol=0)
    with torch.no_grad():
        out = back.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        y = x
        for _ in range(6):  # greedy by full forwards
            y = torch.cat([y, back(y, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, y)


def test_msg_parameters_count_the_new_heads_and_neurons():
    old = _model()  # 3 blocks, width 32, 2 heads of 16, MLP 128
    grown, _ = grow_model(old, GrowSpec("4", 64), "msg")
    assert (grown.cfg.layers, grown.cfg.width, grown.cfg.heads, grown.cfg.hidden) == (4, 64, 4, 256)
    assert grown.cfg.msg_blocks == [3] and (grown.cfg.msg_width, grown.cfg.msg_hidden) == (32, 128)
    C, V, T, Fh, L = 64, 64, 16, 256, 4  # by hand: embeddings, then per block ln1, qkv, proj, ln2, fc, proj; ln_f
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * Fh + Fh) + (Fh * C + C)
    assert num_params(grown) == V * C + T * C + L * block + 2 * C


# ------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize("kw,spec,method,message", [
    (dict(), GrowSpec("2"), "msg", "cannot grow to fewer blocks: 2 < 3"),
    (dict(), GrowSpec(None, 16), "msg", "cannot grow to less width: 16 < 32"),
    (dict(), GrowSpec(None, 40), "msg", "width 40 is not divisible by the head dimension 16"),
    (dict(), GrowSpec("3"), "msg", "grows nothing"),
    (dict(), GrowSpec(None, 64), "stack", "width growth needs method msg"),
    (dict(norm="dyt"), GrowSpec(None, 64), "msg", "width growth keeps the function only with"),
    (dict(wiring="denseformer"), GrowSpec("2x"), "stack", "grow handles layerlab models of the plain design"),
    (dict(msg_blocks=[2], msg_mask=0.5), GrowSpec("2x"), "msg", "still under MSG masks at 0.5"),
])
def test_bad_growths_are_one_line_errors(kw, spec, method, message):
    with pytest.raises(LayerlabError, match=message) as e:
        plan(tiny_cfg(**kw), spec, method)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,message", [
    (dict(grow_at="20:layers=2x"), "grow_at step 20 is outside the run"),
    (dict(grow_at="0:layers=2x"), "grow_at step 0 is outside the run"),
    (dict(grow_at="5:depth=2x"), "bad growth spec 'depth=2x'"),
    (dict(grow_at="5"), "bad grow_at entry '5'"),
    (dict(grow_at="8:layers=2x,5:width=64"), "grow_at steps must increase"),
    (dict(grow_at="5:layers=2x,8:width=64"), "closer than grow_ramp 20"),
    (dict(grow_at="5:layers=2x", grow_ramp=0), "grow_ramp must be at least 1"),
])
def test_bad_schedules_are_one_line_errors(kw, message):
    with pytest.raises(LayerlabError, match=message) as e:
        TrainConfig(steps=20, **kw)
    assert "\n" not in str(e.value)
    TrainConfig(steps=20, grow_at="5:layers=2x,8:width=64", grow_method="stack")  # stack has no ramp to wait for


def test_parse_spec():
    assert parse_spec("layers=2x+width=128") == GrowSpec("2x", 128)
    assert parse_spec(" layers=12 ") == GrowSpec("12", None)


def test_grow_at_against_the_model_is_checked_before_training(tmp_path):
    over = {"steps": 6, "grow_at": "2:layers=1"}  # debug has 2 layers
    with pytest.raises(LayerlabError, match=r"grow_at 2:layers=1: cannot grow to fewer blocks: 1 < 2"):
        train(preset="debug", overrides=over, out=tmp_path / "r", **QUIET)
    with pytest.raises(LayerlabError, match="grow_at works with the adamw, lamb, lars optimizers; llr"):
        train(preset="debug", overrides={"steps": 6, "grow_at": "2:layers=2x", "optimizer": "llr"},
              out=tmp_path / "r2", **QUIET)


# ------------------------------------------------------------------ the command
def test_grow_command_end_to_end(tmp_path):
    old = _model()
    src = save_model(old, tmp_path / "m")
    before = digest(src)
    out = tmp_path / "g"
    r = CliRunner().invoke(app, ["grow", str(src), "--layers", "2x", "--width", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 -> 6 blocks, width 32 -> 64" in r.output
    assert f"params {num_params(old):,} -> " in r.output
    delta = float(r.output.split("random windows: ")[1].split()[0])
    assert delta < 1e-5
    assert digest(src) == before  # the input untouched
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    x = _ids()
    torch.testing.assert_close(_logits(back, x), _logits(old, x), rtol=0, atol=2e-5)
    record = json.loads((out / "layerlab.json").read_text())
    assert record["command"] == "grow" and record["layers"] == [3, 6]
    r = CliRunner().invoke(app, ["grow", str(src), "--layers", "2x", "--method", "stak", "--out", str(tmp_path / "h")])
    assert isinstance(r.exception, LayerlabError) and "did you mean 'stack'?" in str(r.exception)
    assert not (tmp_path / "h").exists()


# ------------------------------------------------------------------ growth inside a run
RUN = {"layers": 1, "width": 32, "heads": 2, "context": 32, "steps": 12, "batch_size": 2, "eval_every": 6,
       "eval_batches": 1, "save_every": 3, "log_every": 1, "telemetry_every": 0, "warmup": 2,
       "grow_at": "4:layers=2x,8:width=64", "grow_ramp": 3}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("grow") / "whole"
    train(preset="debug", overrides=dict(RUN), out=out, **QUIET)
    return out


def test_grow_at_grows_the_run(whole):
    cfg = json.loads((whole / "config.json").read_text())
    assert (cfg["layers"], cfg["width"], cfg["heads"]) == (2, 64, 4)
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    grown = [r for r in lines if "grown_at" in r]
    assert [(r["grown_at"], r["grow"]) for r in grown] == [(4, "layers=2x"), (8, "width=64")]
    assert grown[0]["params"] < grown[1]["params"]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))


def _stopped_and_resumed(overrides: dict, out, at: int) -> None:
    """A debug run with ``overrides`` stopped by Ctrl-C at step ``at``'s boundary, then resumed to its end."""
    with ctrl_c_at(at), pytest.raises(SystemExit):
        train(preset="debug", overrides=dict(overrides), out=out, **QUIET)
    train(resume=out, **QUIET)


@pytest.mark.parametrize("at", [4, 6, 9])
def test_grow_at_resumes_exactly(whole, tmp_path, at):
    """Stopped at step ``at`` (4: just after the growth, before its first update; 6: masks ramping; 9: after the
    width growth), the resumed run ends with the uninterrupted run's weights and optimizer state."""
    out = tmp_path / "cut"
    _stopped_and_resumed(RUN, out, at)
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(whole / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(out / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert json.loads((out / "config.json").read_text()) == json.loads((whole / "config.json").read_text())


def test_grow_fields_on_the_command_line_and_in_yaml(tmp_path):
    from layerlab.cli import parse_extra
    from layerlab.config import check_fields
    from layerlab.recipe import resolve

    extra = parse_extra(["--grow-at", "100:layers=2x,200:width=128", "--grow-method", "stack", "--grow-ramp", "10"])
    spec = resolve("tiny", None, check_fields(extra, from_text=True, source="command line"))
    assert (spec.train.grow_at, spec.train.grow_method, spec.train.grow_ramp) == ("100:layers=2x,200:width=128",
                                                                                  "stack", 10)
    path = tmp_path / "c.yaml"
    path.write_text("grow_at: '150:layers=12'\ngrow_ramp: 5\n")
    tc = resolve(None, path, {}).train
    assert (tc.grow_at, tc.grow_method, tc.grow_ramp) == ("150:layers=12", "msg", 5)


def test_optimizer_state_of_a_growth():
    """Continuing parameters keep their moments in the old slice (q, k, v rows each in their own block of rows), the
    new entries 0; a fresh MSG block and the second copy of a stacked block start with no state."""
    from layerlab.grow import _transfer
    from layerlab.train.optimizers import build_optimizer

    tc = TrainConfig(steps=10)
    old = _model()
    opt = build_optimizer(old, tc)
    old(_ids(), labels=_ids()).loss.backward()
    opt.step()
    q = old.blocks[0].attn.qkv.weight
    m_old = opt.optimizer.state[q]["exp_avg"]  # (96, 32): q, k, v rows of width 32
    for spec, method in ((GrowSpec("4", 64), "msg"), (GrowSpec("2x"), "stack")):
        new, names = grow_model(old, spec, method)
        new_opt = build_optimizer(new, tc)
        _transfer(opt, new_opt, old, new, names)
        st = new_opt.optimizer.state
        m = st[new.blocks[0].attn.qkv.weight]["exp_avg"]
        C2 = new.cfg.width
        want = torch.zeros(3 * C2, C2)
        for c in range(3):  # by hand: old chunk c (rows 32c..32c+31) to new rows C2 c.., columns 0..31
            want[C2 * c:C2 * c + 32, :32] = m_old[32 * c:32 * c + 32]
        assert torch.equal(m, want)
        assert st[new.blocks[0].attn.qkv.weight]["step"] == opt.optimizer.state[q]["step"]
        assert new.blocks[3].attn.qkv.weight not in st  # MSG's fresh block 3; stack's copy of block 0


# ------------------------------------------------------------------ train --init-from a model directory
BASE = {"layers": 1, "width": 32, "heads": 2, "context": 32, "steps": 6, "batch_size": 2, "eval_every": 6,
        "eval_batches": 2, "save_every": 6, "log_every": 1, "telemetry_every": 0, "warmup": 2}
CONT = {k: v for k, v in BASE.items() if k not in ("layers", "width", "heads", "context")}


@pytest.fixture(scope="module")
def base_and_grown(tmp_path_factory):
    """A trained 1-block run, and its MSG growth to 2 blocks of width 64 (masks at 0: the same function)."""
    from layerlab.grow import grow_dir

    root = tmp_path_factory.mktemp("init")
    train(preset="debug", overrides=dict(BASE), out=root / "base", **QUIET)
    grow_dir(root / "base", root / "grown", layers="2x", width=64, method="msg")
    return root / "base", root / "grown"


def _manifest(run):
    return json.loads((run / "layerlab.json").read_text())


def _last_curve_loss(run):
    """The run's last validation point of the training curve (the first eval_batches windows)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in lines if "val_loss" in r][-1]


def test_init_from_starts_where_the_directory_ends(base_and_grown, tmp_path):
    """The step-0 validation loss of a run started from a model directory is the directory's final one (same
    batches), and the run trains the directory's architecture, with its tokenizer."""
    base, _ = base_and_grown
    out = tmp_path / "cont"
    train(preset="debug", overrides={**CONT, "init_from": str(base)}, out=out, **QUIET)
    results = _manifest(out)["results"]
    assert results["val_loss_step0"] == pytest.approx(_last_curve_loss(base), rel=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["layers"], cfg["width"], cfg["heads"], cfg["context"]) == (1, 32, 2, 32)  # not debug's 2 x 64
    assert results["val_loss"] < results["val_loss_step0"]
    assert _manifest(out)["args"]["train"]["init_from"] == str(base)


def test_init_from_a_msg_growth_ramps_its_masks_and_removes_them(base_and_grown, tmp_path, monkeypatch):
    """Masks at 0 in the directory: step 0 evaluates the old function; they ramp 1/3, 2/3, 1 over grow_ramp 3
    steps and are removed before step 3, so the run ends as the plain grown model."""
    import layerlab.grow as grow_mod

    base, grown = base_and_grown
    seen = []
    real = grow_mod.set_mask
    monkeypatch.setattr(grow_mod, "set_mask", lambda model, value: (seen.append(value), real(model, value)))
    out = tmp_path / "ramp"
    train(preset="debug", overrides={**CONT, "init_from": str(grown), "grow_ramp": 3}, out=out, **QUIET)
    assert _manifest(out)["results"]["val_loss_step0"] == pytest.approx(_last_curve_loss(base), rel=1e-5)
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["layers"], cfg["width"], cfg["msg_blocks"], cfg["msg_width"], cfg["msg_mask"]) == (2, 64, [], 0, 1.0)


@pytest.mark.parametrize("at", [2, 4])
def test_init_from_a_msg_growth_resumes_exactly(base_and_grown, tmp_path, at):
    """Stopped mid-ramp (2) or after the masks are gone (4), the resumed run ends with the uninterrupted one's
    weights."""
    _, grown = base_and_grown
    over = {**CONT, "init_from": str(grown), "grow_ramp": 3}
    train(preset="debug", overrides=dict(over), out=tmp_path / "whole", **QUIET)
    _stopped_and_resumed(over, tmp_path / "cut", at)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_bad_input_is_one_line(base_and_grown, tmp_path):
    from layerlab.recipe import resolve

    base, grown = base_and_grown
    with pytest.raises(LayerlabError, match=r"--init-from .*: layers is 1 there, 4 asked; the architecture is"):
        resolve("debug", None, {"init_from": str(base), "layers": 4})
    assert resolve("debug", None, {"init_from": str(base), "layers": 1}).model.layers == 1  # repeating is fine
    with pytest.raises(LayerlabError, match="uses that directory's tokenizer; drop --tokenizer"):
        resolve("debug", None, {"init_from": str(base), "tokenizer": "bpe:300"})
    bpe = tmp_path / "bpe"  # a directory whose tokenizer layerlab trained: the manifest names it
    bpe.mkdir()
    (bpe / "config.json").write_text((base / "config.json").read_text())
    (bpe / "tokenizer_config.json").write_text(json.dumps({"layerlab_tokenizer": "bpe:300"}))
    assert resolve("debug", None, {"init_from": str(bpe)}).train.tokenizer == "bpe:300"
    with pytest.raises(LayerlabError, match="model path does not exist"):
        resolve("debug", None, {"init_from": str(tmp_path / "nowhere")})
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LayerlabError, match="needs a layerlab model directory .* holds a gpt2 model"):
        resolve("debug", None, {"init_from": str(other)})
    with pytest.raises(LayerlabError, match=r"grow_at 2: the model starts under MSG masks, which reach 1 at step "
                                            r"grow_ramp 3"):
        train(preset="debug", overrides={**CONT, "init_from": str(grown), "grow_ramp": 3, "grow_at": "2:layers=3"},
              out=tmp_path / "r", **QUIET)
    r = CliRunner().invoke(app, ["train", "--init-from", str(base), "--width", "64", "--out", str(tmp_path / "c")])
    assert isinstance(r.exception, LayerlabError) and "width is 32 there, 64 asked" in str(r.exception)
