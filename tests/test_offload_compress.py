"""``prune`` and ``quantize`` in offload mode (issue 13, section 3): the model is never built, blocks stream from
the safetensors shards one at a time, and the output is written tensor by tensor.

Tiny random models built from the installed transformers' config classes (gpt2 with its tied head, qwen3, opt,
gpt_neox with its renamed head, and layerlab's own), saved in several safetensors shards; nothing is downloaded.
- the offloaded prune's directory equals the in-memory one: the same blocks chosen (same scores), every tensor
  equal, the same config.json (``dtype`` aside, see the test), and it equals a hand-built expectation read from
  the source shards (tensors renamed for the renumbered blocks, or the removed sublayer's projection zeroed);
  plain transformers loads it with the in-memory output's logits;
- during the choice no more than one block is materialised, and the writer holds at most one tensor read from
  the checkpoint at a time;
- ``loss`` (whole blocks: greedy, one skip-stream pass per removed block) chooses as in memory, with the same
  greedy losses; ``loss`` for sublayers and healing in offload mode are one line;
- the offloaded quantize (lim and zd) writes the same tensors and config as the in-memory one, bit for bit, and
  ``load_model`` opens it.
"""

import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from conftest import dir_tensors, perturb, watch_block_loads

import layerlab
from layerlab.compress.prune import prune
from layerlab.compress.quantize import quantize
from layerlab.config import ModelConfig
from layerlab.errors import LayerlabError

V = 320  # the byte tokenizer's 257 ids fit
RUN = dict(data=None, tokens=600, measure_tokens=300)
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)


def _config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**SMALL, head_dim=16)
    if family == "llama":
        return transformers.LlamaConfig(**SMALL)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=V, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=4,
                                      num_attention_heads=2, ffn_dim=64, max_position_embeddings=64)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, use_parallel_residual=True)
    raise ValueError(family)


# where each family keeps its blocks in the checkpoint, and each sublayer's output projection inside a block,
# read from the transformers modeling code (not from layerlab's adapter)
BLOCKS = {"gpt2": "transformer.h.", "qwen3": "model.layers.", "llama": "model.layers.",
          "opt": "model.decoder.layers.", "gpt_neox": "gpt_neox.layers.", "layerlab": "blocks."}
OUT_PROJ = {"gpt2": {"attn": "attn.c_proj", "mlp": "mlp.c_proj"},
            "qwen3": {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"},
            "opt": {"attn": "self_attn.out_proj", "mlp": "fc2"},
            "gpt_neox": {"attn": "attention.dense", "mlp": "mlp.dense_4h_to_h"}}


def _save(family: str, path: Path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """A 4-block random model of ``family`` in several safetensors shards, with the byte tokenizer."""
    torch.manual_seed(seed)
    if family == "layerlab":
        model = layerlab.build_model(ModelConfig(layers=4, width=32, heads=2, context=64, vocab_size=V))
    else:
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
    model = perturb(model, 0.05, seed=seed).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="20KB")
    from layerlab.data import ByteTokenizer

    ByteTokenizer().save(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].numel() else a[k],
                           b[k].view(torch.uint8) if b[k].numel() else b[k]), k  # bit for bit


def _numbers(x) -> list:
    """Every number in a nested record, in order (None as nan)."""
    if isinstance(x, dict):
        return [n for k in sorted(x) for n in _numbers(x[k])]
    if isinstance(x, (list, tuple)):
        return [n for v in x for n in _numbers(v)]
    return [float("nan") if x is None else float(x)]


def _config_json(d: Path) -> dict:
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("transformers_version", None)
    return cfg


