"""LayerView: any supported model as an ordered list of blocks with named parts.

One registry entry per architecture maps the fixed names (``ln1``, ``attn``, ``ln2``, ``mlp``,
final norm, unembedding) onto the model's module paths, as TransformerLens'
``component_mapping`` does. layerlab's own model uses these names natively.

Everything that reads or edits layers goes through a :class:`LayerView`:
- :meth:`LayerView.trace` hooks the residual stream entering and leaving each block and the
  output each sublayer adds to it, for one forward at a time;
- :meth:`LayerView.skip` runs the model with blocks removed, without copying it;
- :meth:`LayerView.skip_sublayers` runs it with attention or MLP sublayers adding nothing;
- :meth:`LayerView.linears` lists a block's linear weights as (out, in) matrices;
- :meth:`LayerView.replace` swaps a named part (a norm, say) for another module.

:func:`load_model` is the project's one model loader: any supported model directory, layerlab's or
Hugging Face's, with its tokenizer and its view. Every command opens its input through it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn

from .. import model as _registers_layerlab  # noqa: F401  (the Auto classes learn layerlab's model and quantizer)
from ..errors import VOCAB_FILES, LayerlabError, choices_error, no_tokenizer_error
from ..io import check_model_dir, check_weights
from ..registry import PLACEMENTS, SUBLAYERS, residual_placement_names


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture, relative to the loaded model."""

    blocks: str
    embed: str
    final_norm: str | None
    unembed: str | None
    parts: dict[str, str]  # fixed name -> path inside a block; missing parts are absent
    attn_out: str  # path inside a block whose output is what attention adds to the residual stream
    mlp_out: str  # likewise for the MLP
    causal: bool
    placement: str  # where the norms sit: "pre" or "post" (layerlab models say per block)
    # sublayer -> path inside a block of the linear whose output is added to the residual stream (the output
    # projection); in a Pre-LN block, zeroing its weight and bias removes the sublayer exactly
    out_proj: dict[str, str] = field(default_factory=dict)
    # the block runs its MLP on (B*T, C) rows (OPT); a trace reshapes what it records there to (B, T, ...)
    flat_mlp: bool = False


