"""``layerlab quantize`` writes compressed-tensors' pack-quantized format, which plain transformers loads.

- The int32 packing is compressed-tensors' ``pack_to_int32`` layout: checked against a bit-by-bit reference
  written here (code j at bits j * bits .. of the row's stream, 32 bits per word).
- In a subprocess where ``import layerlab`` fails, ``AutoModelForCausalLM.from_pretrained`` loads the output
  of a Llama-style model (written in memory, and block by block with ``offload=True``, in float32 and bfloat16):
  its decompressed weights equal a by-hand symmetric fake-quantization at each block's width (the mixed widths
  survive, one config group per block), and its logits equal those of layerlab's quantized copy of the model.
- A GPT-2 (whose Conv1D layers compressed-tensors does not quantize) is written as transformers' ``opt``
  (GPT-2's computation with nn.Linear layers): unquantized, that conversion gives GPT-2's own logits; quantized at
  mixed widths, plain transformers loads it and its logits equal both layerlab's quantized GPT-2 and transformers'
  GPT-2 run on by-hand fake-quantized weights.
- What the format cannot hold (1-bit widths, a GPT-2 that GPTBigCode cannot express) is written in layerlab's
  format, which the same subprocess cannot load, and the record says why.
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import perturb, save_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from layerlab.compress import quantize, quantize_lines
from layerlab.compress.quantize import Quantizer
from layerlab.errors import LayerlabError
from layerlab.packed import COMPRESSED, PackedLinear, pack_int32, unpack_int32

ct = pytest.importorskip("compressed_tensors")  # transformers needs it to load the format (not to write it)
QUIET = {"tokens": 128, "calibration_tokens": 128, "baselines": False, "progress": False, "importance": "zd"}
GROUP = 16
V = 259  # the byte tokenizer's vocabulary

# run at the top of the subprocess: layerlab cannot be imported there
BLOCK = """
import sys
class _NoLayerlab:
    def find_spec(self, name, path=None, target=None):
        if name == "layerlab" or name.startswith("layerlab."):
            raise ImportError("layerlab is blocked in this process")
sys.meta_path.insert(0, _NoLayerlab())
try:
    import layerlab
    raise SystemExit("layerlab imported")
except ImportError:
    pass