def _expected_pruned(src: Path, family: str, removed: list[int], unit: str) -> dict[str, torch.Tensor]:
    """The pruned checkpoint built by hand from the source shards: for blocks, the kept blocks' tensors renamed
    to 0..n-1 in order and the removed ones gone; for a sublayer, its output projection's tensors zeroed."""
    src_t, prefix = dir_tensors(src), BLOCKS[family]
    out = {}
    if unit == "block":
        keep = [i for i in range(4) if i not in removed]
        for k, t in src_t.items():
            if k.startswith(prefix):
                i, rest = k[len(prefix):].split(".", 1)
                if int(i) in keep:
                    out[f"{prefix}{keep.index(int(i))}.{rest}"] = t
            else:
                out[k] = t
        return out
    gone = tuple(f"{prefix}{i}.{OUT_PROJ[family][unit]}." for i in removed)
    return {k: torch.zeros_like(t) if k.startswith(gone) else t for k, t in src_t.items()}


@pytest.mark.parametrize("family,unit,metric", [
    ("gpt2", "block", "angular"), ("qwen3", "block", "bi"), ("opt", "block", "angular"),
    ("gpt_neox", "block", "bi"), ("gpt2", "mlp", "bi"), ("qwen3", "attn", "angular"), ("opt", "attn", "bi"),
    ("gpt2", "block", "loss"), ("qwen3", "block", "loss"),
])
def test_offload_prune_equals_in_memory(family, unit, metric, tmp_path):
    src = _save(family, tmp_path / "src")
    kw = dict(remove=2 if unit == "block" else 1, metric=metric, unit=unit, **RUN)
    mem = prune(src, out=tmp_path / "mem", offload=False, **kw)
    off = prune(src, out=tmp_path / "off", offload=True, **kw)
    assert off["offload"] is True and mem["offload"] is False
    assert off["removed"] == mem["removed"]
    assert _numbers(off["scores"]) == pytest.approx(_numbers(mem["scores"]), abs=1e-6, nan_ok=True)
    for key in ("layers", "attn_sublayers", "mlp_sublayers", "bytes"):
        assert off["before"][key] == mem["before"][key] and off["after"][key] == mem["after"][key], key
    assert off["before"]["loss"] == pytest.approx(mem["before"]["loss"], abs=1e-5)
    assert off["after"]["loss"] == pytest.approx(mem["after"]["loss"], abs=1e-5)
    assert off.get("zeroed") == mem.get("zeroed")
    removed = [r["block"] for r in off["removed"]]
    mem_t, off_t = dir_tensors(tmp_path / "mem"), dir_tensors(tmp_path / "off")
    _assert_same_tensors(off_t, mem_t)
    _assert_same_tensors(off_t, _expected_pruned(src, family, removed, unit))
    # the same config.json: save_pretrained records the dtype the model held; the writer records the same one
    assert _config_json(tmp_path / "off") == _config_json(tmp_path / "mem")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert ((tmp_path / "off" / name).is_file()) == ((tmp_path / "mem" / name).is_file()), name
    assert (tmp_path / "off" / "model.safetensors.index.json").is_file()  # shard by shard, as the source
    # plain transformers loads it, with the in-memory output's logits
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "off").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    assert a.config.num_hidden_layers == 4 - (len(removed) if unit == "block" else 0)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_offload_prune_of_a_layerlab_model_drops_the_sublayer(tmp_path):
    src = _save("layerlab", tmp_path / "src")
    kw = dict(remove=1, metric="bi", unit="mlp", **RUN)
    mem = prune(src, out=tmp_path / "mem", offload=False, **kw)
    off = prune(src, out=tmp_path / "off", offload=True, **kw)
    assert off["removed"] == mem["removed"] and off["surgery"] == mem["surgery"] == "removed"
    i = off["removed"][0]["block"]
    expected = {k: t for k, t in dir_tensors(src).items()
                if not k.startswith((f"blocks.{i}.ln2.", f"blocks.{i}.mlp.", f"blocks.{i}.ln2_out."))}
    _assert_same_tensors(dir_tensors(tmp_path / "off"), expected)
    _assert_same_tensors(dir_tensors(tmp_path / "off"), dir_tensors(tmp_path / "mem"))
    assert _config_json(tmp_path / "off")["drop_mlp"] == [i]
    assert off["after"]["loss"] == pytest.approx(mem["after"]["loss"], abs=1e-5)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_offload_prune_holds_one_block_and_one_tensor(dtype, tmp_path, monkeypatch):
    """During the choice at most one block is materialised (every Offloaded's held set, checked on each load).
    While the output is written, Python's allocations (tracemalloc: the bytes read from the shards) peak below
    the largest tensor plus 40 kB (buffers, the header, config.json), far below the 250 kB checkpoint; where
    every tensor is converted (a float32 checkpoint pruned in bf16), at most one tensor read from the
    checkpoint is alive at a time."""
    import tracemalloc

    import layerlab.offload as off

    src = _save("llama", tmp_path / "src")
    sizes = [t.numel() * t.element_size() for t in dir_tensors(src).values()]
    assert sum(sizes) > max(sizes) + 150_000
    loads = watch_block_loads(monkeypatch)
    alive, most, writing, traced = [], [0], [False], [0]
    get = off.Checkpoint.get

    def counting_get(self, name):
        t = get(self, name)
        if writing[0]:
            alive.append(weakref.ref(t))
            most[0] = max(most[0], sum(r() is not None for r in alive))
        return t

    monkeypatch.setattr(off.Checkpoint, "get", counting_get)
    write = off.write_pruned

    def watched(*a, **k):
        writing[0] = True
        tracemalloc.start()
        try:
            return write(*a, **k)
        finally:
            traced[0] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            writing[0] = False

    monkeypatch.setattr(off, "write_pruned", watched)
    rec = prune(src, out=tmp_path / "out", remove=1, offload=True, dtype=dtype, **RUN)
    assert loads and max(held for _, held, _ in loads) == 1
    assert rec["after"]["layers"] == 3
    assert traced[0] < max(sizes) + 40_000, traced[0]
    if dtype == "auto":
        assert alive == []  # copied byte for byte, never read as a tensor
    else:
        assert len(alive) == len(sizes) - 9  # one read per kept tensor (a llama block has 9)
        assert most[0] == 1
        assert {t.dtype for t in dir_tensors(tmp_path / "out").values()} == {torch.bfloat16}