ARCHS: dict[str, Arch] = {
    "layerlab": Arch("blocks", "embed", "ln_f", "lm_head", {"ln1": "ln1", "attn": "attn", "ln2": "ln2", "mlp": "mlp"},
                     "attn", "mlp", causal=True, placement="per-block",
                     out_proj={"attn": "attn.proj", "mlp": "mlp.proj"}),
    "gpt2": Arch("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head",
                 {"ln1": "ln_1", "attn": "attn", "ln2": "ln_2", "mlp": "mlp"}, "attn", "mlp",
                 causal=True, placement="pre", out_proj={"attn": "attn.c_proj", "mlp": "mlp.c_proj"}),
    "llama": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                  {"ln1": "input_layernorm", "attn": "self_attn", "ln2": "post_attention_layernorm", "mlp": "mlp"},
                  "self_attn", "mlp", causal=True, placement="pre",
                  out_proj={"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}),
    "bert": Arch("encoder.layer", "embeddings", None, None,
                 {"ln1": "attention.output.LayerNorm", "attn": "attention", "ln2": "output.LayerNorm",
                  "mlp": "intermediate"}, "attention.output.dense", "output.dense", causal=False, placement="post",
                 out_proj={"attn": "attention.output.dense", "mlp": "output.dense"}),
    # OPT (do_layer_norm_before=True, as every size but 350m): the MLP is fc1/fc2 directly in the block (no module
    # of its own, so no "mlp" part), the block's own final_layer_norm is its ln2, learned positions are added
    # before block 0, and the decoder's final_layer_norm is the final norm
    "opt": Arch("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm", "lm_head",
                {"ln1": "self_attn_layer_norm", "attn": "self_attn", "ln2": "final_layer_norm"}, "self_attn", "fc2",
                causal=True, placement="pre", out_proj={"attn": "self_attn.out_proj", "mlp": "fc2"}, flat_mlp=True),
}
# model_type (config.json) -> architecture entry. Qwen3 (q/k norms inside attention), Phi-3 (fused qkv_proj and
# gate_up_proj), Gemma (RMSNorm scaling by 1 + w, embedding scaled by sqrt(hidden) inside its embedding module) and
# OLMo 1 (non-parametric LayerNorm) have Llama's module paths and sequential Pre-LN blocks; the differences sit
# inside the modules the view names, so the "llama" entry describes them exactly.
MODEL_TYPES = {"layerlab": "layerlab", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
               "qwen3": "llama", "phi3": "llama", "gemma": "llama", "olmo": "llama", "opt": "opt", "bert": "bert"}


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _find(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, or None where it is absent (a layerlab block without that sublayer)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _first(x):
    """The hidden states of a module output that may be a tensor or a tuple."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class BlockView:
    index: int
    module: nn.Module
    parts: dict[str, nn.Module]
    attn_out: nn.Module | None  # None: the block has no attention sublayer
    mlp_out: nn.Module | None

    def __getattr__(self, name: str) -> nn.Module | None:
        parts = self.__dict__.get("parts", {})
        if name in ("ln1", "attn", "ln2", "mlp"):
            return parts.get(name)
        raise AttributeError(name)


@dataclass
class Trace:
    """What one traced forward recorded: lists indexed by block.

    ``resid_in[l]`` (B, T, C) enters block l, ``resid_out[l]`` leaves it, ``attn[l]`` and
    ``mlp[l]`` are what each sublayer adds, ``mid[l]`` is the stream the MLP's residual
    branch starts from (after attention was added, and normalised in Post-LN). Entries are
    replaced on every forward; a metric reduces them to running statistics before the next batch.
    """

    resid_in: list[torch.Tensor | None] = field(default_factory=list)
    resid_out: list[torch.Tensor | None] = field(default_factory=list)
    attn: list[torch.Tensor | None] = field(default_factory=list)
    mlp: list[torch.Tensor | None] = field(default_factory=list)
    mid: list[torch.Tensor | None] = field(default_factory=list)  # the stream between attention and MLP
    final: torch.Tensor | None = None  # the final norm's output
    tuple_out: bool = False  # whether blocks return tuples (older Hugging Face layers) rather than tensors


class LayerView:
    """An ordered list of blocks with named parts, over any supported model."""

    def __init__(self, model: nn.Module, arch_name: str):
        self.model, self.arch_name = model, arch_name
        arch = ARCHS[arch_name]
        self.arch = arch
        root = model
        if arch_name == "bert" and hasattr(model, "bert"):  # BertFor* heads wrap a BertModel
            root = model.bert
        self.root = root
        blocks = _get(root, arch.blocks)
        self.blocks: list[BlockView] = []
        for i, b in enumerate(blocks):
            parts = {name: m for name, path in arch.parts.items() if (m := _find(b, path)) is not None}
            attn_out, mlp_out = _find(b, arch.attn_out), _find(b, arch.mlp_out)
            if arch_name == "layerlab" and PLACEMENTS[b.placement].out_norms:  # the output norms are what is added
                attn_out, mlp_out = b.ln1_out, b.ln2_out
            self.blocks.append(BlockView(i, b, parts, attn_out, mlp_out))
        self.embed = _get(root, arch.embed)
        self.final_norm = _get(model, arch.final_norm) if arch.final_norm else None
        self.unembed = _get(model, arch.unembed) if arch.unembed else None

    # ------------------------------------------------------------------ facts
    @property
    def causal(self) -> bool:
        return self.arch.causal

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def has_lm_head(self) -> bool:
        return self.unembed is not None

    def placements(self) -> list[str]:
        """The norm placement of each block."""
        if self.arch_name == "layerlab":
            return [b.module.placement for b in self.blocks]
        return [self.arch.placement] * self.num_layers

    # ------------------------------------------------------------------ running
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """One forward in eval mode, no cache. Returns the model's output object."""
        kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
        if self.causal:
            kw["use_cache"] = False
        return self.model(input_ids=input_ids, **kw)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding applied to a residual state (the logit lens)."""
        if self.unembed is None:
            raise LayerlabError(f"{self.arch_name} models have no language-model head")
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.unembed(h)

    @contextmanager
    def trace(self, sublayers: bool = True) -> Iterator[Trace]:
        """Hook the residual stream around every block (and each sublayer's output) during forwards."""
        n = self.num_layers
        t = Trace([None] * n, [None] * n, [None] * n, [None] * n, [None] * n)
        handles = []

        def pre(store, i):
            def fn(module, args, kwargs):
                store[i] = (args[0] if args else kwargs["hidden_states"]).detach()

            return fn

        def post(store, i):
            def fn(module, args, output):
                store[i] = _first(output).detach()

            return fn

        def block_post(i, mid_is_out):
            def fn(module, args, output):
                t.resid_out[i] = _first(output).detach()
                t.tuple_out = isinstance(output, tuple)
                if self.arch.flat_mlp:  # recorded as (B*T, C) rows inside the block
                    for store in (t.mid, t.mlp):
                        if store[i] is not None and store[i].dim() == 2 < t.resid_out[i].dim():
                            store[i] = store[i].view(*t.resid_out[i].shape[:-1], store[i].shape[-1])
                if mid_is_out:
                    t.mid[i] = t.resid_out[i]

            return fn

        for b, placement in zip(self.blocks, self.placements(), strict=True):
            handles.append(b.module.register_forward_pre_hook(pre(t.resid_in, b.index), with_kwargs=True))
            if self.arch.flat_mlp and b.mlp_out is not None:
                # the MLP's output projection reads (B, T, hidden) while traced, first of any pre-hook (so that
                # one hooked on it, as analyze's MLP gates, sees tokens by row), and gives back (B*T, C) rows
                handles.append(b.mlp_out.register_forward_pre_hook(_unflatten(t, b.index), prepend=True))
                handles.append(b.mlp_out.register_forward_hook(_flatten))
            # a block without an MLP (and so without ln2): the stream after attention is the block's output
            residual = PLACEMENTS[placement].residual_sublayers
            mid_is_out = sublayers and residual and b.ln2 is None and b.mlp_out is None
            handles.append(b.module.register_forward_hook(block_post(b.index, mid_is_out)))
            if sublayers:
                for out, store in ((b.attn_out, t.attn), (b.mlp_out, t.mlp)):
                    if out is not None:
                        handles.append(out.register_forward_hook(post(store, b.index)))
                if not residual and b.ln1 is not None:  # Post-LN: the normalised sum feeds the MLP
                    handles.append(b.ln1.register_forward_hook(post(t.mid, b.index)))
                elif b.ln2 is not None:  # otherwise the second norm's input is the stream itself
                    handles.append(b.ln2.register_forward_pre_hook(pre(t.mid, b.index), with_kwargs=True))
        if self.final_norm is not None:
            handles.append(self.final_norm.register_forward_hook(
                lambda m, a, o: setattr(t, "final", _first(o).detach())))
        try:
            yield t
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def skip(self, *indices: int, replay: Trace | None = None) -> Iterator[None]:
        """Run with the given blocks removed: each passes its input through unchanged.

        The block still runs (its output is replaced by a forward hook), so nothing is copied
        and the model is left exactly as it was. With ``replay``, a trace of a forward on the
        same inputs, nothing is computed twice: for the duration, the blocks before the first
        skipped one are swapped for stand-ins that return the recorded outputs, and the skipped
        ones for stand-ins that return their input. That more than halves the cost of measuring
        every block's removal.
        """
        handles = []
        container = self.root.get_submodule(self.arch.blocks)
        swapped = []
        if replay is None:
            for i in indices:
                handles.append(self.blocks[i].module.register_forward_hook(_passthrough, with_kwargs=True))
        elif indices:  # the trace says how blocks return their output, so skipped blocks need not run either
            for j in range(min(indices)):
                swapped.append((j, container[j]))
                container[j] = _Replay(replay.resid_out[j], replay.tuple_out)
            for i in indices:
                swapped.append((i, container[i]))
                container[i] = _Identity(replay.tuple_out)
        try:
            yield
        finally:
            for j, block in swapped:
                container[j] = block
            for h in handles:
                h.remove()

    @contextmanager
    def skip_sublayers(self, unit: str, *indices: int) -> Iterator[None]:
        """Run with the attention (``unit="attn"``) or MLP (``"mlp"``) of the given blocks adding nothing.

        As :meth:`skip`, a forward hook replaces what the sublayer adds to the residual stream (its
        output; in Peri-LN, its output norm's) by zeros, so the model is left exactly as it was.
        That removes the sublayer only where the block is ``x + F(...)``: Post-LN blocks are refused.
        Gradients do not reach a skipped sublayer, so training under this context leaves it unchanged.
        A block that already lacks the sublayer is left alone.
        """
        if unit not in SUBLAYERS:
            raise choices_error("sublayer", unit, SUBLAYERS)
        placements = self.placements()
        handles = []
        for i in indices:
            if not PLACEMENTS[placements[i]].residual_sublayers:
                raise LayerlabError(f"block {i} is {placements[i]}: only a block that adds each sublayer to the "
                                    f"residual stream ({', '.join(residual_placement_names())}) can skip one")
            out = self.blocks[i].attn_out if unit == "attn" else self.blocks[i].mlp_out
            if out is not None:
                handles.append(out.register_forward_hook(_zero_output))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ editing
    def linears(self, index: int) -> dict[str, torch.Tensor]:
        """Every 2-d weight of block ``index`` as an (out, in) matrix, keyed by its path in the block."""
        out = {}
        for name, m in self.blocks[index].module.named_modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            # GPT-2's Conv1D stores (in, out); every other linear stores (out, in)
            out[name] = w.detach().t() if type(m).__name__ == "Conv1D" else w.detach()
        return out

    def replace(self, index: int, part: str, new: nn.Module) -> nn.Module:
        """Put ``new`` in place of part ``part`` of block ``index``; return the old module."""
        path = self.arch.parts.get(part)
        if path is None:
            raise LayerlabError(f"unknown part {part!r}; valid: {', '.join(self.arch.parts)}")
        if part not in self.blocks[index].parts:
            raise LayerlabError(f"block {index} has no {part}")
        parent_path, _, attr = path.rpartition(".")
        parent = _get(self.blocks[index].module, parent_path) if parent_path else self.blocks[index].module
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self.blocks[index].parts[part] = new
        return old


class _Replay(nn.Module):
    """A block stand-in that returns a recorded output, whatever it is given."""

    def __init__(self, output: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.output, self.as_tuple = output, as_tuple

    def forward(self, *args, **kwargs):
        return (self.output,) if self.as_tuple else self.output


class _Identity(nn.Module):
    """A block stand-in that passes the residual stream through."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


def _unflatten(t: Trace, i: int):
    """Forward pre-hook: (B*T, F) rows into (B, T, F), B and T those of the stream entering block ``i``."""
    def fn(module, args):
        x, lead = args[0], t.resid_in[i].shape[:-1]
        if x.dim() == 2 and len(lead) == 2 and x.shape[0] == lead[0] * lead[1]:
            return (x.view(*lead, x.shape[-1]), *args[1:])
        return None

    return fn


def _flatten(module, args, output):
    """Forward hook: (B, T, C) back into the (B*T, C) rows the block computes with."""
    return output.reshape(-1, output.shape[-1]) if output.dim() == 3 else None


def _zero_output(module, args, output):
    """Forward hook: the module outputs zeros (of its hidden states; the rest of a tuple is kept)."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _passthrough(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (x, *output[1:])
    return x


def arch_of(model: nn.Module) -> str:
    """The adapter entry for ``model``, or an error listing the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise LayerlabError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    if model_type == "opt" and (not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size
                                or getattr(config, "_remove_final_layer_norm", False)):
        raise LayerlabError("this OPT variant (as OPT-350m: Post-LN blocks, do_layer_norm_before=False, or "
                            "project_in/project_out around the blocks) is not supported; only Pre-LN OPT is")
    return MODEL_TYPES[model_type]


def view(model: nn.Module) -> LayerView:
    """The :class:`LayerView` of a loaded model."""
    return LayerView(model, arch_of(model))




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


def _load_tokenizer(path: Path, need: bool):
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
    """Open a model directory of a supported family (layerlab, GPT-2, Llama-style, OPT, BERT) for inference.

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
        raise LayerlabError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}")
    check_weights(path, trust_pickle)
    tokenizer = _load_tokenizer(path, need_tokenizer)  # first: it is quicker to load than the weights
    auto = transformers.AutoModel if MODEL_TYPES[model_type] == "bert" else transformers.AutoModelForCausalLM
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
    return Loaded(model, tokenizer, view(model))
