"""Where a run goes and what it trains: its directory (named after the model), and whether it continues one.

``--resume DIR`` continues DIR with its saved config; ``--out DIR`` on an existing run of the same config continues
it too. The training loop (:mod:`layerlab.train.loop`) calls :func:`plan_run` first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RESUMABLE_CHANGES, ModelConfig, TrainConfig, check_fields
from ..errors import LayerlabError
from ..io import MANIFEST, read_json
from ..recipe import RunSpec, resolve


def _differences(a: dict, b: dict, ignore: set[str]) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if k not in ignore
            and a.get(k) != b.get(k)]


# The model fields outside the base name, each with how it reads in a run name (named only where it differs from
# the preset's value; ``vocab_size`` follows the tokenizer, and a test checks that no other field is missing).
_NAME_PARTS: dict[str, Callable[[Any], str]] = {
    "context": lambda v: f"ctx{v}",
    "heads": lambda v: f"h{v}",
    "mlp": str,
    "mlp_hidden": lambda v: f"ff{v}",
    "positions": str,
    "rope_theta": lambda v: f"theta{v:g}",
    "tie_embeddings": lambda v: "tied" if v else "untied",
    "bias": lambda v: "bias" if v else "nobias",
    "head_bias": lambda v: "headbias" if v else "noheadbias",
    "dropout": lambda v: f"drop{v:g}",
    "norm_eps": lambda v: f"eps{v:g}",
    "mix_alpha": lambda v: f"alpha{v:g}",
    "init": str,
    "init_std": lambda v: f"std{v:g}",
    "drop_attn": lambda v: "noattn" + ".".join(map(str, v)),
    "drop_mlp": lambda v: "nomlp" + ".".join(map(str, v)),
    "block": str,
    "wiring": str,
    "denseformer_dilation": lambda v: f"dil{v}",
    "denseformer_period": lambda v: f"per{v}",
    "ffn_sharing": lambda v: f"ffnshare-{v}",
    "ffn_mult": lambda v: f"ffnx{v:g}",
    "experts": lambda v: f"x{v}",
    "top_k": lambda v: f"top{v}",
    "expert_mlp": lambda v: f"experts-{v}",
    "router_aux_coef": lambda v: f"aux{v:g}",
    "loops": lambda v: f"loops{v}",
    "loop_lora_rank": lambda v: f"lora{v}",
    "mod_capacity": lambda v: f"mod{v:g}",
    "msg_blocks": lambda v: "msg" + ".".join(map(str, v)),
    "msg_width": lambda v: f"msgw{v}",
    "msg_hidden": lambda v: f"msgff{v}",
    "msg_mask": lambda v: f"msgm{v:g}",
}


def _placement_name(placement: str | list[str]) -> str:
    """A placement, or a per-block schedule run-length encoded (``pre,pre,post`` is ``pre2.post``)."""
    if isinstance(placement, str):
        return placement
    runs: list[list] = []
    for p in placement:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ".".join(p + (str(n) if n > 1 else "") for p, n in runs)


def default_run_dir(spec: RunSpec) -> Path:
    """``runs/<preset>-<placement>-<norm>-L<layers>-d<width>``, then every other model field that differs from the
    preset's (or, without a preset, the defaults'), so two configs that train different models never share a
    directory by default: ``--mlp swiglu --positions rope`` gives ``runs/tiny-pre-layernorm-L4-d256-swiglu-rope``."""
    m = spec.model
    try:
        base = resolve(spec.preset).model if spec.preset else ModelConfig()
    except LayerlabError:  # a preset that no longer exists: name every field that differs from the defaults
        base = ModelConfig()
    name = f"{spec.preset or 'custom'}-{_placement_name(m.placement)}-{m.norm}-L{m.layers}-d{m.width}"
    # every field, even one this model does not read (rope_theta without rope): plan_run compares them all, and
    # would refuse the directory of a run that differs in it
    extra = [part(getattr(m, f)) for f, part in _NAME_PARTS.items() if getattr(m, f) != getattr(base, f)]
    return Path("runs") / "-".join([name, *extra])


def _check_out_dir(run_dir: Path) -> None:
    """A run directory that can be created (or is one): not a file, nor under one, nor in a read-only folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LayerlabError(f"{run_dir} is a file, not a run directory; choose another --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if parent != run_dir:
        if not parent.is_dir():
            raise LayerlabError(f"cannot create run directory {run_dir}: {parent} is a file; choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LayerlabError(f"cannot create run directory {run_dir}: {parent} is not writable; "
                                "choose another --out")


def _saved_spec(run_dir: Path) -> RunSpec:
    manifest = read_json(run_dir / MANIFEST)
    if manifest.get("command") != "train":
        raise LayerlabError(f"{run_dir} is not a layerlab training run ({MANIFEST} says {manifest.get('command')!r})")
    try:
        args = manifest["args"]
        # the length its LR schedule was laid out for, which later changes of ``steps`` keep (see state.schedule_of)
        extra = {"schedule_steps": int(manifest.get("schedule_steps", args["train"]["steps"]))}
        return RunSpec(ModelConfig(**args["model"]), TrainConfig(**args["train"]), preset=args.get("preset"),
                       extra=extra)
    except (KeyError, TypeError, ValueError, LayerlabError) as e:
        raise LayerlabError(f"{run_dir / MANIFEST} does not hold a readable run config ({e})") from None


def _comparable(spec: RunSpec) -> dict[str, Any]:
    return {**{k: v for k, v in spec.model.to_dict().items() if k != "vocab_size"}, **spec.train.flat_dict()}


def plan_run(preset: str | None, config: str | Path | None, overrides: dict[str, Any] | None,
             out: str | Path | None, resume: str | Path | None) -> tuple[RunSpec, Path, bool]:
    """Decide the spec and directory of a run, and whether it continues an existing one.

    ``--resume DIR`` continues DIR with its saved config; fields given again must agree,
    except those in ``RESUMABLE_CHANGES`` (e.g. ``steps``, to extend a run: its LR schedule
    keeps its length, see :func:`layerlab.train.state.schedule_of`). ``--out DIR`` on an existing run of the same config
    continues it too; any other existing, non-empty directory, or a file, is refused.
    """
    if resume is not None:
        run_dir = Path(resume)
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise LayerlabError("--resume continues a run in its own directory; drop --out or make it the same")
        if not (run_dir / MANIFEST).exists():
            raise LayerlabError(f"cannot resume {run_dir}: not a layerlab run directory ({MANIFEST} missing)")
        saved = _saved_spec(run_dir)
        saved_fields = _comparable(saved)
        if preset is None and config is None:
            asked = check_fields(overrides or {}, source="command line")
        else:
            asked = _comparable(resolve(preset, config, overrides))
        changed = {k: v for k, v in asked.items() if k in saved_fields and saved_fields[k] != v}
        spec = saved
        bad = sorted(k for k in changed if k not in RESUMABLE_CHANGES)
        if bad:
            diffs = ", ".join(f"{k}: saved {saved_fields[k]!r}, asked {changed[k]!r}" for k in bad)
            raise LayerlabError(f"cannot resume {run_dir}: incompatible config ({diffs})")
        for k, v in changed.items():
            setattr(spec.train, k, v)
        return spec, run_dir, True

    spec = resolve(preset, config, overrides)
    run_dir = Path(out) if out is not None else default_run_dir(spec)
    _check_out_dir(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MANIFEST).exists():
            raise LayerlabError(f"output directory {run_dir} exists and is not a layerlab run; choose another --out")
        saved = _saved_spec(run_dir)
        diffs = _differences(_comparable(saved), _comparable(spec), RESUMABLE_CHANGES)
        if diffs:
            raise LayerlabError(
                f"output directory {run_dir} holds a run of a different config ({'; '.join(diffs[:4])}); "
                "choose another --out"
            )
        for k in RESUMABLE_CHANGES & set(TrainConfig.model_fields):
            setattr(saved.train, k, getattr(spec.train, k))
        return saved, run_dir, True
    return spec, run_dir, False
