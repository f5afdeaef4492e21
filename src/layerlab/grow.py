"""Growth: a trained layerlab model made deeper and/or wider (``layerlab grow``), or grown inside a run
(``layerlab train --grow-at STEP:SPEC,...``).

Methods (``--method``):

- ``stack`` (Gong et al., 2019, "Efficient Training of BERT by Progressively Stacking", Sec. 3): the trained stack
  copied on top of itself, new block j = old block j mod L ([0..L-1, 0..L-1] for 2x). A depth N that is not a
  multiple of L takes the whole stack as often as it fits, then its bottom N mod L blocks on top.
- ``interp`` (Pan et al., 2024, "Preparing Lessons for Progressive Training on Language Models", Apollo's
  interpolation): each block repeated next to itself, new block j = old block floor(j L / N) ([0, 0, 1, 1, ...]
  for 2x); for N not a multiple of L the earlier blocks take the extra copy.
- ``msg`` (Yao et al., 2023/ICLR 2024, "Masked Structural Growth for 2x Faster Language Model Pre-training"):
  new blocks, heads, MLP neurons and residual coordinates get a fresh init and sit under a mask m that is 0 at the
  moment of growth, so the grown model computes exactly the old function, and ramps linearly to 1. Where the masks
  act (as MSG's code, cofe-ai/MSG and its lit-gpt variant, places them):

  * a new block (appended on top, as MSG's code grows layers src_depth..trg_depth) outputs m y + (1 - m) x,
    x its input and y its own output;
  * width C -> C' keeps the head dimension D and adds heads (C'/D of them; MSG grows the head count with the hidden
    size), and the MLP's hidden width F -> F' as the config gives it. With v = (1, .., 1, m, .., m) over the
    residual coordinates (the C old ones 1) and v_F likewise over the neurons: the embedding (and learned positions)
    and each sublayer's output are multiplied by v; the new heads' outputs by v before the output projection, the
    new neurons' activations by v_F before the MLP's; every norm takes its statistics weighted by v (LayerNorm:
    mean = sum v x / sum v and the variance weighted alike; RMSNorm: the mean square weighted alike; inner norms
    over heads or neurons with v or v_F) and multiplies its output by v. At m = 0 only the old coordinates enter
    any statistic and the new ones carry 0, so every new weight reads zeros: the function is the old one, eps
    included. At m = 1 every factor is 1 and the statistics are the plain ones: the plain model of width C'.
    MSG's lit-gpt code rescales an RMSNorm of the masked input by sqrt(sum of mask / dim), exact for RMSNorm up to
    eps but not for LayerNorm's mean; the weighted statistics here are exact for both. Other norms are refused for
    width growth (their statistics are not restricted to the old coordinates here).

Where the masks live: in the model's config, so that a model directory or a checkpoint is self-describing
(``msg_blocks``, ``msg_width``, ``msg_hidden`` say where, ``msg_mask`` the value m; :func:`install_masks` puts
them on the modules as forward hooks when the model is built). A run recomputes m before every step from the step
and the schedule, m = min(1, (t - g + 1) / grow_ramp) at step t (0-based) after a growth at g, and from step
g + grow_ramp on, where m has reached 1, removes the masks (:func:`collapse`): the model is then the plain one
(and the compressors and export, which refuse a masked model, take it). A resumed run rebuilds the structure of
its checkpoint from the schedule (:func:`replay`): the checkpoint of step k holds the growths at steps g < k, and
no masks if k > g + grow_ramp. The default ramp, 20 steps (6.7% of a 300-step run), is close to the ratio of MSG's
public BERT script, which passes ``--grow_time 5`` (the steps of a ramp) in a 100-step run.

In a run, the growth at step g happens before step g's update (after g steps); the optimizer is rebuilt over the
grown model (the same rule and groups): a parameter that continues an old one (the same tensor, or its leading
slice after a width growth; for stack and interp, the first copy of each old block) keeps its state, the new
entries of its moments 0; every other parameter (MSG's new blocks, the second copies of stack and interp) starts
with empty state, as a fresh AdamW. The LR schedule goes on unchanged.

A model grown offline (``layerlab grow``) trains on with ``layerlab train --init-from DIR``: the run takes the
directory's architecture, weights and tokenizer, and MSG masks below 1 ramp from their value to 1 over grow_ramp
steps from step 0 and are then removed, as after a growth at step 0 (:func:`masked_start`).

Compute, for comparing a grown run with one trained from scratch: FLOPs ~ 6 x params x tokens, summed over the
steps with the params of each step (:func:`schedule_flops`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GrowSpec, ModelConfig, TrainConfig, parse_grow_schedule, parse_grow_spec
from .errors import LayerlabError
from .io import check_model_dir, check_weights, copy_tokenizer, output_dir, read_json, write_manifest
from .msg import MASK_FIELDS, collapse, has_masks, set_mask

METHODS = ("msg", "stack", "interp")
# norms whose statistics the width masks restrict to the old coordinates ("none" has none)
WIDTH_NORMS = ("layernorm", "rmsnorm", "none")
GROW_OPTIMIZERS = ("adamw", "lamb", "lars")  # per-parameter state only: the others keep per-block rule state


# ---------------------------------------------------------------------------------------------- specs
# GrowSpec and the parsers of SPEC and STEP:SPEC,... live in layerlab.config, which validates grow_at with them
parse_spec = parse_grow_spec
_parse_schedule = functools.cache(parse_grow_schedule)


def target_layers(layers: int, text: str | None) -> int:
    if text is None:
        return layers
    return layers * int(text[:-1]) if text.endswith("x") else int(text)


def block_sources(old: int, new: int, method: str) -> list[int | None]:
    """Which old block each new block copies (None: a fresh block under MSG's mask)."""
    if method == "stack":
        return [j % old for j in range(new)]
    if method == "interp":
        return [j * old // new for j in range(new)]
    return [*range(old), *[None] * (new - old)]


def plan(cfg: ModelConfig, spec: GrowSpec, method: str) -> tuple[ModelConfig, list[int | None]]:
    """The grown config and the source of each new block; every refusal a one-line error."""
    from .model import unplain_fields

    if method not in METHODS:
        raise LayerlabError(f"unknown growth method {method!r}; valid: {', '.join(METHODS)}")
    L, C, D = cfg.layers, cfg.width, cfg.head_dim
    N, W = target_layers(L, spec.layers), spec.width or C
    if N < L:
        raise LayerlabError(f"cannot grow to fewer blocks: {N} < {L}")
    if W < C:
        raise LayerlabError(f"cannot grow to less width: {W} < {C}")
    if N == L and W == C:
        raise LayerlabError(f"growth {spec} grows nothing: the model already has {L} blocks of width {C}")
    if W != C and method != "msg":
        raise LayerlabError(f"width growth needs method msg; {method} copies blocks (a depth operator)")
    if W % D:
        raise LayerlabError(f"width {W} is not divisible by the head dimension {D}: width growth adds whole heads "
                            f"(MSG grows the head count; heads {cfg.heads} -> {W / D:g})")
    if W != C and cfg.norm not in WIDTH_NORMS:
        raise LayerlabError(f"width growth keeps the function only with {', '.join(WIDTH_NORMS)} (statistics "
                            f"restricted to the old coordinates); this model has norm {cfg.norm!r}")
    other = [f"{k}={getattr(cfg, k)!r}" for k in unplain_fields(cfg) if k not in (*MASK_FIELDS, "block")]
    if other:
        raise LayerlabError(f"grow handles layerlab models of the plain design (either block form); this one has "
                            f"{', '.join(other)}")
    if has_masks(cfg):
        raise LayerlabError(f"the model is still under MSG masks at {cfg.msg_mask:g}; train until they reach 1 "
                            "before growing it again")
    sources = block_sources(L, N, method)
    placements = cfg.block_placements()
    fresh_placement = placements[-1]  # MSG's new blocks on top take the last block's placement
    new_places = [placements[s] if s is not None else fresh_placement for s in sources]
    uniform = isinstance(cfg.placement, str) and all(p == cfg.placement for p in new_places)
    changes: dict[str, Any] = {
        "layers": N, "width": W, "heads": W // D, "placement": cfg.placement if uniform else new_places,
        "drop_attn": [j for j, s in enumerate(sources) if s is not None and s in cfg.drop_attn],
        "drop_mlp": [j for j, s in enumerate(sources) if s is not None and s in cfg.drop_mlp],
    }
    if cfg.mlp_hidden and W != C:
        changes["mlp_hidden"] = cfg.mlp_hidden * W // C
    if method == "msg":
        changes.update(msg_blocks=[j for j, s in enumerate(sources) if s is None], msg_width=C if W != C else 0,
                       msg_hidden=cfg.hidden if W != C else 0, msg_mask=0.0)
    new = ModelConfig(**{**cfg.to_dict(), **changes})
    if new.hidden < cfg.hidden:
        raise LayerlabError(f"the MLP would shrink from {cfg.hidden} to {new.hidden} neurons")
    return new, sources


# ---------------------------------------------------------------------------------------------- growing
def _chunks(name: str, cfg: ModelConfig) -> int:
    """How many blocks of rows a fused weight holds: q, k, v in ``attn.qkv``; gate, up in a SwiGLU ``mlp.fc``."""
    if ".attn.qkv." in name:
        return 3
    return 2 if ".mlp.fc." in name and cfg.mlp == "swiglu" else 1


def _place(dst: torch.Tensor, src: torch.Tensor, chunks: int = 1) -> None:
    """Write ``src`` into the leading slice of ``dst`` (of each of its ``chunks`` row blocks)."""
    if chunks > 1:
        for d, s in zip(dst.chunk(chunks, 0), src.chunk(chunks, 0), strict=True):
            _place(d, s)
        return
    dst[tuple(slice(0, n) for n in src.shape)] = src.to(dst.dtype)


_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")


def source_names(new_names, sources: list[int | None]) -> dict[str, tuple[str, bool]]:
    """new name -> (old name, continues): ``continues`` for the first copy of an old block and every tensor outside
    the blocks; a fresh block has no entry."""
    first = {s: j for j, s in reversed(list(enumerate(sources)))}
    out = {}
    for name in new_names:
        m = _BLOCK.match(name)
        if m is None:
            out[name] = (name, True)
            continue
        j = int(m.group(1))
        if sources[j] is not None:
            out[name] = (f"blocks.{sources[j]}.{m.group(2)}", first[sources[j]] == j)
    return out


def grow_model(model: nn.Module, spec: GrowSpec, method: str, seed: int = 0):
    """The grown model (new weights drawn with ``seed``, the old ones copied in), on ``model``'s device and in its
    mode, and the map of :func:`source_names`."""
    from .model import build_model, carry_ids

    new_cfg, sources = plan(model.cfg, spec, method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = build_model(new_cfg)
    old_state = model.state_dict()
    new_state = new.state_dict()
    names = source_names(new_state, sources)
    with torch.no_grad():
        for name, tensor in new_state.items():
            if name in names:
                _place(tensor, old_state[names[name][0]], _chunks(name, new_cfg))
    carry_ids(model, new)
    return new.to(next(model.parameters()).device).train(model.training), names


@torch.no_grad()
def max_logit_change(old: nn.Module, new: nn.Module, windows: int = 4, length: int = 64, seed: int = 0
                     ) -> tuple[float, float]:
    """max |new logits - old logits| on ``windows`` random windows of token ids (seeded), in eval mode, and
    max |old logits| (the scale float error is relative to)."""
    T = min(length, old.cfg.context)
    x = torch.randint(0, old.cfg.vocab_size, (windows, T), generator=torch.Generator().manual_seed(seed))
    x = x.to(next(old.parameters()).device)
    modes = old.training, new.training
    old.eval(), new.eval()
    try:
        before = old(x).logits.float()
        return float((new(x).logits.float() - before).abs().max()), float(before.abs().max())
    finally:
        old.train(modes[0]), new.train(modes[1])


def grow_dir(model_dir: str | Path, out: str | Path, *, layers: str | None = None, width: int | None = None,
             method: str = "msg", seed: int = 0) -> dict[str, Any]:
    """``layerlab grow``: grow a layerlab model directory (or run directory) into ``out`` (written atomically, the
    input untouched). A model whose masks have reached 1 is made plain first. Returns the record of the growth."""
    from .model import LayerlabConfig, LayerlabForCausalLM, num_params

    spec = GrowSpec(layers, width)
    if layers is None and width is None:
        raise LayerlabError("grow needs --layers and/or --width")
    if layers is not None:
        parse_spec(f"layers={layers}")
    model_dir = check_model_dir(model_dir)
    kind = read_json(model_dir / "config.json").get("model_type")
    if kind != LayerlabConfig.model_type:
        raise LayerlabError(f"grow handles layerlab models; {model_dir} holds a {kind} model")
    check_weights(model_dir)
    model = LayerlabForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if has_masks(model.cfg) and model.cfg.msg_mask >= 1:
        collapse(model)
    new, _ = grow_model(model.eval(), spec, method, seed)
    delta, scale = max_logit_change(model, new, seed=seed)
    if method == "msg" and delta > 1e-5 * (1 + scale) * (1 + new.cfg.layers):
        raise LayerlabError(f"MSG growth changed the logits by {delta:.3g}: a bug in layerlab, please report it")
    record = {"method": method, "spec": str(spec), "layers": [model.cfg.layers, new.cfg.layers],
              "width": [model.cfg.width, new.cfg.width], "params": [num_params(model), num_params(new)],
              "max_abs_logit_change": delta, "seed": seed}
    args = {"model": str(model_dir), "layers": layers, "width": width, "method": method, "seed": seed}
    with output_dir(out, protect=(model_dir,)) as tmp:
        new.save_pretrained(tmp)
        copy_tokenizer(model_dir, tmp)  # the input's tokenizer, byte for byte
        write_manifest(tmp, "grow", args, **record)
    return record


def grow_lines(record: dict[str, Any], out: str | Path = "OUT") -> list[str]:
    """The printed summary of :func:`grow_dir` (written to ``out``)."""
    (l0, l1), (w0, w1), (p0, p1) = record["layers"], record["width"], record["params"]
    note = " (MSG: 0 up to float error, the masks start at 0)" if record["method"] == "msg" else ""
    return [f"grow {record['method']} {record['spec']}: {l0} -> {l1} blocks, width {w0} -> {w1}",
            f"params {p0:,} -> {p1:,}",
            f"max |delta logit| against the original on 4 random windows: {record['max_abs_logit_change']:.3g}{note}",
            f"train it further: layerlab train --init-from {out} --steps N --out RUN"
            + (" (the masks ramp to 1 over --grow-ramp steps)" if record["method"] == "msg" else "")]


# ---------------------------------------------------------------------------------------------- in a run
def schedule(tc: TrainConfig) -> tuple[tuple[int, GrowSpec], ...]:
    return _parse_schedule(tc.grow_at, tc.steps) if tc.grow_at else ()


def mask_at(step: int, grown: int, ramp: int, start: float = 0.0) -> float:
    """MSG's linear ramp: m = min(1, (t - g + 1) / ramp) at step t after a growth at step g; from a mask value
    ``start`` (a masked start), m = min(1, start + (1 - start)(t - g + 1) / ramp)."""
    return min(1.0, start + (1.0 - start) * (step - grown + 1) / ramp)


def _seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + 7919 * step + 1) % (2**63)


def masked_start(mc: ModelConfig) -> bool:
    """Whether a run starts under MSG masks below 1 (``--init-from`` a ``grow --method msg`` output): they ramp
    from their value m0 to 1 over grow_ramp steps from step 0 (:func:`mask_at`), as after a growth at step 0.
    Masks already at 1 are removed when the model is built (:func:`replay`)."""
    return has_masks(mc) and mc.msg_mask < 1


def _growth_steps(mc: ModelConfig, tc: TrainConfig) -> list[int]:
    """The steps after which masks ramp: the growths of the schedule, and 0 for a masked start."""
    return [0] * masked_start(mc) + [g for g, _ in schedule(tc)]


def check_run(mc: ModelConfig, tc: TrainConfig, d=None) -> None:
    """A run's growth schedule against its model: every growth possible, one line each where not. A masked start
    needs its masks at 1 (grow_ramp steps) before the first growth."""
    from .norms import is_batch_norm

    events = schedule(tc)
    if masked_start(mc) and events and events[0][0] < tc.grow_ramp:
        raise LayerlabError(f"grow_at {events[0][0]}: the model starts under MSG masks, which reach 1 at step "
                            f"grow_ramp {tc.grow_ramp}; grow at that step or later")
    if not tc.grow_at:
        return
    if d is not None and d.active:
        raise LayerlabError("grow_at trains in one process (a growth rebuilds the model and its optimizer)")
    if tc.optimizer not in GROW_OPTIMIZERS:
        raise LayerlabError(f"grow_at works with the {', '.join(GROW_OPTIMIZERS)} optimizers; {tc.optimizer} keeps "
                            "per-block state that a growth would have to remap")
    if is_batch_norm(mc.norm):
        raise LayerlabError(f"grow_at: norm {mc.norm} keeps running statistics per block that a growth would have "
                            "to remap")
    cfg = mc
    for g, spec in schedule(tc):
        try:
            cfg, _ = plan(cfg.model_copy(update=MASK_FIELDS), spec, tc.grow_method)
        except LayerlabError as e:
            raise LayerlabError(f"grow_at {g}:{spec}: {e}") from None


def replay(model: nn.Module, tc: TrainConfig, start: int) -> nn.Module:
    """The model with the structure of the run's checkpoint of step ``start`` (growths before it; its masks gone
    where they had reached 1): its weights are then loaded over it."""
    if has_masks(model.cfg) and model.cfg.msg_mask >= 1:  # masks already at 1: the plain model
        collapse(model)
    grown = 0 if masked_start(model.cfg) else None
    for g, spec in schedule(tc):
        if g >= start:
            break
        if has_masks(model.cfg):
            collapse(model)
        model, _ = grow_model(model, spec, tc.grow_method, _seed(tc.seed, g))
        grown = g
    if grown is not None and has_masks(model.cfg) and start - 1 >= grown + tc.grow_ramp:
        collapse(model)
    return model


def _transfer(old_opt, new_opt, old_model: nn.Module, new_model: nn.Module, names) -> None:
    """Optimizer state for the grown model: see the module's docstring."""
    old_params = dict(old_model.named_parameters())
    chunks_cfg = new_model.cfg
    for name, p in new_model.named_parameters():
        if name not in names or not names[name][1]:
            continue
        q = old_params.get(names[name][0])
        state = old_opt.optimizer.state.get(q) if q is not None else None
        if not state:
            continue
        moved = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == q.shape:
                z = torch.zeros_like(p)
                _place(z, value, _chunks(name, chunks_cfg))
                moved[key] = z
            else:
                moved[key] = value.clone() if torch.is_tensor(value) else value
        new_opt.optimizer.state[p] = moved


def before_step(run, at, add_layer_dropout) -> None:
    """Before step ``at.step`` of a run (:class:`layerlab.train.state.Run`, the loop's progress ``at``): remove
    masks that have reached 1, grow if the schedule says so (the model, its parallel wrapper and its optimizer
    rebuilt, of the same classes; ``add_layer_dropout`` the loop's LayerSkip hooks), set this step's mask value."""
    tc = run.tc
    events = schedule(tc)
    if not events and not masked_start(run.mc):
        return
    step = at.step
    past = [g for g in _growth_steps(run.mc, tc) if g <= step]
    model = run.model
    if has_masks(model.cfg) and past and step >= past[-1] + tc.grow_ramp and past[-1] != step:
        collapse(model)
    spec = dict(events).get(step)
    if spec is not None:
        _grow_in_run(run, at, spec, add_layer_dropout)
    if has_masks(run.model.cfg):  # from the start's mask value while the start's ramp runs
        start = run.mc.msg_mask if masked_start(run.mc) and past[-1] == 0 else 0.0  # (grow_at steps are >= 1)
        set_mask(run.model, mask_at(step, past[-1], tc.grow_ramp, start))


def load_init(model: nn.Module, model_dir: str | Path) -> None:
    """Load the weights of a layerlab model directory (``train --init-from``) into ``model``, built from the
    directory's config (:func:`layerlab.recipe.init_model_fields`); a directory whose weights do not fit it is
    refused in one line."""
    from .model import LayerlabForCausalLM, load_weights_into

    path = check_model_dir(model_dir)
    check_weights(path)
    source = LayerlabForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_weights_into(model, source.state_dict(), f"--init-from {path}: its weights do not fit its config")


def _grow_in_run(run, at, spec: GrowSpec, add_layer_dropout) -> None:
    from .model import num_params
    from .norms import set_norm_schedule

    tc, step = run.tc, at.step
    at.clean = False  # the structure is no longer that of the checkpoint of this step
    old = run.model
    if has_masks(old.cfg):
        collapse(old)
    before = num_params(old)
    new, names = grow_model(old, spec, tc.grow_method, _seed(tc.seed, step))
    set_norm_schedule(new, run.sched.steps * tc.grad_accum)
    add_layer_dropout(new, tc.layer_dropout, tc.layer_dropout_schedule)
    optimizer = type(run.optimizer)(new, run.sched)  # the run's rule (optimizers.build_optimizer's class)
    _transfer(run.optimizer, optimizer, old, new, names)
    run.model, run.optimizer = new, optimizer
    run.par = type(run.par)(new, run.d, tc, run.par.compile)  # one process (check_run): the model as it is
    run.n_params = num_params(new)
    run.echo(f"step {step}: grew {spec} by {tc.grow_method}: {old.cfg.layers} -> {new.cfg.layers} blocks, width "
             f"{old.cfg.width} -> {new.cfg.width}, params {before:,} -> {run.n_params:,}")
    # on the line of the step that follows: a resume from this step's checkpoint drops it with the step's own
    at.log.write({"step": step + 1, "grown_at": step, "grow": str(spec), "params": run.n_params})


def schedule_flops(mc: ModelConfig, tc: TrainConfig, params_of=None) -> float:
    """6 x params x tokens summed over the run's steps, with the params of each step (a growth changes them):
    the compute a grown run is compared at. ``params_of(cfg)`` counts a config's params (default: built)."""
    from .model import build_model, num_params

    params_of = params_of or (lambda cfg: num_params(build_model(cfg)))
    tokens = tc.batch_size * mc.context * tc.grad_accum
    cfg, last, total = mc, 0, 0.0
    for g, spec in (*schedule(tc), (tc.steps, None)):
        total += 6.0 * params_of(cfg) * tokens * (g - last)
        if spec is not None:
            cfg, _ = plan(cfg.model_copy(update=MASK_FIELDS), spec, tc.grow_method)
        last = g
    return total

