"""Structure discovery: a :class:`~layerlab.adapters.LayerView` over a causal LM whose ``model_type`` has no
adapter entry, read from its module tree and one tiny probe forward (issue 13, section 2).

- the blocks are the one ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` (a list nested in
  another such list, as a block's experts, is inside a block, so it does not count);
- the embedding and the unembedding are ``get_input_embeddings()`` and ``get_output_embeddings()``;
- the final norm is the module that runs between the last block and the head, found by recording the order in
  which modules start and end during the probe forward (dropout and identity modules, which do nothing in eval
  mode, are left out; ``None`` where nothing runs there).

The probe then checks what the block-level analyses rely on, and discovery fails in one line where it does not
hold: the blocks run once each, in order, and each one's output is the next one's input (so removing a block is
passing its input on); the final norm of the last block's output is what the head reads; the head's output is
the logits (so the logit lens, nostalgebraist 2020, at the last block is the model's own prediction; a model
that rescales its logits after the head, as Granite and Cohere do, is refused); a later token changes no
earlier logit (causal).

What a discovered structure does not know is the inside of a block: which modules are its norms, attention and
MLP, and how they meet the residual stream. So its view has no sublayer parts, its placement and form are
``"unknown"``, and every sublayer operation (``skip_sublayers``, ``replace``, ``prune --unit attn|mlp``) is
refused in one line; the block-level trace, ``skip`` and the logit lens work as for any registered family.
Its hooked forward is checked against the plain one by analyze's fidelity certificate before anything is
measured.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import LayerlabError
from .archs import Arch
from .core import LayerView, _first

DISCOVERED = "discovered"  # the view's arch_name, and the report's "arch"
UNKNOWN = "unknown"  # the placement and form of a discovered block: where its norms sit and how its sublayers
# meet the residual stream are not known (neither is a registry placement nor one of the adapters' FORMS)
SUBLAYERS_UNKNOWN = "discovered structure: sublayers unknown"

# max |recomputed - recorded| / max |recorded| that the probe's checks allow: the recomputation runs the same
# modules on the same tensors, so float32 agrees to rounding (1e-4, as analyze's fidelity certificate) and half
# precision to a few units of its rounding (1e-2)
PROBE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
PROBE_TOLERANCE_DEFAULT = 1e-4
PROBE_TOKENS = 8  # the probe forward reads 2 sequences of this many tokens
_INERT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)  # eval: identity


def _fail(model_type, what: str) -> LayerlabError:
    return LayerlabError(f"unsupported architecture {model_type!r}: no adapter entry, and its structure cannot be "
                         f"discovered: {what}")


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def _block_list(model: nn.Module, model_type) -> str:
    """The path of the one ModuleList of ``config.num_hidden_layers`` modules, not nested in another such list."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = [name for name, size in lists if size == n]
    outer = [name for name in found if not any(name.startswith(other + ".") for other in found)]
    if len(outer) == 1:
        return outer[0]
    if not outer:
        seen = ", ".join(f"{name} ({size})" for name, size in lists) or "none"
        raise _fail(model_type, f"no nn.ModuleList of num_hidden_layers={n} modules (ModuleLists found: {seen})")
    raise _fail(model_type, f"{len(outer)} nn.ModuleLists of num_hidden_layers={n} modules ({', '.join(outer)}); "
                            "cannot tell which holds the blocks")


