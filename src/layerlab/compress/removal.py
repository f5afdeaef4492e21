"""What removing blocks or sublayers does to a model: the config of the model that keeps some blocks, the model
rebuilt without the others (weights renumbered), and a sublayer's removal, by transformers' per-layer
``skip`` where the installed transformers builds the family without the modules and computes what zeroing
computes, else by zeroing its output projection (:mod:`layerlab.compress.prune` explains the choice and chooses
what to remove)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from ..adapters import SUBLAYERS, LayerView, view
from ..data import window_length
from ..errors import LayerlabError, choices_error
from ..registry import PLACEMENTS, residual_placement_names

UNIT_NAMES = {"block": "block", "attn": "attention", "mlp": "MLP"}

# the skip type of each sublayer in transformers' per-layer configuration (``per_layer_config`` with ``skip``, the
# names of the skip descriptors of transformers' heterogeneity integration: "attention" and "mlp")
SKIP_TYPES = {"attn": "attention", "mlp": "mlp"}
# the sublayer's modules in a layerlab block; what drop_attn / drop_mlp leaves out
_LAYERLAB_PARTS = {"attn": ("ln1", "attn", "ln1_out"), "mlp": ("ln2", "mlp", "ln2_out")}


def blocks_config(model, keep: list[int], v: LayerView | None = None):
    """A copy of ``model``'s config for the model that keeps only blocks ``keep`` (renumbered 0..): the layer
    count, layerlab's placement schedule and sublayer drops, the per-block lists (``layer_types``,
    ``attention_layers``, ...) and the MoE dense-block keys, rewritten as an explicit list. Both the in-memory
    :func:`without_blocks` and the offloaded writer (:func:`layerlab.offload.write_pruned`) take it from here."""
    v = v if v is not None else view(model)
    config = copy.deepcopy(model.config)
    if config.model_type == "layerlab":
        placements = model.cfg.block_placements()
        if any(PLACEMENTS[p].depth_scale for p in placements):
            raise LayerlabError("pruning a depth-scaled (LNS) model would change the 1/sqrt(l) scale of every block "
                                "after the cut; not supported")
        kept = [placements[i] for i in keep]
        # a schedule (mix) is written out as a per-block list: the cut changes where its switch falls
        scheduled = isinstance(model.cfg.placement, str) and PLACEMENTS[model.cfg.placement].schedule is not None
        config.placement = kept[0] if len(set(kept)) == 1 and not scheduled else kept
        config.layers = len(keep)
        for key in ("drop_attn", "drop_mlp"):  # blocks that lack a sublayer keep lacking it, renumbered
            setattr(config, key, [keep.index(i) for i in getattr(model.cfg, key) if i in keep])
    else:
        L = config.num_hidden_layers
        config.num_hidden_layers = len(keep)
        skip = set(v.arch.dense_layers or ())
        for key, value in config.to_dict().items():  # per-block lists (layer_types, attention_layers, ...): cut
            if "layer" in key and key not in skip and isinstance(value, (list, tuple)) and len(value) == L:
                setattr(config, key, [value[i] for i in keep])
        if v.arch.dense_layers and hasattr(config, v.arch.dense_layers[0]):
            # which blocks are dense follows from a step and a list of indices; after the cut, list them all
            dense = [new for new, old in enumerate(keep) if v.router(old) is None]
            setattr(config, v.arch.dense_layers[0], dense)
            setattr(config, v.arch.dense_layers[1], 1)
    return config


def without_blocks(model, remove: list[int]):
    """A new model of the same class with the given blocks removed and the rest renumbered."""
    v = view(model)
    keep = [i for i in range(v.num_layers) if i not in set(remove)]
    config = blocks_config(model, keep, v)
    prefix = v.arch.blocks + "."
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) not in renumber:
                continue
            key = f"{prefix}{renumber[int(idx)]}.{rest}"
        state[key] = value
    try:
        smaller = _built_like(model, config)
    except Exception as e:  # noqa: BLE001  (a config whose per-block settings are not a plain list, say)
        raise LayerlabError(f"cannot remove blocks from this {config.model_type!r} config: {_first_line(e)}") from None
    _load(smaller, state)
    return smaller.eval()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _built_like(model, config):
    """A new model of ``model``'s class from ``config``, in ``model``'s dtype, as from_pretrained builds it (a
    bf16 model stays bf16)."""
    dtype = next(model.parameters()).dtype
    build = getattr(type(model), "_from_config", None)
    return build(config, dtype=dtype) if build is not None else type(model)(config).to(dtype)


def _load(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise LayerlabError(f"could not move the weights: missing {missing}, unexpected {unexpected}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _check_residual(v: LayerView, unit: str) -> None:
    bad = sorted({p for p in v.placements() if not PLACEMENTS[p].residual_sublayers})
    if bad:
        raise LayerlabError(f"--unit {unit} needs blocks that add each sublayer to the residual stream "
                            f"({', '.join(residual_placement_names())}); this model has {', '.join(bad)} blocks")


def sublayer_removal(model, unit: str, remove: list[int], v: LayerView | None = None) -> tuple:
    """``(config, gone, why)``: how transformers itself would leave out the ``unit`` sublayer of blocks ``remove``
    of the Hugging Face ``model``.

    ``config`` is a copy of ``model``'s with transformers' heterogeneous per-layer configuration
    (``per_layer_config = {i: {"skip": ["attention"]}}``, or ``"mlp"``; merged with the skips it already has),
    and ``gone`` the parameter names that the model built from it lacks. That holds only where the installed
    transformers builds the family without those modules: the model is built on the ``meta`` device and must lack
    parameters of blocks ``remove`` only, including the sublayer's output projection (:meth:`LayerView.out_proj_path`),
    and gain none. Otherwise ``config`` is None and ``why`` says, in one line, what transformers does instead.
    Whether the result also computes what zeroing computes is checked on the weights (:func:`_computes_as_skipped`).
    """
    import transformers

    from ..offload import _parameters_on_meta

    v = v if v is not None else view(model)
    kind, mt = SKIP_TYPES[unit], model.config.model_type
    release = f"transformers {transformers.__version__}"
    config = copy.deepcopy(model.config)
    try:
        overrides = {int(k): dict(o) for k, o in (model.config.to_dict().get("per_layer_config") or {}).items()}
        for i in remove:
            layer = overrides.setdefault(i, {})
            layer["skip"] = sorted(set(layer.get("skip", ())) | {kind})
        config.per_layer_config = overrides
    except Exception as e:  # noqa: BLE001  (a release without per-layer configurations, say)
        return None, [], f"{release} has no per-layer skip for a {mt} config ({_first_line(e)})"
    try:
        with warnings.catch_warnings(), _parameters_on_meta():
            warnings.simplefilter("ignore")
            built = type(model)(config)
    except Exception as e:  # noqa: BLE001
        return None, [], f"{release} cannot build a {mt} model with a per-layer skip ({_first_line(e)})"
    have, got = set(model.state_dict()), set(built.state_dict())
    gone = sorted(have - got)
    prefix = f"{v.arch.blocks}."
    blocks = {n[len(prefix):].split(".", 1)[0] for n in gone if n.startswith(prefix)}
    projections = [f"{prefix}{i}.{v.out_proj_path(i, unit)}." for i in remove]
    if (got - have or any(not n.startswith(prefix) for n in gone) or blocks != {str(i) for i in remove}
            or not all(any(n.startswith(p) for n in gone) for p in projections)):
        return None, [], (f"{release} saves per_layer_config's skip but still builds the skipped modules of a {mt} "
                          "model (its model classes do not read skip)")
    return config, gone, ""


@torch.no_grad()
def _computes_as_skipped(model, smaller, unit: str, remove: list[int], v: LayerView | None = None) -> bool:
    """Whether ``smaller`` computes the logits of ``model`` with the ``unit`` sublayer of blocks ``remove`` skipped
    (:meth:`LayerView.skip_sublayers`, what zeroing computes) on one window of 16 token ids, within the rounding
    of the dtype (``torch.testing.assert_close``'s tolerances; fewer ids where the model's window is shorter)."""
    v = v if v is not None else view(model)
    vocab = v.embed.num_embeddings if hasattr(v.embed, "num_embeddings") else model.config.vocab_size
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    ids = (torch.arange(min(16, window_length(model.config)), device=device) * 7919 % vocab).unsqueeze(0)
    with v.skip_sublayers(unit, *remove):
        expect = v.forward(ids).logits.float()
    got = view(smaller).forward(ids).logits.float()
    try:
        torch.testing.assert_close(got, expect, rtol=_RTOL.get(next(model.parameters()).dtype, 1.6e-2), atol=1e-5)
    except AssertionError:
        return False
    return True


_RTOL = {torch.float32: 1.3e-6, torch.float64: 1e-7, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@torch.no_grad()
def without_sublayers(model, unit: str, remove: list[int]):
    """``(new model, zeroed weight names)``: :func:`remove_sublayers` without its reason."""
    smaller, zeroed, _ = remove_sublayers(model, unit, remove)
    return smaller, zeroed


@torch.no_grad()
def remove_sublayers(model, unit: str, remove: list[int]):
    """``(new model, zeroed weight names, why)``: ``model`` with the ``unit`` sublayer of blocks ``remove`` removed.

    A layerlab model is rebuilt without the sublayer's modules (config ``drop_attn``/``drop_mlp``) and
    the list is empty. A Hugging Face model is rebuilt from transformers' per-layer configuration
    (:func:`sublayer_removal`) without the skipped modules, and the list is empty, where the installed
    transformers builds it so and it computes what skipping computes (:func:`_computes_as_skipped`);
    otherwise it is copied with the sublayer's output projection zeroed, weight and bias, the list names those
    weights and ``why`` says why they were zeroed. Either way, the result computes exactly what
    ``view(model).skip_sublayers(unit, *remove)`` computes.
    """
    if unit not in SUBLAYERS:
        raise choices_error("sublayer", unit, SUBLAYERS)
    v = view(model)
    _check_residual(v, unit)
    present = present_sublayers(model, unit)
    for i in remove:
        if not 0 <= i < v.num_layers or not present[i]:
            raise LayerlabError(f"block {i} has no {UNIT_NAMES[unit]} sublayer to remove")
    if v.arch_name != "layerlab":
        config, gone, why = sublayer_removal(model, unit, remove, v)
        if config is not None:
            left = set(gone)
            smaller = _built_like(model, config)
            _load(smaller, {k: t for k, t in model.state_dict().items() if k not in left})
            if _computes_as_skipped(model, smaller.eval(), unit, remove, v):
                return smaller.eval(), [], ""
            why = (f"transformers builds the {model.config.model_type} model without the skipped modules, but it "
                   "does not compute what zeroing them computes")
            del smaller
        smaller = copy.deepcopy(model)
        zeroed = []
        for i in sorted(remove):
            path = v.out_proj_path(i, unit)
            for name, p in smaller.get_submodule(f"{v.arch.blocks}.{i}.{path}").named_parameters(recurse=False):
                p.zero_()
                zeroed.append(f"{v.arch.blocks}.{i}.{path}.{name}")
        return smaller.eval(), zeroed, why
    config = copy.deepcopy(model.config)
    key = f"drop_{unit}"
    setattr(config, key, sorted(set(getattr(model.cfg, key)) | set(remove)))
    smaller = type(model)(config)
    wanted = smaller.state_dict()
    gone = tuple(f"blocks.{i}.{part}." for i in remove for part in _LAYERLAB_PARTS[unit])
    left = [k for k in model.state_dict() if k not in wanted and not k.startswith(gone)]
    if left:
        raise LayerlabError(f"removing the {UNIT_NAMES[unit]} sublayers would also lose {left}")
    _load(smaller, {k: t for k, t in model.state_dict().items() if k in wanted})
    return smaller.eval(), [], ""


@contextmanager
def _keeping_zeroed(model) -> Iterator[None]:
    """While healing, hold every zeroed sublayer of a Hugging Face model at zero output.

    Healing would otherwise train the zeroed projection (``full``) or a LoRA adapter on it, and
    merging would un-zero it. With its output replaced by zeros, no gradient reaches the sublayer,
    so its weights, and those of LoRA's B (initialised to zero), stay exactly as they are.
    """
    v = view(model)
    with ExitStack() as stack:
        if v.arch_name != "layerlab" and v.sublayers_known:  # a layerlab model has no modules for a removed sublayer
            for unit in SUBLAYERS:
                gone = [i for i, here in enumerate(present_sublayers(model, unit)) if not here]
                if gone:
                    stack.enter_context(v.skip_sublayers(unit, *gone))
        yield


def present_sublayers(model, unit: str, om=None) -> list[bool]:
    """Per block, whether its ``unit`` sublayer is still there: not dropped from a layerlab block, and
    not zeroed by an earlier prune (weight and bias of its output projection) in a Hugging Face one. With
    ``om`` (the :class:`~layerlab.offload.Offloaded` that ``model`` belongs to) the projection's tensors are
    read from the checkpoint one at a time."""
    v = om.view if om is not None else view(model)
    out = []
    for b in v.blocks:
        if (b.attn_out if unit == "attn" else b.mlp_out) is None:
            out.append(False)
        elif v.arch_name == "layerlab":  # an existing layerlab sublayer counts, even with zero weights
            out.append(True)
        elif not _has_projection(b.module, v.out_proj_path(b.index, unit)):  # skipped: no weights to add through
            out.append(False)
        else:
            path = v.out_proj_path(b.index, unit)
            proj = b.module.get_submodule(path)
            if om is None:
                out.append(any(bool(p.any()) for p in proj.parameters(recurse=False)))
            else:
                names = [f"{om.blocks_prefix}.{b.index}.{path}.{n}" for n, _ in proj.named_parameters(recurse=False)]
                out.append(any(bool(om._read(n).any()) for n in names))
    return out


def _has_projection(block, path: str) -> bool:
    """Whether ``block`` has the output projection at ``path`` with weights: a sublayer that transformers built
    as skipped (``per_layer_config``) has none."""
    try:
        proj = block.get_submodule(path)
    except AttributeError:
        return False
    return any(True for _ in proj.parameters(recurse=False))
