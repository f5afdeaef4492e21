"""The view: :class:`LayerView` over a loaded model, read through its :class:`~layerlab.adapters.archs.Arch` entry
(:mod:`layerlab.adapters.archs`), and the hooks it runs. The package (:mod:`layerlab.adapters`) re-exports both
modules, and adds the model loader and structure discovery, which builds on them
(:mod:`layerlab.adapters.discover`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import LayerlabError, choices_error
from ..mod import describe_routed
from ..registry import PLACEMENTS, SUBLAYERS, residual_placement_names
from .archs import ARCHS, MLP_ACTS, Arch


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
class FFNView:
    """One block's MLP as key-value memories (Geva et al., 2021): FFN(x) = sum_i a_i(x) v_i + b_out.

    ``keys`` (F, C) are the rows of the input projection (of the gate projection in a gated MLP, whose activation
    decides which neurons fire), ``key_bias`` (F,) its bias or None, ``values`` (F, C) the columns of the output
    projection (whatever the module's storage: GPT-2's Conv1D keeps (in, out)). ``hidden(x)`` computes the hidden
    activation a (..., F) from the MLP's input x (..., C): act(fc x), or act(gate x) * up x in a gated MLP (after
    the inner norm in Sub-LN), which is exactly what ``output`` (the output projection) reads. ``input`` is the
    first input projection, whose input is x. Weights are the module's own tensors (detached, not copied).
    """

    keys: torch.Tensor
    key_bias: torch.Tensor | None
    values: torch.Tensor
    gated: bool
    input: nn.Module
    output: nn.Module
    hidden: Callable[[torch.Tensor], torch.Tensor]


def _weight_out_in(m: nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in): GPT-2's Conv1D stores (in, out), every other linear (out, in)."""
    return m.weight.detach().t() if type(m).__name__ == "Conv1D" else m.weight.detach()


