"""LayerView: any supported model as an ordered list of blocks with named parts.

One registry entry per architecture maps the fixed names (``ln1``, ``attn``, ``ln2``, ``mlp``,
final norm, unembedding) onto the model's module paths, as TransformerLens'
``component_mapping`` does. layerlab's own model uses these names natively. An entry also says how
its blocks differ from the sequential Pre-LN form (``Arch.form``: parallel sublayers, output-normalised
sublayers), where a sublayer's output is normalised, whether the logits are soft-capped, and where a
mixture-of-experts block keeps its router and experts; the methods read those fields, never a family's name.

Everything that reads or edits layers goes through a :class:`LayerView`:
- :meth:`LayerView.trace` hooks the residual stream entering and leaving each block and the
  output each sublayer adds to it, for one forward at a time;
- :meth:`LayerView.skip` runs the model with blocks removed, without copying it;
- :meth:`LayerView.skip_sublayers` runs it with attention or MLP sublayers adding nothing;
- :meth:`LayerView.linears` lists a block's linear weights as (out, in) matrices;
- :meth:`LayerView.replace` swaps a named part (a norm, say) for another module.

:func:`load_model` is the project's one model loader: any supported model directory, layerlab's or
Hugging Face's, with its tokenizer and its view. Every command opens its input through it.

The registry and the view live in :mod:`.core` (re-exported here); :mod:`.discover` builds a view for a
``model_type`` with no entry on top of it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn

from .. import model as _registers_layerlab  # noqa: F401  (the Auto classes learn layerlab's model and quantizer)
from ..errors import VOCAB_FILES, LayerlabError, no_tokenizer_error
from ..io import check_model_dir, check_weights
from ..registry import SUBLAYERS  # noqa: F401  (re-exported)
from .archs import ARCHS, FORMS, MODEL_TYPES, VARIANTS, Arch, arch_of, unsupported_error  # noqa: F401
from .core import (  # noqa: F401  (re-exported: the package is the adapters' public face)
    BlockView,
    LayerView,
    Trace,
    _find,
    _first,
    _get,
    router_load,
    router_stats,
)


def view(model: nn.Module) -> LayerView:
    """The :class:`LayerView` of a loaded model: its registered entry, or, for a causal LM whose ``model_type``
    has none, a block-level view of the structure discovered from its module tree
    (:func:`layerlab.adapters.discover.discovered_view`; one line naming what was found where that fails)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        from .discover import discoverable, discovered_view  # discover imports this module

        if discoverable(model_type):
            return discovered_view(model)
    return LayerView(model, arch_of(model))




def stream_norms(v: LayerView) -> dict[str, nn.Module]:
    """The norms that read the residual stream, by module path: every block's ``ln1``/``ln2`` and the final norm."""
    out = {}
    for b in v.blocks:
        for part in ("ln1", "ln2"):
            if part in v.arch.parts and part in b.parts:
                out[f"{v.arch.blocks}.{b.index}.{v.arch.parts[part]}"] = b.parts[part]
    if v.final_norm is not None:
        out[v.arch.final_norm] = v.final_norm
    return out


@torch.no_grad()
def swap_stream_norms(model: nn.Module, norm: str = "rmsnorm", *, keep_bias: bool = True) -> nn.Module:
    """Put an RMSNorm (``norm``: ``"rmsnorm"`` or ``"crmsnorm"``) in place of every stream norm (in place).

    For a LayerNorm family whose residual stream ``convert --to rmsnorm`` recentred (Jiang et al., 2023): there
    each LayerNorm (gain g, epsilon e) computes exactly RMSNorm with the same g and e. A LayerNorm with a bias b
    becomes RMSNorm then + b (:class:`~layerlab.norms.RMSNormWithBias`; b is zero where convert folded it into
    the linears that read the norm), so the state dict keeps the family's keys and a model written after the
    swap still loads in plain transformers; with ``keep_bias=False`` the biases must already be folded and the
    norms are plain RMSNorm. Returns ``model``."""
    from ..norms import CRMSNormWithBias, RMSNormWithBias
    from ..registry import NORMS

    v = view(model)
    parts = {f"{v.arch.blocks}.{b.index}.{v.arch.parts[p]}": (b.index, p) for b in v.blocks for p in ("ln1", "ln2")
             if p in b.parts}
    for name, old in stream_norms(v).items():
        if not isinstance(old, nn.LayerNorm):
            raise LayerlabError(f"{name} is a {type(old).__name__}, not the LayerNorm of a recentred model")
        g = old.weight.detach() if old.weight is not None else torch.ones(old.normalized_shape[-1])
        keep = keep_bias and old.bias is not None
        cls = {"rmsnorm": RMSNormWithBias, "crmsnorm": CRMSNormWithBias}[norm] if keep else NORMS[norm]
        new = cls(g.numel(), eps=old.eps).to(device=g.device, dtype=g.dtype)
        new.weight.copy_(g)
        if keep:
            new.bias = nn.Parameter(old.bias.detach().clone())
        if name in parts:
            v.replace(*parts[name], new)
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


