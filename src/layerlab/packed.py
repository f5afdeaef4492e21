"""Packed low-bit weights: the storage format of ``layerlab quantize`` and its Hugging Face loader.

A quantized linear layer keeps its weight group-wise: every ``group`` consecutive input
weights of a row share one affine map ``w ≈ q * scale + offset`` with integer codes
``q ∈ [0, 2^bits)`` (round-to-nearest over the group's min..max, the asymmetric min-max
scheme of GPTQ/AWQ-style weight-only quantization without their error correction).

Storage, per layer:
- ``bits`` 2, 3 or 4 (and 8 when torchao is missing): the codes are packed 8 values into
  ``bits`` bytes (:func:`pack_bits`), so a 3-bit weight takes exactly 3/8 of a byte on disk;
  ``scale`` and ``offset`` are float16, one each per group.
- ``bits`` 8 with torchao installed: torchao's own int8 weight-only format
  (``Int8WeightOnlyConfig``'s ``Int8Tensor``: int8 codes, a float scale per group, symmetric).
  torchao 0.18 has no CPU format that packs 2-4 bit codes (its ``IntxWeightOnlyConfig`` keeps
  them one per int8 byte, and its int4 formats need CUDA or an extra kernel library), so those
  widths use the packing above.

Mixture-of-experts blocks (Mixtral, Qwen3-MoE, OLMoE in transformers 5) hold all their experts'
weights in one module, as 3-d parameters ``gate_up_proj`` (experts, 2 * inter, hidden) and ``down_proj``
(experts, hidden, inter). :class:`PackedExperts` stores each of them the same way, per expert and per
output row: the group-wise codes above, at one width for the whole module, always in the packed format
(at 8 bits too: torchao's ``Int8Tensor`` is a 2-d linear weight, so the 3-d weights never use it). Its
forward is the original experts class's own forward (whichever experts implementation the config
selects: eager loop or grouped matmul) run on the dequantized weights. The router (``mlp.gate``) is not
a linear layer and stays in full precision, as norms do (llama.cpp's quantizer, src/llama-quant.cpp, likewise
never quantizes the expert gating tensor ``ffn_gate_inp``).

The written directory's ``config.json`` carries ``quantization_config`` with
``quant_method: "layerlab"`` and each quantized module's width; after ``import layerlab``,
``AutoModelForCausalLM.from_pretrained`` swaps those modules for :class:`PackedLinear` (or
:class:`PackedExperts`, for a module recorded with ``"kind": "experts"``) before the
weights load (:class:`LayerlabQuantizer`, registered with transformers' quantizer registry).
A packed layer dequantizes its weight on each forward, so it runs on any device, CPU included.

The compressed-tensors format (``fmt`` :data:`COMPRESSED`, the default output of ``layerlab quantize``) is
the one vLLM's llm-compressor writes and transformers (with the ``compressed-tensors`` package) loads natively,
without layerlab: per linear layer ``weight_packed`` (out, ceil(in * bits / 32)) int32,
``weight_scale`` (out, in / group) in the model's dtype and ``weight_shape`` ([out, in], int64), the
``pack-quantized`` layout of compressed-tensors 0.20 (``compressors/pack_quantized``): signed codes
``q ∈ [-2^(bits-1), 2^(bits-1))`` stored as ``q + 2^(bits-1)``, each row's codes one little-endian bit stream,
``bits`` bits per code, cut into int32 words. Its weights are *symmetric* (``w = q * scale``, no zero point),
with compressed-tensors' min-max rule ``scale = max|w| / ((2^bits - 1) / 2)`` per group
(``quantization/utils/helpers.py``, ``calculate_qparams``; GPTQ's symmetric grid): with
compressed-tensors 0.20.1 and transformers 5.24 an asymmetric ``pack-quantized`` checkpoint does not load
(transformers prepares an unpacked int8 ``weight_zero_point`` of shape (out, groups), the checkpoint holds the
packed int32 one, and the decompressor accepts only the latter; vllm-project/llm-compressor issue 1618 reports
the same), so layerlab's own min-max offset cannot be carried. The format holds widths 2 to 8 on plain
``nn.Linear`` layers whose inputs are a whole number of groups. GPT-2's ``Conv1D`` layers are not among them
(compressed-tensors 0.20 quantizes ``nn.Linear`` and ``nn.Embedding`` modules only): a GPT-2 is written as
transformers' ``gpt_bigcode`` architecture, GPT-2's computation with ``nn.Linear`` layers
(:mod:`layerlab.compress.gpt2_linear`). Widths of 1 bit (symmetric 1-bit codes are {-1, 0}),
mixture-of-experts weights, other ``Conv1D`` models, and subclasses of ``nn.Linear`` such as Falcon's
``FalconLinear`` (whose ``_init_weights`` reads the weight that compressed-tensors removes on load) keep the
layerlab format (:func:`compressed_tensors_unsupported` says why).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerlabError

QUANT_METHOD = "layerlab"
TORCHAO = "torchao-int8"
PACKED = "packed"
COMPRESSED = "compressed-tensors"  # a PackedLinear in compressed-tensors' pack-quantized layout
OUTPUT_FORMATS = (COMPRESSED, QUANT_METHOD)  # what ``layerlab quantize --format`` writes
CT_WIDTHS = range(2, 9)  # the widths the compressed-tensors output holds (symmetric 1-bit codes are {-1, 0})


# ---------------------------------------------------------------------------- bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` (uint8 values < 2**bits, length a multiple of 8)
    into ``length * bits / 8`` bytes: each run of 8 values becomes ``bits`` little-endian bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    *lead, n = codes.shape
    if n % 8:
        raise ValueError(f"the packed dimension must be a multiple of 8, got {n}")
    v = codes.reshape(*lead, n // 8, 8).to(torch.int64)
    word = (v << (bits * torch.arange(8, device=codes.device))).sum(-1)  # 8 values -> one 8*bits-bit word
    out = (word.unsqueeze(-1) >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
    return out.to(torch.uint8).reshape(*lead, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: uint8 codes, 8 per ``bits`` bytes of the last dimension."""
    *lead, m = packed.shape
    b = packed.reshape(*lead, m // bits, bits).to(torch.int64)
    word = (b << (8 * torch.arange(bits, device=packed.device))).sum(-1)
    codes = (word.unsqueeze(-1) >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, m // bits * 8)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` layout of the last dimension of ``codes`` (uint8 values < 2**bits, any
    length n): code j at bits ``j * bits`` .. of the row's little-endian bit stream, cut into ceil(n * bits / 32)
    int32 words. It is :func:`pack_bits`'s stream (code j at bit ``j * bits`` of little-endian bytes), read as
    words: the row is padded with zero codes to a multiple of 32 and the words past ceil(n * bits / 32) dropped."""
    *lead, n = codes.shape
    pad = -n % 32
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*lead, pad)], dim=-1)
    words = pack_bits(codes, bits).view(torch.int32)  # a little-endian host, as compressed-tensors assumes
    return words[..., :math.ceil(n * bits / 32)].contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_int32`: the first ``n`` codes (uint8) of each row of int32 words."""
    *lead, words = packed.shape
    full = math.ceil(n / 32) * bits  # the words of the zero-padded row
    if full > words:
        packed = torch.cat([packed, packed.new_zeros(*lead, full - words)], dim=-1)
    return unpack_bits(packed.contiguous().view(torch.uint8), bits)[..., :n]


# ---------------------------------------------------------------------------- group-wise affine codes
def padded(in_features: int, group: int) -> int:
    return math.ceil(in_features / group) * group


def row_group(in_features: int, group: int) -> int:
    """The group size used for rows of ``in_features`` weights: ``group``, or the whole (8-aligned) row when it
    is shorter."""
    return min(group, padded(in_features, 8))


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes of an (out, in) weight, ``group`` inputs per affine map.

    Returns ``codes`` (out, in_padded) uint8, and float16 ``scale`` and ``offset`` of shape
    (out, in_padded / group). Padding (when ``in`` is not a multiple of ``group``) repeats the
    row's last value, so it never widens a group's range.
    """
    out_f, in_f = w.shape
    w = w.detach().float()
    pad = padded(in_f, group) - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    g = w.reshape(out_f, -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(torch.float16)
    offset = lo.to(torch.float16)
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)  # a constant group has scale 0: codes 0
    codes = torch.round((g - offset.float().unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, levels)
    return codes.to(torch.uint8).reshape(out_f, -1), scale, offset


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse map of :func:`quantize_groups`: (..., out, in_padded) codes and (..., out, groups) scale and
    offset (any leading dimensions, e.g. experts) give the (..., out, in_features) weight."""
    *lead, groups = scale.shape
    g = codes.reshape(*lead, groups, -1).to(torch.float32)
    w = g * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return w.reshape(*lead, -1)[..., :in_features].to(dtype)


def quantize_symmetric(w: torch.Tensor, bits: int, group: int,
                       scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric codes of an (out, in) weight (``in`` a multiple of ``group``), as
    compressed-tensors' min-max observer computes them (``calculate_qparams``, symmetric branch): per group
    ``scale = max|w| / ((2^bits - 1) / 2)`` rounded to ``scale_dtype`` (the model's dtype, which
    compressed-tensors gives its scales), ``q = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1)``.

    Returns the codes ``q + 2^(bits-1)`` (out, in) uint8, and the (out, in / group) scale."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group, group)
    half = 1 << (bits - 1)
    scale = (g.abs().amax(-1) / (((1 << bits) - 1) / 2)).to(scale_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group (or one whose scale underflows): codes 0
    q = torch.round(g / s.unsqueeze(-1)).clamp_(-half, half - 1)
    return (q + half).to(torch.uint8).reshape(out_f, in_f), scale


def dequantize_symmetric(codes: torch.Tensor, scale: torch.Tensor, bits: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight compressed-tensors decompresses (``(q.to(scale.dtype) * scale).to(dtype)``): ``q * scale`` is
    exact in float32 for the float16 and bfloat16 scales (an 8-bit code times an 8- or 11-bit significand) and is
    compressed-tensors' own product for float32 ones, so rounding it once to ``dtype`` gives the same bits."""
    *lead, groups = scale.shape
    q = codes.reshape(*lead, groups, -1).to(torch.float32) - (1 << (bits - 1))
    w = (q * scale.float().unsqueeze(-1)).reshape(*lead, -1)
    return w.to(scale.dtype).to(dtype)


# ---------------------------------------------------------------------------- torchao int8
@functools.cache
def torchao_int8():
    """torchao's Int8Tensor and PerGroup, or None when torchao is not importable."""
    try:  # its import-time warnings are filtered in layerlab/__init__
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerGroup

        return Int8Tensor, PerGroup
    except Exception:  # noqa: BLE001  (absent, or a version whose API moved: fall back to our packing)
        return None


def uses_torchao(bits: int, in_features: int, group: int) -> bool:
    return bits == 8 and in_features % group == 0 and torchao_int8() is not None


# ---------------------------------------------------------------------------- the module
class PackedLinear(nn.Module):
    """``y = x W^T + b`` with W stored as packed group-wise codes (or a torchao int8 tensor).

    Buffers (what the safetensors file holds): ``qweight`` (out, in_padded * bits / 8) uint8 and
    float16 ``scale``/``offset`` (out, groups) for the packed format; ``qdata`` (out, in) int8 and
    ``scale`` (out, groups) for torchao's; ``weight_packed``, ``weight_scale`` and ``weight_shape`` for
    compressed-tensors' (the module docstring), whose names are the ones transformers loads. ``bias`` stays in
    full precision.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group: int, bias: bool,
                 fmt: str = PACKED, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group, self.fmt = (in_features, out_features, bits,
                                                                                group, fmt)
        groups = padded(in_features, group) // group
        if fmt == COMPRESSED:
            self.register_buffer("weight_packed", torch.zeros(out_features, math.ceil(in_features * bits / 32),
                                                              dtype=torch.int32))
            self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=dtype))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features]))
        elif fmt == TORCHAO:
            self.register_buffer("qdata", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float32))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, padded(in_features, group) * bits // 8,
                                                        dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float16))
            self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, bits: int, group: int,
                    output: str = QUANT_METHOD) -> PackedLinear:
        """Quantize an (out, in) weight for the ``output`` format: :data:`COMPRESSED` (symmetric codes, scales in
        the weight's dtype; ``in`` must be a multiple of ``group``) or layerlab's (the packed min-max codes, or
        torchao's int8 tensor)."""
        out_f, in_f = weight.shape
        if output == COMPRESSED:
            fmt = COMPRESSED
        else:
            fmt = TORCHAO if uses_torchao(bits, in_f, group) else PACKED
        m = cls(in_f, out_f, bits=bits, group=group, bias=bias is not None, fmt=fmt,
                dtype=bias.dtype if bias is not None else weight.dtype)
        if fmt == COMPRESSED:  # scales in the weight's dtype, as compressed-tensors keeps them (not the bias's)
            m.weight_scale = m.weight_scale.to(weight.dtype)
        with torch.no_grad():
            if fmt == COMPRESSED:
                codes, scale = quantize_symmetric(weight, bits, group, weight.dtype)
                m.weight_packed.copy_(pack_int32(codes, bits))
                m.weight_scale.copy_(scale)
            elif fmt == TORCHAO:
                Int8Tensor, PerGroup = torchao_int8()
                t = Int8Tensor.from_hp(weight.detach().float(), PerGroup(group))
                m.qdata.copy_(t.qdata)
                m.scale.copy_(t.scale.reshape(out_f, -1))
            else:
                codes, scale, offset = quantize_groups(weight, bits, group)
                m.qweight.copy_(pack_bits(codes, bits))
                m.scale.copy_(scale)
                m.offset.copy_(offset)
            if bias is not None:
                m.bias.copy_(bias.detach())
        return m.to(weight.device)

    def weight_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the forward uses it: a torchao Int8Tensor, or the dequantized matrix."""
        if self.fmt == TORCHAO:
            Int8Tensor, _ = torchao_int8()
            return Int8Tensor(self.qdata, self.scale.float(), [1, self.group], dtype)
        if self.fmt == COMPRESSED:
            codes = unpack_int32(self.weight_packed, self.bits, self.in_features)
            return dequantize_symmetric(codes, self.weight_scale, self.bits, dtype)
        codes = unpack_bits(self.qweight, self.bits)
        return dequantize_groups(codes, self.scale, self.offset, self.in_features, dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.weight_tensor(dtype)
        return w.dequantize(dtype) if self.fmt == TORCHAO else w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight: a fresh tensor, for code that reads ``.weight`` (initialisers,
        weight analysis). Writing into it changes nothing."""
        if self.bias is not None:
            return self.dequantized(self.bias.dtype)
        return self.dequantized(self.weight_scale.dtype if self.fmt == COMPRESSED else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight_tensor(x.dtype), bias)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + (
            self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def spec(self) -> dict[str, Any]:
        """What the quantized directory's ``quantization_config`` records to rebuild this module on load."""
        return {"bits": self.bits, "format": self.fmt, "in": self.in_features, "out": self.out_features,
                "bias": self.bias is not None, "group": self.group}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, format={self.fmt}")


# ---------------------------------------------------------------------------- mixture-of-experts weights
EXPERTS_KIND = "experts"
_MODULE_STATE = frozenset(nn.Module().__dict__)  # nn.Module's own bookkeeping, not an experts module's settings


def expert_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-d (experts, out, in) weight parameters held directly by ``module`` (empty for any other module)."""
    if isinstance(module, PackedExperts):
        return {}
    return {n: p for n, p in module._parameters.items() if p is not None and p.ndim == 3}


def is_experts(module: nn.Module) -> bool:
    """A mixture-of-experts module that keeps all its experts' weights as 3-d parameters (transformers 5's
    ``MixtralExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``)."""
    return bool(expert_weights(module))


def check_experts(module: nn.Module, name: str = "") -> None:
    """A one-line error for an experts module whose form :class:`PackedExperts` does not reproduce."""
    where = f" ({name})" if name else ""
    if getattr(module, "is_transposed", False):
        raise LayerlabError(f"quantize does not support experts stored as (experts, in, out){where}")
    other = [n for n, p in module.named_parameters() if n not in expert_weights(module)]
    if other:
        raise LayerlabError(f"quantize supports experts with 3-d weights only; {type(module).__name__}{where} "
                            f"also holds {', '.join(other)}")


@functools.cache
def _packed_class(experts_class: type) -> type:
    """``PackedExperts`` mixed into ``experts_class``: the experts class's forward and helpers, packed weights."""
    return type(f"Packed{experts_class.__name__}", (PackedExperts, experts_class), {"__module__": __name__})


class PackedExperts(nn.Module):
    """A mixture-of-experts module whose 3-d weights are stored packed, each expert's matrix row by row, group-wise.

    Instances are of a subclass of the original experts class (:func:`_packed_class`), built by
    :meth:`from_module` or :meth:`empty_like`: the settings of the original (``num_experts``, ``config``,
    ``act_fn``, ...) are kept, and reading a packed weight's name (``gate_up_proj``, ``down_proj``) gives the
    dequantized (experts, out, in) tensor, so the original class's own forward runs unchanged on it. Buffers, per
    packed weight ``W`` (so that no key collides with transformers' checkpoint renamings of ``experts.W``):
    ``qweight_W`` (experts, out, in_padded * bits / 8) uint8, ``scale_W`` and ``offset_W`` float16 (experts, out,
    groups). Always the packed format, at every width (torchao's int8 tensor is for 2-d linear weights).
    """

    def __init__(self, like: nn.Module, shapes: dict[str, tuple[int, int, int]], groups: dict[str, int], *,
                 bits: int, dtype: torch.dtype):
        nn.Module.__init__(self)  # not the experts class's __init__, which would allocate the dense weights
        for key, value in like.__dict__.items():
            if key not in _MODULE_STATE:
                object.__setattr__(self, key, value)
        for key, child in like.named_children():
            self.add_module(key, child)
        self.bits, self.fmt, self.dtype_ = bits, PACKED, dtype
        self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self.groups = dict(groups)
        self._dense: dict[str, torch.Tensor] | None = None
        for n, (e, o, i) in self.shapes.items():
            g = self.groups[n]
            self.register_buffer(f"qweight_{n}", torch.zeros(e, o, padded(i, g) * bits // 8, dtype=torch.uint8))
            self.register_buffer(f"scale_{n}", torch.zeros(e, o, padded(i, g) // g, dtype=torch.float16))
            self.register_buffer(f"offset_{n}", torch.zeros(e, o, padded(i, g) // g, dtype=torch.float16))

    @classmethod
    def from_module(cls, module: nn.Module, *, bits: int, group: int) -> PackedExperts:
        """Quantize every 3-d weight of the experts ``module``: each (out, in) expert matrix as
        :class:`PackedLinear` would, with :func:`row_group` of its row length."""
        check_experts(module)
        weights = expert_weights(module)
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        groups = {n: row_group(s[2], group) for n, s in shapes.items()}
        dtype = next(iter(weights.values())).dtype
        m = _packed_class(type(module))(module, shapes, groups, bits=bits, dtype=dtype)
        with torch.no_grad():
            for n, w in weights.items():
                for e in range(w.shape[0]):  # expert by expert: the float temporaries stay one matrix in size
                    codes, scale, offset = quantize_groups(w[e], bits, groups[n])
                    getattr(m, f"qweight_{n}")[e] = pack_bits(codes, bits)
                    getattr(m, f"scale_{n}")[e] = scale
                    getattr(m, f"offset_{n}")[e] = offset
        return m.to(next(iter(weights.values())).device)

    @classmethod
    def empty_like(cls, module: nn.Module, spec: dict[str, Any], name: str = "") -> PackedExperts:
        """The module :meth:`from_module` would build on ``module`` (its weights' values aside), from its
        recorded ``spec``: what the loader puts in place before the packed buffers load."""
        check_experts(module, name)
        weights = spec["weights"]
        dtype = next(iter(expert_weights(module).values())).dtype
        return _packed_class(type(module))(module, {n: w["shape"] for n, w in weights.items()},
                                           {n: w["group"] for n, w in weights.items()}, bits=spec["bits"],
                                           dtype=dtype)

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (experts, out, in) weight ``name`` as the forward uses it."""
        codes = unpack_bits(getattr(self, f"qweight_{name}"), self.bits)
        return dequantize_groups(codes, getattr(self, f"scale_{name}"), getattr(self, f"offset_{name}"),
                                 self.shapes[name][2], dtype or self.dtype_)

    def __getattr__(self, name: str):
        shapes = self.__dict__.get("shapes")
        if shapes is not None and name in shapes:  # a packed weight read by its original name
            dense = self.__dict__.get("_dense")
            return dense[name] if dense is not None else self.dequantized(name)
        return super().__getattr__(name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The experts class's own forward, with each packed weight dequantized once (in the input's dtype)."""
        self._dense = {n: self.dequantized(n, hidden_states.dtype) for n in self.shapes}
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._dense = None

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def spec(self) -> dict[str, Any]:
        """What the quantized directory's ``quantization_config`` records to rebuild this module on load."""
        return {"kind": EXPERTS_KIND, "bits": self.bits, "format": self.fmt,
                "weights": {n: {"shape": list(s), "group": self.groups[n]} for n, s in self.shapes.items()}}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(s)}" for n, s in self.shapes.items()) + f", bits={self.bits}, format={self.fmt}"


# ---------------------------------------------------------------------------- the compressed-tensors output
def compressed_tensors_unsupported(modules: dict[str, nn.Module], widths, group: int,
                                   conv1d: bool = False) -> str | None:
    """Why the quantizable ``modules`` (path -> module) at candidate ``widths`` cannot be written in the
    compressed-tensors format (the module docstring), or None when they can. ``conv1d``: the ``Conv1D`` layers
    are written as ``nn.Linear`` ones (a GPT-2 written as GPTBigCode, :mod:`layerlab.compress.gpt2_linear`)."""
    if any(is_experts(m) for m in modules.values()):
        return "mixture-of-experts weights"
    conv = [n for n, m in modules.items() if type(m).__name__ == "Conv1D"]
    if conv and not conv1d:
        return "GPT-2 Conv1D layers (compressed-tensors quantizes nn.Linear only)"
    other = sorted({type(m).__name__ for m in modules.values()
                    if type(m) is not nn.Linear and not (conv1d and type(m).__name__ == "Conv1D")})
    if other:  # e.g. Falcon's FalconLinear, whose _init_weights reads the weight compressed-tensors removed on load
        return f"{other[0]} layers (transformers loads compressed nn.Linear layers only)"
    bad = [w for w in widths if w not in CT_WIDTHS]
    if bad:
        return f"{bad[0]}-bit widths (it holds 2 to 8)"
    for n, m in modules.items():
        in_f = linear_weight(m)[0].shape[1]
        if in_f % row_group(in_f, group):
            return f"{n} has {in_f} inputs, not a whole number of groups of {group}"
    return None


def compressed_tensors_config(blocks: list[dict[str, dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed-tensors checkpoint whose block ``i`` holds the packed layers
    ``blocks[i]`` (path -> :meth:`PackedLinear.spec` of a layer in the :data:`COMPRESSED` format): one config group
    per block (and per group size, where a block's layers differ in it), named ``block_<i>``
    (``block_<i>_g<size>``), its ``targets`` the layers' paths as anchored regular expressions and its ``weights``
    their width; every other module stays in full precision. ``extra`` (layerlab's record, e.g. the average
    width) is kept beside it; compressed-tensors ignores keys it does not know."""
    groups: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        by_group: dict[tuple[int, int], list[str]] = {}
        for name, spec in block.items():
            if spec.get("format") != COMPRESSED:
                raise LayerlabError(f"{name} is not in the compressed-tensors format")
            by_group.setdefault((spec["bits"], spec["group"]), []).append(name)
        for (bits, size), names in by_group.items():
            key = f"block_{i}" if len(by_group) == 1 else f"block_{i}_g{size}"
            groups[key] = {"targets": [f"re:^{re.escape(n)}$" for n in names],
                           "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                                       "group_size": size, "dynamic": False, "observer": "minmax"},
                           "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": COMPRESSED, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": [], **extra}


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an ``nn.Linear`` or GPT-2 ``Conv1D`` (which stores (in, out))."""
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().t(), module.bias
    return module.weight.detach(), module.bias


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def set_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def refuse_quantized(model, model_dir, command: str) -> None:
    """A one-line error for a model ``layerlab quantize`` wrote: its packed layers cannot be edited."""
    if getattr(model.config, "quantization_config", None) is not None:
        advice = "" if command == "quantize" else f"; {command} the full-precision model, then quantize"
        raise LayerlabError(f"{model_dir} is already quantized{advice}")


# ---------------------------------------------------------------------------- Hugging Face integration
def register_quantizer() -> None:
    """Teach transformers' ``from_pretrained`` the ``layerlab`` quantization method (idempotent).

    transformers is imported here, not when this module is: importing it runs layerlab's registration
    (``layerlab/__init__.py``), which imports ``layerlab.model``, which imports this module."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
    )
    from transformers.quantizers.auto import register_quantizer as register_hf_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    _wrap_compressed_tensors_quantizer()
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    class LayerlabQuantConfig(QuantizationConfigMixin):
        """``modules``: module path -> {"bits", "format", "in", "out", "bias"}; ``group``: group size."""

        def __init__(self, modules: dict[str, dict[str, Any]] | None = None, group: int = 128, **kwargs):
            self.quant_method = QUANT_METHOD
            self.modules = modules or {}
            self.group = group
            for k, v in kwargs.items():  # keep what a newer writer recorded (e.g. average bits)
                setattr(self, k, v)

        def to_dict(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    class LayerlabQuantizer(HfQuantizer):
        """Swap the recorded modules for :class:`PackedLinear` or :class:`PackedExperts` before the packed
        weights load."""

        requires_calibration = True  # only loads what ``layerlab quantize`` wrote

        def _process_model_before_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            for name, spec in cfg.modules.items():
                if spec.get("kind") == EXPERTS_KIND:  # a mixture-of-experts module's 3-d weights
                    set_module(model, name, PackedExperts.empty_like(model.get_submodule(name), spec, name))
                    continue
                # a layer narrower than the group was quantized in one group of its own width
                group = spec.get("group", cfg.group)
                set_module(model, name, PackedLinear(spec["in"], spec["out"], bits=spec["bits"], group=group,
                                                     bias=spec["bias"], fmt=spec.get("format", PACKED)))
            if any(s.get("format") == TORCHAO for s in cfg.modules.values()) and torchao_int8() is None:
                raise LayerlabError("this model's 8-bit layers use torchao's int8 format; pip install torchao")

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False  # the checkpoint already holds the packed codes

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    register_quantization_config(QUANT_METHOD)(LayerlabQuantConfig)
    register_hf_quantizer(QUANT_METHOD)(LayerlabQuantizer)
    assert QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING


_CT_BAR_MODULES = ("compressed_tensors.compressors.model_compressors.model_compressor",
                   "compressed_tensors.quantization.lifecycle.apply", "compressed_tensors.offload.dispatch")


def _quiet_compressed_tensors_bars() -> None:
    """Make compressed-tensors' progress bars (applying the config, compressing and decompressing the model on
    load) follow transformers' progress-bar switch, which layerlab's commands turn off: compressed-tensors calls
    ``tqdm`` directly. Idempotent; modules it does not have are skipped."""
    import importlib

    from transformers.utils import logging as hf_logging

    for name in _CT_BAR_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        bar = getattr(module, "tqdm", None)
        if bar is None or getattr(bar, "_layerlab_quiet", False):
            continue

        def quiet(*args, _bar=bar, **kwargs):
            kwargs["disable"] = kwargs.get("disable", False) or not hf_logging.is_progress_bar_enabled()
            return _bar(*args, **kwargs)

        quiet._layerlab_quiet = True
        module.tqdm = quiet


def _wrap_compressed_tensors_quantizer() -> None:
    """transformers' compressed-tensors quantizer, with :func:`_quiet_compressed_tensors_bars` run when it starts
    (compressed-tensors is imported then, not at layerlab's import)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    base = AUTO_QUANTIZER_MAPPING.get(COMPRESSED)
    if base is None or getattr(base, "_layerlab_quiet", False):
        return

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        _quiet_compressed_tensors_bars()

    AUTO_QUANTIZER_MAPPING[COMPRESSED] = type(base.__name__, (base,), {"__init__": __init__, "_layerlab_quiet": True,
                                                                      "__module__": base.__module__})


def quant_config_class():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    register_quantizer()
    return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