def discoverable(model_type: str | None) -> bool:
    """Whether the installed transformers has a causal LM class for ``model_type`` (what ``AutoModelForCausalLM``
    loads), so that a directory of that type with no adapter entry can be loaded and its structure discovered."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32; inf where the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


class _Probe:
    """One forward with every module hooked: the order in which modules start and end, each block's input and
    output, and what the head reads."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, head: nn.Module):
        self.calls: list[tuple[str, nn.Module, int, int]] = []  # (path, module, start, end), by end
        self.block_in: dict[int, list[torch.Tensor | None]] = {i: [] for i in range(len(blocks))}
        self.block_out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
        self.head_in: torch.Tensor | None = None
        self._model, self._blocks, self._head = model, blocks, head

    @contextmanager
    def hooked(self) -> Iterator[None]:
        clock, open_calls, handles = itertools.count(), {}, []
        index = {id(b): i for i, b in enumerate(self._blocks)}

        def pre():
            def fn(m, args, kwargs):
                open_calls.setdefault(id(m), []).append(next(clock))
                if id(m) in index:
                    x = args[0] if args else kwargs.get("hidden_states")
                    self.block_in[index[id(m)]].append(x if isinstance(x, torch.Tensor) else None)
                if m is self._head:
                    self.head_in = args[0] if args else next(iter(kwargs.values()), None)

            return fn

        def post(name):
            def fn(m, args, kwargs, output):
                self.calls.append((name, m, open_calls[id(m)].pop(), next(clock)))
                if id(m) in index:
                    self.block_out[index[id(m)]].append(_first(output))

            return fn

        for name, m in self._model.named_modules():
            handles.append(m.register_forward_pre_hook(pre(), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def window(self, after: int, before: int) -> list[tuple[str, nn.Module, int, int]]:
        """The outermost calls that start after ``after`` and end before ``before``, less the inert ones."""
        inside = [c for c in self.calls if c[2] > after and c[3] < before]
        outer = [c for c in inside if not any(o[2] < c[2] and c[3] < o[3] for o in inside)]
        return [c for c in outer if not isinstance(c[1], _INERT)]


@torch.no_grad()
def discover(model: nn.Module) -> Arch:
    """The structure of a causal LM with no adapter entry, from its module tree and one tiny probe forward
    (see the module's docstring); a one-line :class:`LayerlabError` naming what was found where it cannot be
    discovered or a check fails. The returned :class:`Arch` has no sublayer parts; its placement and form are
    ``"unknown"``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None:
        raise _fail(model_type, f"{type(model).__name__} has no config")
    if not _is_causal_lm(model):
        raise _fail(model_type, f"{type(model).__name__} is not a causal language model (a *ForCausalLM class)")
    blocks_path = _block_list(model, model_type)
    blocks = model.get_submodule(blocks_path)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_path, head_path = _path_of(model, embed), _path_of(model, head)
    if embed_path is None or head_path is None:
        missing = "input embeddings" if embed_path is None else "output embeddings (a language-model head)"
        raise _fail(model_type, f"{type(model).__name__} has no {missing} among its modules")
    vocab = getattr(embed, "num_embeddings", None) or getattr(config, "vocab_size", None)
    if not vocab:
        raise _fail(model_type, f"neither its input embeddings {embed_path} nor its config give a vocabulary size")

    # the probe: two rows that differ only in their last token (the causality check), no padding
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=g).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % vocab
    probe = _Probe(model, blocks, head)
    was_training = model.training
    model.eval()
    try:
        with probe.hooked():
            logits = model(input_ids=ids.to(param.device), use_cache=False).logits
    except Exception as e:  # noqa: BLE001  (whatever a model's forward raises, the user gets one line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _fail(model_type, f"its probe forward failed: {first}") from None
    finally:
        model.train(was_training)
    tol = PROBE_TOLERANCE.get(param.dtype, PROBE_TOLERANCE_DEFAULT)

    # the blocks: once each, in order, the output of one the input of the next
    runs = {id(m): [c for c in probe.calls if c[1] is m] for m in blocks}
    for i, block in enumerate(blocks):
        if len(runs[id(block)]) != 1:
            raise _fail(model_type, f"block {i} ({blocks_path}.{i}) ran {len(runs[id(block)])} times in one forward, "
                                    "not once")
        if not isinstance(probe.block_out[i][0], torch.Tensor):
            raise _fail(model_type, f"block {i} ({blocks_path}.{i}) returns a {type(probe.block_out[i][0]).__name__}, "
                                    "not the residual stream (a tensor, or a tuple that starts with it)")
        if probe.block_in[i][0] is None:
            raise _fail(model_type, f"block {i} ({blocks_path}.{i}) takes the residual stream neither as its first "
                                    "argument nor as hidden_states")
        if i and runs[id(block)][0][2] < runs[id(blocks[i - 1])][0][3]:
            raise _fail(model_type, f"block {i} of {blocks_path} starts before block {i - 1} ends")
        if i and _rel(probe.block_in[i][0], probe.block_out[i - 1][0]) > tol:
            raise _fail(model_type, f"the stream entering block {i} of {blocks_path} is not block {i - 1}'s output "
                                    "(something outside the blocks changes it)")
    last = runs[id(blocks[-1])][0]
    head_calls = [c for c in probe.calls if c[1] is head]
    if len(head_calls) != 1 or head_calls[0][2] < last[3]:
        raise _fail(model_type, f"the head {head_path} ran {len(head_calls)} times, not once after the last block")

    # the final norm: what runs between the last block and the head
    between = probe.window(last[3], head_calls[0][2])
    if len(between) > 1:
        raise _fail(model_type, f"{len(between)} modules run between the last block and the head "
                                f"({', '.join(c[0] for c in between)}); cannot tell the final norm")
    final_path = between[0][0] if between else None
    h = probe.block_out[len(blocks) - 1][0]  # (B, T, C), the last block's output
    normed = between[0][1](h) if between else h
    if probe.head_in is None or _rel(normed, probe.head_in) > tol:
        found = f"the final norm {final_path}" if final_path else "no module"
        raise _fail(model_type, f"{found} runs between the last block and the head, but it does not map the last "
                                f"block's output to what the head {head_path} reads")
    lens = head(normed)
    if _rel(lens, logits) > tol:
        raise _fail(model_type, f"the logits are not the output of the head {head_path} (the model transforms "
                                "them after it, as a logit scale does), so the logit lens would not be the model's")
    if _rel(logits[1, :-1], logits[0, :-1]) > tol:
        raise _fail(model_type, "a later token changes earlier logits: the model is not causal")
    return Arch(blocks_path, embed_path, final_path, head_path, parts={}, attn_out="", mlp_out="", causal=True,
                placement=UNKNOWN, form=UNKNOWN)


class DiscoveredView(LayerView):
    """The :class:`LayerView` of a discovered structure (``arch_name`` ``"discovered"``): block-level only.

    ``trace`` (the base class's, over blocks with no named parts) records the stream entering and leaving each
    block and the final norm's output; its sublayer entries (``attn``, ``mlp``, ``mid``) stay None. ``skip`` and
    the logit lens are the base class's. Every sublayer operation raises a one-line :class:`LayerlabError`
    (:data:`SUBLAYERS_UNKNOWN`)."""

    def __init__(self, model: nn.Module, arch: Arch):
        super().__init__(model, DISCOVERED, arch)
        for b in self.blocks:  # nothing inside a block is known: no parts, no sublayer outputs
            b.parts, b.attn_out, b.mlp_out = {}, None, None

    def placements(self) -> list[str]:
        return [UNKNOWN] * self.num_layers

    @property
    def sublayers_known(self) -> bool:
        return False

    def require_sublayers(self, what: str = "this operation") -> None:
        """Raise the one-line refusal of a sublayer operation."""
        raise LayerlabError(f"{SUBLAYERS_UNKNOWN}: {what} needs the attention and MLP inside each block, which "
                            f"an adapter entry names; model_type {self.model.config.model_type!r} has none, so only "
                            "block-level operations (trace, skip, the logit lens) work")

    @contextmanager
    def skip_sublayers(self, unit: str, *indices: int) -> Iterator[None]:
        self.require_sublayers(f"skipping the {unit} sublayer")
        yield  # pragma: no cover  (never reached)

    def replace(self, index: int, part: str, new: nn.Module) -> nn.Module:
        self.require_sublayers(f"replacing {part}")

    def out_proj_path(self, index: int, unit: str) -> str:
        self.require_sublayers(f"removing the {unit} sublayer")


# each model's discovered structure, so that the commands' many view() calls run the probe forward once per model
_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, Arch] = weakref.WeakKeyDictionary()


def discovered_view(model: nn.Module) -> DiscoveredView:
    """The block-level view of a causal LM with no adapter entry (:func:`discover`, once per model object),
    labelled ``"discovered"``."""
    arch = _DISCOVERED.get(model)
    if arch is None:
        arch = _DISCOVERED[model] = discover(model)
    return DiscoveredView(model, arch)