class Loaded(NamedTuple):
    """What :func:`load_model` returns: unpack it as ``model, tokenizer, view = load_model(path)``."""

    model: nn.Module
    tokenizer: Any  # the directory's transformers tokenizer; None only with need_tokenizer=False, when it has none
    view: LayerView


def _empty(tokenizer) -> bool:
    """Whether a transformers tokenizer has no vocabulary beyond its special and added tokens.

    transformers 5 builds such a tokenizer, without an error, for a model directory that holds no tokenizer
    files (a GPT-2's is a byte-level BPE with an empty vocabulary and ``<|endoftext|>``, a BERT's a WordPiece of
    its five special tokens), or whose files hold no tokens; it encodes text to nothing or to unknowns.
    """
    extra = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return not set(tokenizer.get_vocab()) - extra


def load_tokenizer(path: Path, need: bool):
    """The directory's transformers tokenizer; a missing or empty one is an error when ``need``, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        if not any((path / name).is_file() for name in VOCAB_FILES):  # nothing to build one from
            tokenizer = None
        else:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LayerlabError(f"cannot load the tokenizer of {path}: {first}") from None
    if tokenizer is not None and _empty(tokenizer):  # what transformers 5 builds where there are no files
        tokenizer = None
    if tokenizer is None and need:
        raise no_tokenizer_error(path)
    return tokenizer


def load_model(path: str | Path, *, dtype: str | torch.dtype = torch.float32, device: str = "auto",
               need_tokenizer: bool = True, trust_pickle: bool | None = None) -> Loaded:
    """Open a model directory of a supported family (:data:`MODEL_TYPES`), or of any causal LM of the installed
    transformers whose block structure can be discovered (:mod:`layerlab.adapters.discover`), for inference.
    A LayerNorm family converted by ``convert --to rmsnorm`` (``"layerlab": {"norms": ...}`` in its config)
    runs with RMSNorm modules in place of its stream norms, which it was converted to compute exactly.

    ``dtype`` ``"auto"`` keeps the checkpoint's own dtype; ``device`` ``"auto"`` is CUDA when present.
    Weights come from safetensors; a directory with a pickle only (``pytorch_model.bin``) is refused unless
    ``trust_pickle`` (default: ``LAYERLAB_TRUST_PICKLE``, which ``--trust-pickle`` sets), and then read with
    ``weights_only`` (:func:`layerlab.io.check_weights`); every failure is one line.
    A directory without a usable tokenizer (no tokenizer files, or files with an empty vocabulary, which
    transformers 5 loads as a tokenizer that encodes text to nothing) is refused, naming the files it needs;
    with ``need_tokenizer=False``, for what reads no text, it loads with ``tokenizer`` None.
    """
    path = check_model_dir(path)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise LayerlabError(f"{path / 'config.json'} is not a valid model config (JSON object)") from None
    if model_type not in MODEL_TYPES:
        from .discover import discoverable

        if not discoverable(model_type):
            raise unsupported_error(model_type)
    check_weights(path, trust_pickle)
    tokenizer = load_tokenizer(path, need_tokenizer)  # first: it is quicker to load than the weights
    auto = transformers.AutoModel if MODEL_TYPES.get(model_type) == "bert" else transformers.AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001  (corrupt or truncated weights surface as many exception types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayerlabError(f"cannot load model from {path}: {first}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    marks = getattr(model.config, "layerlab", None)
    norms = marks.get("norms") if isinstance(marks, dict) else None
    if norms in ("rmsnorm", "crmsnorm"):  # ``convert --to rmsnorm`` of a LayerNorm family: its stream is centred
        swap_stream_norms(model, norms)
    return Loaded(model, tokenizer, view(model))