@dataclass
class Trace:
    """What one traced forward recorded: lists indexed by block.

    ``resid_in[l]`` (B, T, C) enters block l, ``resid_out[l]`` leaves it, ``attn[l]`` and
    ``mlp[l]`` are what each sublayer adds (where a sublayer's output is normalised, as in Gemma 2 or
    OLMo 2, its output norm's output; in BLOOM, whose modules add the residual themselves, the output
    projection's), ``mid[l]`` is the stream the MLP's residual branch starts from (after attention was
    added, and normalised in Post-LN). In a parallel block (GPT-J, Pythia, Phi-1/2, Falcon) the MLP
    reads ``resid_in[l]``, not ``mid[l]``; ``mid[l]`` is then defined as ``resid_in[l] + attn[l]``, the
    stream with attention added as if the block were sequential, so that ``resid_out = mid + mlp`` holds
    in every form and the sublayer metrics read (resid_in, mid) for attention and (mid, resid_out) for
    the MLP. Entries are replaced on every forward; a metric reduces them to running statistics before
    the next batch.
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

    def __init__(self, model: nn.Module, arch_name: str, arch: Arch | None = None):
        """``arch`` describes the model where it is not the registered ``ARCHS[arch_name]`` (a structure
        discovered from the module tree, say)."""
        self.model, self.arch_name = model, arch_name
        arch = ARCHS[arch_name] if arch is None else arch
        self.arch = arch
        root = model
        if arch_name == "bert" and hasattr(model, "bert"):  # BertFor* heads wrap a BertModel
            root = model.bert
        self.root = root
        blocks = _get(root, arch.blocks)
        if arch_name == "layerlab" and len(blocks) and getattr(blocks[0], "form", arch.form) != arch.form:
            # a parallel layerlab model (registry.BLOCKS). A DenseFormer block ends with its depth-weighted average
            # (model.DepthWeightedAverage): resid_out[i] is then that average, the stream block i + 1 reads
            self.arch = arch = replace(arch, form=blocks[0].form)
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

    # whether the view knows the sublayers inside each block (a discovered structure does not)
    sublayers_known = True

    def require_sublayers(self, what: str = "this operation") -> None:
        """Raise a one-line refusal where the view does not know the sublayers (nothing to do here)."""

    @property
    def form(self) -> str:
        """How the sublayers meet the residual stream: "sequential", "parallel" or "output-norm" (:data:`FORMS`)."""
        return self.arch.form

    def out_proj_path(self, index: int, unit: str) -> str:
        """The path inside block ``index`` of what removing its ``unit`` sublayer zeroes: the output projection,
        or a mixture-of-experts block's experts (all their weights)."""
        if unit == "mlp" and self.arch.experts and _find(self.blocks[index].module, self.arch.experts) is not None:
            return self.arch.experts
        return self.arch.out_proj[unit]

    def router(self, index: int) -> nn.Module | None:
        """Block ``index``'s mixture-of-experts router, None for a dense block."""
        return _find(self.blocks[index].module, self.arch.router) if self.arch.router else None

    def ffn(self, index: int) -> FFNView | None:
        """Block ``index``'s MLP as key-value memories (:class:`FFNView`), read through the adapter's ``mlp_in``,
        ``mlp_act``, ``mlp_gated`` and ``mlp_inner_norm``; None where the block has no dense MLP the adapter can read
        (a layerlab block without its MLP, a mixture-of-experts block, a discovered structure)."""
        a, block = self.arch, self.blocks[index].module
        out = _find(block, a.out_proj["mlp"]) if "mlp" in a.out_proj else None
        found = ([_find(block, p) for p in paths] for paths in a.mlp_in)
        ins = next((mods for mods in found if all(m is not None for m in mods)), None)
        if out is None or ins is None:
            return None
        gated = a.mlp_gated
        if isinstance(gated, str):
            owner, _, attr = gated.rpartition(".")
            gated = bool(getattr(_find(block, owner) if owner else block, attr, False))
        name = a.mlp_gate_act if gated and a.mlp_gate_act else None
        act = MLP_ACTS.get(name) if name else None
        for cand in () if act is not None else a.mlp_act:
            act = _find(block, cand) or MLP_ACTS.get(cand)
            if act is not None:
                break
        if act is None:
            return None
        norm = _find(block, a.mlp_inner_norm) if a.mlp_inner_norm else None
        w = _weight_out_in(ins[0])
        bias = getattr(ins[0], "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        fused = gated and len(ins) == 1  # one projection whose output halves are gate, then up
        if fused:
            w = w[: w.shape[0] // 2]
            bias = None if bias is None else bias[: bias.shape[0] // 2]

        def hidden(x: torch.Tensor) -> torch.Tensor:
            if not gated:
                h = act(ins[0](x))
            elif fused:
                gate, up = ins[0](x).chunk(2, dim=-1)
                h = act(gate) * up
            else:
                h = act(ins[0](x)) * ins[1](x)
            return norm(h) if norm is not None else h

        return FFNView(w, bias, _weight_out_in(out).t(), gated, ins[0], out, hidden)

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
        logits = self.unembed(h)
        cap = getattr(self.model.config, self.arch.logit_softcap, None) if self.arch.logit_softcap else None
        if cap:  # Gemma 2's final soft-cap, as the model's own head applies it
            logits = torch.tanh(logits / cap) * cap
        return logits

    @contextmanager
    def trace(self, sublayers: bool = True, on_block: Callable[[Trace, int], None] | None = None) -> Iterator[Trace]:
        """Hook the residual stream around every block (and each sublayer's output) during forwards.

        ``on_block(trace, i)`` is called as block i returns, once its entries are recorded: a consumer that reduces
        them there and drops them (sets them to None) keeps one block's sublayer outputs alive, not all L."""
        n = self.num_layers
        t = Trace([None] * n, [None] * n, [None] * n, [None] * n, [None] * n)
        handles = []
        routing: list = [None] * n  # a Mixture-of-Depths block's (router weights, tokens through) (layerlab.mod)

        def pre(store, i):
            def fn(module, args, kwargs):
                store[i] = (args[0] if args else kwargs["hidden_states"]).detach()

            return fn

        def post(store, i, copy=False):
            def fn(module, args, output):
                out = _first(output).detach()
                store[i] = out.clone() if copy else out  # copy: the block goes on to change it in place

            return fn

        def block_post(i, mid_is_out):
            def fn(module, args, output):
                t.resid_out[i] = _first(output).detach()
                t.tuple_out = isinstance(output, tuple)
                if self.arch.flat_mlp:  # recorded as (B*T, C) rows inside the block
                    for store in (t.mid, t.mlp):
                        if store[i] is not None and store[i].dim() == 2 < t.resid_out[i].dim():
                            store[i] = store[i].view(*t.resid_out[i].shape[:-1], store[i].shape[-1])
                if routing[i] is not None:  # a routed block: its sublayers' outputs as the stream has them
                    describe_routed(t, i, routing[i])
                    routing[i] = None
                if mid_is_out:
                    t.mid[i] = t.resid_out[i]
                elif sublayers and self.arch.parallel:  # the stream with attention added, as if sequential
                    t.mid[i] = t.resid_in[i] if t.attn[i] is None else t.resid_in[i] + t.attn[i]
                if on_block is not None:
                    on_block(t, i)

            return fn

        for b, placement in zip(self.blocks, self.placements(), strict=True):
            handles.append(b.module.register_forward_pre_hook(pre(t.resid_in, b.index), with_kwargs=True))
            if self.arch.flat_mlp and b.mlp_out is not None:
                # the MLP's output projection reads (B, T, hidden) while traced, first of any pre-hook (so that
                # one hooked on it, as analyze's MLP gates, sees tokens by row), and gives back (B*T, C) rows
                handles.append(b.mlp_out.register_forward_pre_hook(_unflatten(t, b.index), prepend=True))
                handles.append(b.mlp_out.register_forward_hook(_flatten))
            # a block without an MLP (and so without ln2): the stream after attention is the block's output
            # an unknown placement (a discovered structure, whose blocks have no named parts): nothing inside
            residual = PLACEMENTS[placement].residual_sublayers if placement in PLACEMENTS else False
            mid_is_out = sublayers and residual and b.ln2 is None and b.mlp_out is None
            handles.append(b.module.register_forward_hook(block_post(b.index, mid_is_out)))
            if sublayers:
                for out, store, copy in ((b.attn_out, t.attn, False),
                                         (b.mlp_out, t.mlp, self.arch.inplace_mlp_out)):
                    if out is not None:
                        handles.append(out.register_forward_hook(post(store, b.index, copy)))
                if getattr(b.module, "mod_router", None) is not None:
                    handles.append(b.module.mod_router.register_forward_hook(
                        lambda m, a, o, i=b.index: routing.__setitem__(i, o)))
                mid = _find(b.module, self.arch.mid) if self.arch.mid else b.ln2
                if self.arch.parallel:  # mid is computed when the block returns
                    pass
                elif not residual and b.ln1 is not None:  # Post-LN: the normalised sum feeds the MLP
                    handles.append(b.ln1.register_forward_hook(post(t.mid, b.index)))
                elif mid is not None:  # otherwise the second norm's input (OLMo 2: the MLP's) is the stream
                    handles.append(mid.register_forward_pre_hook(pre(t.mid, b.index), with_kwargs=True))
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
        if replay is not None:  # the trace says how blocks return their output, so skipped blocks need not run either
            container = self.root.get_submodule(self.arch.blocks)
            swapped = []
            with self.replay_prefix(min(indices, default=0), replay):
                try:
                    for i in indices:
                        swapped.append((i, container[i]))
                        container[i] = _Identity(replay.tuple_out)
                    yield
                finally:
                    for i, block in swapped:
                        container[i] = block
            return
        handles = [self.blocks[i].module.register_forward_hook(_passthrough, with_kwargs=True) for i in indices]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replay_prefix(self, start: int, replay: Trace) -> Iterator[None]:
        """Run with the blocks before ``start`` swapped for stand-ins that return their outputs in ``replay``, a
        trace of a forward on the same inputs (as :meth:`skip` does with ``replay``): a change made inside block
        ``start`` or later is measured for the cost of the blocks from ``start`` on. The blocks are put back after.
        A DenseFormer is refused: its depth-weighted averages read every earlier block's output of the forward,
        which the stand-ins do not record."""
        if getattr(getattr(self.model, "cfg", None), "wiring", "residual") != "residual":
            raise LayerlabError("replaying recorded block outputs swaps blocks for stand-ins, which a DenseFormer's "
                                "depth-weighted averages cannot read; run the blocks instead")
        container = self.root.get_submodule(self.arch.blocks)
        swapped = []
        try:
            for j in range(start):
                swapped.append((j, container[j]))
                container[j] = _Replay(replay.resid_out[j], replay.tuple_out)
            yield
        finally:
            for j, block in swapped:
                container[j] = block

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


@contextmanager
def router_load(v: LayerView) -> Iterator[list[torch.Tensor | None]]:
    """Count, per block, how often the mixture-of-experts router picks each expert, over the real tokens.

    Yields one int64 tensor (E,) per block (None for a dense block), to which every forward inside the
    context adds: each real token (``attention_mask`` 1) adds one to each of its top-k experts, so a
    block's counts sum to k x tokens. The router's own selection is read (a forward hook on it takes the
    ``top_k_index`` it returns), so the counts are those the model ran with. Where the mask does not match
    the routed rows (a forward with a cache), every routed row counts. :func:`router_stats` reduces the
    counts to a load measure.
    """
    counts: list[torch.Tensor | None] = []
    for i in range(v.num_layers):
        r = v.router(i)
        counts.append(None if r is None else torch.zeros(r.weight.shape[0], dtype=torch.long))
    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []

    def model_pre(module, args, kwargs):
        state["mask"] = kwargs.get("attention_mask")

    def hook(i: int):
        def fn(module, args, output):
            index = output[2].detach()  # (rows, k): the experts each routed row is sent to
            mask = state["mask"]
            if mask is not None and mask.numel() == index.shape[0]:
                index = index[mask.reshape(-1).bool()]
            counts[i] += torch.bincount(index.reshape(-1), minlength=counts[i].numel()).cpu()

        return fn

    handles.append(v.model.register_forward_pre_hook(model_pre, with_kwargs=True))
    for i, c in enumerate(counts):
        if c is not None:
            handles.append(v.router(i).register_forward_hook(hook(i)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def router_stats(counts: torch.Tensor) -> dict[str, float | None]:
    """The load over experts of one block's accumulated router counts (:func:`router_load`).

    With p_e = count_e / sum of counts (the share of token-assignments expert e received):
    ``router_entropy`` = -sum p_e ln p_e in nats (ln E for a perfectly balanced router, 0 when one expert
    takes everything; divide by ln E for a 0..1 scale), ``router_max_share`` = max_e p_e (1/E when
    balanced). The load-balance view of Shazeer et al., 2017 and Fedus et al., 2022 (Switch Transformer),
    measured rather than used as a loss. None for both where nothing was counted.
    """
    total = float(counts.sum())
    if total <= 0:
        return {"router_entropy": None, "router_max_share": None}
    p = counts.double() / total
    nz = p[p > 0]
    return {"router_entropy": float(-(nz * nz.log()).sum()), "router_max_share": float(p.max())}