"""

LOAD = BLOCK + """
import json, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
out = {}
for d in sys.argv[3:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(d).eval()
    except Exception as e:  # noqa: BLE001
        out[d] = {"error": f"{type(e).__name__}: {e}"}
        continue
    with torch.no_grad():
        logits = model(ids).logits  # the first forward decompresses the packed weights
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    bits = {n: m.quantization_scheme.weights.num_bits for n, m in model.named_modules()
            if getattr(m, "quantization_scheme", None) is not None}
    out[d] = {"logits": logits, "weights": weights, "bits": bits, "dtype": str(model.dtype),
              "class": type(model).__name__}
torch.save(out, sys.argv[2])
"""


def load_without_layerlab(tmp_path, ids: torch.Tensor, *dirs) -> dict:
    """What plain transformers (with compressed-tensors, without layerlab) loads from each of ``dirs``: logits on
    ``ids``, the decompressed weights and widths of the quantized modules; or the load error."""
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "ids.pt"), str(tmp_path / "loaded.pt"),
                        *map(str, dirs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: v for k, v in torch.load(tmp_path / "loaded.pt").items()}


def fake_quant(w: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric round-to-nearest, written out: per group of ``group`` inputs, scale = max|w| / ((2^b - 1) / 2)
    in the model's dtype, q = round(w / scale) clipped to the signed b-bit range, w' = q * scale."""
    out = torch.empty(w.shape, dtype=torch.float32)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            x = w[r, g:g + group].float()
            s = float((x.abs().max() / ((2 ** bits - 1) / 2)).to(dtype))
            q = torch.round(x / s).clamp(lo, hi) if s > 0 else torch.zeros_like(x)
            out[r, g:g + group] = q * s
    return out.to(dtype)


def llama(dtype=torch.float32, layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return perturb(AutoModelForCausalLM.from_config(cfg), 0.05).to(dtype).eval()


# ---------------------------------------------------------------------------- the packing
def packed_by_hand(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Code j's bit k goes to bit (j * bits + k) of the row's stream; word w holds stream bits 32w .. 32w + 31."""
    rows, n = codes.shape
    words = -(-n * bits // 32)
    out = [[0] * words for _ in range(rows)]
    for r in range(rows):
        for j in range(n):
            for k in range(bits):
                if int(codes[r, j]) >> k & 1:
                    p = j * bits + k
                    out[r][p // 32] |= 1 << (p % 32)
    # as int32: the words' bit patterns, two's complement
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in out], dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [16, 40, 96])
def test_int32_packing_is_the_bit_stream_compressed_tensors_reads(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert torch.equal(packed, packed_by_hand(codes, bits))
    assert torch.equal(unpack_int32(packed, bits, n), codes)
    # and compressed-tensors' own unpacking (signed codes, offset by 2^(bits-1)) reads the same codes
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([3, n])).to(torch.int16),
                       codes.to(torch.int16) - 2 ** (bits - 1))


# ---------------------------------------------------------------------------- plain transformers loads the output
def write_both_ways(build, tmp_path) -> dict:
    """A float32 and a bfloat16 ``build(dtype)`` quantized at a 6-bit budget over widths 4 and 8, in memory
    (``q-<dtype>``) and offloaded (``qo-<dtype>``): {dtype: (source dir, allocation, (record, offloaded record))},
    one block at each width and the same allocation both ways."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        src = save_model(build(dtype), tmp_path / f"src-{dtype}")
        recs = tuple(quantize(src, bits=6, widths=(4, 8), group=GROUP, out=tmp_path / f"{k}-{dtype}", offload=off,
                              **QUIET) for k, off in (("q", None), ("qo", True)))
        alloc = recs[0]["allocation"]
        assert sorted(alloc) == [4, 8] and recs[1]["allocation"] == alloc
        runs[dtype] = src, alloc, recs
    return runs


def test_llama_output_loads_without_layerlab_with_each_blocks_width(tmp_path):
    """Two equal blocks at a 6-bit budget over widths 4 and 8: one block gets each. The in-memory and the
    offloaded writes, of a float32 and of a bfloat16 checkpoint, load in plain transformers (one subprocess for
    all four); each module's decompressed weight is the by-hand fake-quantized original at its block's width (so
    the config groups carry the mixed widths), and the logits are those of layerlab's quantized copy (float32:
    to 1e-5; bfloat16: exactly, the same kernels running on the same weights)."""
    from safetensors import safe_open

    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = write_both_ways(llama, tmp_path)
    for _, _, (rec, rec_off) in runs.values():
        assert rec["format"] == rec_off["format"] == COMPRESSED and rec["format_note"] is None
        assert "written as compressed-tensors" in "\n".join(quantize_lines(rec))
    loaded = load_without_layerlab(tmp_path, ids, *(tmp_path / f"{k}-{d}" for d in runs for k in ("q", "qo")))
    for dtype, (src, alloc, _) in runs.items():
        original = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        originals = dict(original.named_modules())
        with torch.no_grad():
            ref = Quantizer(original, GROUP, output=COMPRESSED).quantized_copy(alloc)(ids).logits
        for d in (tmp_path / f"q-{dtype}", tmp_path / f"qo-{dtype}"):
            qc = json.loads((d / "config.json").read_text())["quantization_config"]
            assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
            assert {k: g["weights"]["num_bits"] for k, g in qc["config_groups"].items()} == {
                f"block_{i}": b for i, b in enumerate(alloc)}
            assert all(t.startswith(f"re:^model\\.layers\\.{k[-1]}\\.") for k, g in qc["config_groups"].items()
                       for t in g["targets"])
            assert qc["avg_bits"] == 6.0 and qc["budget_bits"] == 6
            got = loaded[str(d)]
            assert "error" not in got, got
            assert got["dtype"] == str(dtype)
            assert len(got["weights"]) == 7 * 2  # q, k, v, o, gate, up, down in each block
            for name, w in got["weights"].items():
                bits = alloc[int(name.split(".")[2])]
                assert got["bits"][name] == bits
                assert torch.equal(w, fake_quant(originals[name].weight.detach(), bits, GROUP, dtype)), name
            torch.testing.assert_close(got["logits"], ref, atol=1e-5 if dtype == torch.float32 else 0.0, rtol=0)
            # on disk: each block weight as ceil(in * bits / 32) int32 words per row, one scale per 16 inputs
            stored = {}
            for f in d.glob("*.safetensors"):
                with safe_open(f, "pt") as h:
                    stored.update({k: h.get_slice(k).get_shape() for k in h.keys()})  # noqa: SIM118
            for name in got["weights"]:
                (out_f, in_f), bits = originals[name].weight.shape, alloc[int(name.split(".")[2])]
                assert stored[f"{name}.weight_packed"] == [out_f, -(-in_f * bits // 32)]
                assert stored[f"{name}.weight_scale"] == [out_f, in_f // GROUP]
                assert f"{name}.weight" not in stored


def gpt2(dtype=torch.float32, **kw):
    """A tiny GPT-2: 2 heads of 16 dimensions (so the attention scale 16 ** -0.5 is a power of two, as GPT-2's
    64 ** -0.5 is)."""
    torch.manual_seed(0)
    cfg = GPT2Config(**{"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": V, "n_positions": 64,
                        "bos_token_id": 0, "eos_token_id": 0, **kw})
    return perturb(GPT2LMHeadModel(cfg), 0.05).to(dtype).eval()


def opt_weights_by_hand(gpt2_model, weight) -> dict[str, torch.Tensor]:
    """OPT's module path -> (out, in) weight, for every layer of GPT-2's blocks, written out: ``weight(name, w)``
    maps GPT-2's (out, in) weight (the transpose of the Conv1D's (in, out) one); c_attn's output rows are the
    query, key and value features of all heads in turn, so its first, second and third thirds are q_proj, k_proj
    and v_proj."""
    e = gpt2_model.config.n_embd
    out = {}
    for i, block in enumerate(gpt2_model.transformer.h):
        p = f"model.decoder.layers.{i}."
        qkv = weight(f"transformer.h.{i}.attn.c_attn", block.attn.c_attn.weight.detach().t())
        out[p + "self_attn.q_proj"], out[p + "self_attn.k_proj"], out[p + "self_attn.v_proj"] = (
            qkv[:e], qkv[e:2 * e], qkv[2 * e:])
        out[p + "self_attn.out_proj"] = weight(f"transformer.h.{i}.attn.c_proj", block.attn.c_proj.weight.detach().t())
        out[p + "fc1"] = weight(f"transformer.h.{i}.mlp.c_fc", block.mlp.c_fc.weight.detach().t())
        out[p + "fc2"] = weight(f"transformer.h.{i}.mlp.c_proj", block.mlp.c_proj.weight.detach().t())
    return out


@pytest.mark.parametrize("kw", [{}, {"activation_function": "relu", "n_inner": 48, "tie_word_embeddings": False}])
def test_gpt2_as_opt_computes_gpt2(tmp_path, kw):
    """The conversion alone, unquantized: a GPT-2's Conv1D layers as nn.Linear (weights transposed), written as OPT
    and loaded back by transformers' OPT, give the logits of transformers' own GPT-2 (to float32 rounding); its
    weights are GPT-2's, split and renamed by hand (:func:`opt_weights_by_hand`)."""
    from safetensors.torch import save_file
    from torch import nn

    from layerlab.compress.gpt2_linear import opt_state_dict, skeleton
    from layerlab.packed import set_module

    g = gpt2(**kw)
    lin = gpt2(**kw)
    for name, m in list(lin.named_modules()):
        if type(m).__name__ == "Conv1D":
            layer = nn.Linear(*m.weight.shape)
            layer.weight.data, layer.bias.data = m.weight.data.t().contiguous(), m.bias.data.clone()
            set_module(lin, name, layer)
    (tmp_path / "opt").mkdir()
    save_file(opt_state_dict(lin), tmp_path / "opt" / "model.safetensors", metadata={"format": "pt"})
    skeleton(lin).config.save_pretrained(tmp_path / "opt")
    cfg = json.loads((tmp_path / "opt" / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["do_layer_norm_before"] is True
    opt = AutoModelForCausalLM.from_pretrained(tmp_path / "opt").eval()
    assert type(opt).__name__ == "OPTForCausalLM"
    modules = dict(opt.named_modules())
    for name, w in opt_weights_by_hand(g, lambda n, w: w).items():
        assert torch.equal(modules[name].weight, w), name
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, g(ids).logits, atol=1e-5, rtol=0)


def test_gpt2_output_loads_without_layerlab_as_opt(tmp_path):
    """A GPT-2 at a 6-bit budget over widths 4 and 8 (one block each), float32 and bfloat16, in memory and
    offloaded: written in compressed-tensors as ``opt`` (the record, the manifest and the printout say so), and
    plain transformers without layerlab loads it. Each decompressed weight is the by-hand fake-quantization of
    GPT-2's Conv1D weight, transposed, at its block's width (c_attn split into q, k, v by hand); the logits equal
    those of layerlab's quantized GPT-2, and those of transformers' own GPT-2 with its Conv1D weights replaced by
    the by-hand fake-quantized ones (float32: to 1e-5; bfloat16: exactly, the attention scale being a power of
    two)."""
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = write_both_ways(gpt2, tmp_path)
    for dtype, (_, _, recs) in runs.items():
        for r in recs:
            assert r["format"] == COMPRESSED and r["written_model_type"] == "opt"
            assert "model_type opt" in r["format_note"] and "Conv1D" in r["format_note"]
            lines = "\n".join(quantize_lines(r))
            assert "written as compressed-tensors" in lines and "model_type opt" in lines
        manifest = json.loads((tmp_path / f"q-{dtype}" / "layerlab.json").read_text())
        assert manifest["written_model_type"] == "opt" and manifest["format"] == COMPRESSED
    loaded = load_without_layerlab(tmp_path, ids, *(tmp_path / f"{k}-{d}" for d in runs for k in ("q", "qo")))
    for dtype, (src, alloc, _) in runs.items():
        original = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        with torch.no_grad():
            ref = Quantizer(original, GROUP, output=COMPRESSED).quantized_copy(alloc)(ids).logits

        def fq(name, w, alloc=alloc, dtype=dtype):
            return fake_quant(w, alloc[int(name.split(".")[2])], GROUP, dtype)

        expected = opt_weights_by_hand(original, fq)
        by_hand = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        for name, m in by_hand.named_modules():
            if type(m).__name__ == "Conv1D":
                m.weight.data = fq(name, m.weight.detach().t()).t().contiguous()
        with torch.no_grad():
            ref_by_hand = by_hand(ids).logits
        tol = 1e-5 if dtype == torch.float32 else 0.0
        torch.testing.assert_close(ref, ref_by_hand, atol=tol, rtol=0)
        for d in (tmp_path / f"q-{dtype}", tmp_path / f"qo-{dtype}"):
            cfg = json.loads((d / "config.json").read_text())
            assert cfg["model_type"] == "opt" and cfg["architectures"] == ["OPTForCausalLM"]
            qc = cfg["quantization_config"]
            assert {k: g["weights"]["num_bits"] for k, g in qc["config_groups"].items()} == {
                f"block_{i}": b for i, b in enumerate(alloc)}
            got = loaded[str(d)]
            assert "error" not in got, got
            assert got["class"] == "OPTForCausalLM" and got["dtype"] == str(dtype)
            assert set(got["weights"]) == set(expected)  # q, k, v, out_proj, fc1, fc2 in each block
            for name, w in got["weights"].items():
                assert got["bits"][name] == alloc[int(name.split(".")[3])]
                assert torch.equal(w, expected[name]), name
            torch.testing.assert_close(got["logits"], ref, atol=tol, rtol=0)
            torch.testing.assert_close(got["logits"], ref_by_hand, atol=tol, rtol=0)


def test_what_the_format_cannot_hold_is_written_in_layerlab_format(tmp_path):
    """A GPT-2 that OPT cannot express (attention scaled by the inverse layer index) and 1-bit widths: the
    layerlab format, with the reason in the record and the printed lines. That format (layerlab's only output
    before) does not load without layerlab: transformers either refuses it or, not knowing its ``quant_method``,
    builds the plain model and leaves the packed layers' weights at their random init, so its logits are not the
    quantized model's."""
    g = save_model(gpt2(scale_attn_by_inverse_layer_idx=True), tmp_path / "gpt2")
    rec = quantize(g, bits=3, widths=(2, 4), group=GROUP, out=tmp_path / "gq", **QUIET)
    assert rec["format"] == "layerlab" and "scale_attn_by_inverse_layer_idx" in rec["format_note"]
    assert rec["written_model_type"] is None
    assert rec["format_note"] in quantize_lines(rec)
    src = save_model(llama(), tmp_path / "src")
    rec = quantize(src, bits=1.5, widths=(1, 2), group=GROUP, out=tmp_path / "q1", **QUIET)
    assert rec["format"] == "layerlab" and "1-bit" in rec["format_note"]
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(1))
    out = load_without_layerlab(tmp_path, ids, tmp_path / "gq", tmp_path / "q1")
    for d in ("gq", "q1"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()  # with layerlab imported, it loads
        assert any(isinstance(m, PackedLinear) for m in loaded.modules())
        with torch.no_grad():
            ref = loaded(ids).logits
        plain = out[str(tmp_path / d)]
        assert "error" in plain or (plain["logits"] - ref).abs().max() > 0.05, d


def test_cli_format_option(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    src = save_model(llama(layers=2), tmp_path / "src")
    args = ["quantize", str(src), "--bits", "3", "--widths", "2,4", "--group", str(GROUP), "--tokens", "128",
            "--importance", "zd", "--no-baselines", "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ct")])
    assert r.exit_code == 0, r.output
    assert "written as compressed-tensors (pack-quantized, symmetric, group 16)" in r.output
    r = CliRunner().invoke(app, [*args, "--format", "layerlab", "--out", str(tmp_path / "ll")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ll" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "layerlab"
    r = CliRunner().invoke(app, [*args, "--format", "gguf", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, LayerlabError) and "format" in str(r.exception)
    assert not (tmp_path / "x").exists()
