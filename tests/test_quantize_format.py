"""``layerlab quantize`` writes compressed-tensors' pack-quantized format, which plain transformers loads.

- The int32 packing is compressed-tensors' ``pack_to_int32`` layout: checked against a bit-by-bit reference
  written here (code j at bits j * bits .. of the row's stream, 32 bits per word).
- In a subprocess where ``import layerlab`` fails, ``AutoModelForCausalLM.from_pretrained`` loads the output
  of a Llama-style model (written in memory, and block by block with ``offload=True``, in float32 and bfloat16):
  its decompressed weights equal a by-hand symmetric fake-quantization at each block's width (the mixed widths
  survive, one config group per block), and its logits equal those of layerlab's quantized copy of the model.
- What the format cannot hold (GPT-2's Conv1D layers, 1-bit widths) is written in layerlab's format, which the
  same subprocess cannot load, and the record says why.
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
    out[d] = {"logits": logits, "weights": weights, "bits": bits, "dtype": str(model.dtype)}
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
def test_llama_output_loads_without_layerlab_with_each_blocks_width(tmp_path):
    """Two equal blocks at a 6-bit budget over widths 4 and 8: one block gets each. The in-memory and the
    offloaded writes, of a float32 and of a bfloat16 checkpoint, load in plain transformers (one subprocess for
    all four); each module's decompressed weight is the by-hand fake-quantized original at its block's width (so
    the config groups carry the mixed widths), and the logits are those of layerlab's quantized copy (float32:
    to 1e-5; bfloat16: exactly, the same kernels running on the same weights)."""
    from safetensors import safe_open

    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        src = save_model(llama(dtype), tmp_path / f"src-{dtype}")
        rec = quantize(src, bits=6, widths=(4, 8), group=GROUP, out=tmp_path / f"q-{dtype}", **QUIET)
        rec_off = quantize(src, bits=6, widths=(4, 8), group=GROUP, out=tmp_path / f"qo-{dtype}", offload=True,
                           **QUIET)
        alloc = rec["allocation"]
        assert sorted(alloc) == [4, 8] and rec_off["allocation"] == alloc
        assert rec["format"] == rec_off["format"] == COMPRESSED and rec["format_note"] is None
        assert "written as compressed-tensors" in "\n".join(quantize_lines(rec))
        runs[dtype] = src, alloc
    loaded = load_without_layerlab(tmp_path, ids, *(tmp_path / f"{k}-{d}" for d in runs for k in ("q", "qo")))
    for dtype, (src, alloc) in runs.items():
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


def test_what_the_format_cannot_hold_is_written_in_layerlab_format(tmp_path):
    """GPT-2's Conv1D layers and 1-bit widths: the layerlab format, with the reason in the record and the printed
    lines. That format (layerlab's only output before) does not load without layerlab: transformers either
    refuses it or, not knowing its ``quant_method``, builds the plain model and leaves the packed layers'
    weights at their random init, so its logits are not the quantized model's."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    g = save_model(gpt2, tmp_path / "gpt2")
    rec = quantize(g, bits=3, widths=(2, 4), group=GROUP, out=tmp_path / "gq", **QUIET)
    assert rec["format"] == "layerlab" and "Conv1D" in rec["format_note"]
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