def test_offload_prune_refuses_sublayer_loss_and_healing_in_one_line(tmp_path):
    src = _save("gpt2", tmp_path / "src")
    with pytest.raises(LayerlabError, match=r"^prune in offload mode measures loss for whole blocks only "
                                            r"\(skip-streams\); --unit attn chooses by angular or bi there, or use "
                                            r"--no-offload$"):
        prune(src, out=tmp_path / "a", remove=1, metric="loss", unit="attn", offload=True, **RUN)
    with pytest.raises(LayerlabError, match=r"^prune in offload mode cannot heal .*"):
        prune(src, out=tmp_path / "b", remove=1, heal_steps=2, offload=True, **RUN)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_offload_prune_of_a_bf16_checkpoint_stays_bf16(tmp_path):
    """A bf16 checkpoint is pruned in bf16 (``dtype`` auto) in both modes: the tensors are the source's bytes."""
    src = _save("llama", tmp_path / "src", dtype=torch.bfloat16)
    kw = dict(remove=1, metric="bi", **RUN)
    mem = prune(src, out=tmp_path / "mem", offload=False, **kw)
    off = prune(src, out=tmp_path / "off", offload=True, **kw)
    assert off["removed"] == mem["removed"]
    off_t = dir_tensors(tmp_path / "off")
    assert {t.dtype for t in off_t.values()} == {torch.bfloat16}
    _assert_same_tensors(off_t, dir_tensors(tmp_path / "mem"))
    _assert_same_tensors(off_t, _expected_pruned(src, "llama", mem["removed_blocks"], "block"))


QUANT = dict(bits=3.5, tokens=600, calibration_tokens=300, data=None)  # widths 3 and 4: the packed format


def _zd_by_hand(src: Path, family: str) -> list[float]:
    """ZD per block from the source tensors: the share of each linear weight matrix's entries more than one std
    from its mean (a GPT-2 Conv1D stores W transposed; the share is the same)."""
    t, prefix = dir_tensors(src), BLOCKS[family]
    out = []
    for i in range(4):
        mats = [w.float() for k, w in t.items() if k.startswith(f"{prefix}{i}.") and k.endswith(".weight")
                and w.dim() == 2]
        out.append(sum(int(((w - w.mean()).abs() > w.std()).sum()) for w in mats) / sum(w.numel() for w in mats))
    return out


@pytest.mark.parametrize("family,importance", [("llama", "lim"), ("gpt2", "zd"), ("opt", "lim")])
def test_offload_quantize_equals_in_memory(family, importance, tmp_path, monkeypatch):
    from layerlab.adapters import load_model

    src = _save(family, tmp_path / "src")
    mem = quantize(src, out=tmp_path / "mem", importance=importance, offload=False, **QUANT)
    loads = watch_block_loads(monkeypatch)
    q = quantize(src, out=tmp_path / "off", importance=importance, offload=True, **QUANT)
    assert loads and max(held for _, held, _ in loads) == 1  # one block at a time, with its packed layers
    assert q["offload"] is True and mem["offload"] is False
    assert q["allocation"] == mem["allocation"] and sorted(set(q["allocation"])) == [3, 4]
    assert _numbers(q["scores"]) == pytest.approx(_numbers(mem["scores"]), abs=1e-6)
    if importance == "zd":
        assert q["scores"]["zd"] == pytest.approx(_zd_by_hand(src, family), abs=1e-12)
    assert list(q["runs"]) == list(mem["runs"])
    for name in mem["runs"]:
        a, b = q["runs"][name], mem["runs"][name]
        assert a.get("allocation") == b.get("allocation") and a["bytes"] == b["bytes"], name
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
    assert q["after"]["disk_bytes"] == pytest.approx(mem["after"]["disk_bytes"], abs=4096)  # headers differ
    _assert_same_tensors(dir_tensors(tmp_path / "off"), dir_tensors(tmp_path / "mem"))
    assert _config_json(tmp_path / "off") == _config_json(tmp_path / "mem")
    # load_model (what eval opens) reads it with the packed layers, and computes what the in-memory output does
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    a, b = load_model(tmp_path / "off").model, load_model(tmp_path / "mem").model
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_offload_quantize_refuses_loss_importance_in_one_line(tmp_path):
    src = _save("gpt2", tmp_path / "src")
    with pytest.raises(LayerlabError, match=r"^quantize in offload mode ranks blocks by lim or zd; .*--no-offload$"):
        quantize(src, out=tmp_path / "q", importance="loss", offload=True, **QUANT)
    assert not (tmp_path / "q").exists()


def test_cli_prune_and_quantize_offload_say_so_and_record_it(tmp_path):
    """Through the CLI: ``--offload`` on prune and quantize prints the mode line, records ``offload`` and gives
    the in-memory run's choice; ``--max-memory`` below one block is one line and writes nothing."""
    from typer.testing import CliRunner

    from layerlab.cli import app

    src = _save("llama", tmp_path / "src")
    run = CliRunner().invoke
    common = ["--tokens", "256"]
    for cmd, extra in (("prune", ["--remove", "1", "--metric", "bi", "--measure-tokens", "256"]),
                       ("quantize", ["--bits", "4", "--calibration-tokens", "256", "--no-baselines"])):
        recs = {}
        for mode in ("--offload", "--no-offload"):
            out = tmp_path / f"{cmd}{mode}"
            r = run(app, [cmd, str(src), *extra, *common, mode, "--out", str(out)])
            assert r.exit_code == 0, (r.output, r.exception)
            recs[mode] = json.loads((out / "layerlab.json").read_text())
        assert recs["--offload"]["offload"] is True and recs["--no-offload"]["offload"] is False
        key = "removed_blocks" if cmd == "prune" else "allocation"
        assert recs["--offload"][key] == recs["--no-offload"][key] and recs["--offload"][key]
        r = run(app, [cmd, str(src), *extra, *common, "--max-memory", "1KB", "--out", str(tmp_path / "x")])
        assert r.exit_code != 0 and "\n" not in str(r.exception).strip() and not (tmp_path / "x").exists()
