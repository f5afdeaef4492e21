"""What a model directory's weight files may be: safetensors (whole or sharded, every shard present), or a
pickle only with --trust-pickle, read with torch.load(weights_only=True). Everything else is one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from layerlab.adapters import load_model
from layerlab.errors import LayerlabError
from layerlab.io import TRUST_PICKLE_ENV, check_weights

TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


def _pickle_only(tmp_path: Path) -> tuple[Path, GPT2LMHeadModel]:
    model = _gpt2()
    d = save_model(model, tmp_path / "pickled")
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d, model


def _fails(argv, monkeypatch, capsys) -> str:
    from layerlab.cli import main

    monkeypatch.setattr(sys, "argv", ["layerlab", *map(str, argv)])
    capsys.readouterr()  # what building the fixture printed
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch):
    # --trust-pickle sets the variable for the load that follows; restore it after each test
    monkeypatch.setenv(TRUST_PICKLE_ENV, "0")


@pytest.mark.parametrize("command", ["eval", "analyze", "prune", "quantize", "convert", "sample"])
def test_a_pickle_only_checkpoint_is_refused_without_trust_pickle(command, tmp_path, monkeypatch, capsys):
    d, _ = _pickle_only(tmp_path)
    out = tmp_path / "out"
    extra = {"prune": ["--remove", "1", "--out", out], "quantize": ["--bits", "4", "--out", out],
             "convert": ["--to", "rmsnorm", "--out", out]}.get(command, [])
    line = _fails([command, d, *extra], monkeypatch, capsys)
    assert "holds its weights only as a pickle (pytorch_model.bin)" in line and "--trust-pickle" in line
    assert not out.exists()


def test_with_trust_pickle_it_loads_the_same_weights(tmp_path, monkeypatch, capsys):
    d, model = _pickle_only(tmp_path)
    with pytest.raises(LayerlabError, match="only as a pickle"):
        load_model(d, device="cpu")
    loaded = load_model(d, device="cpu", trust_pickle=True).model
    x = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    from layerlab.cli import main

    monkeypatch.setattr(sys, "argv", ["layerlab", "eval", str(d), "--tokens", "256", "--trust-pickle"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "nats/token" in capsys.readouterr().out


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_trust_pickle_still_never_runs_code_from_the_file(tmp_path, monkeypatch, capsys):
    d, model = _pickle_only(tmp_path)
    _Evil.marker = tmp_path / "ran"
    state = dict(model.state_dict())
    state["evil"] = _Evil()
    torch.save(state, d / "pytorch_model.bin")
    line = _fails(["eval", d, "--tokens", "256", "--trust-pickle"], monkeypatch, capsys)
    assert line.startswith(f"error: cannot load model from {d}")
    assert not _Evil.marker.exists(), "the pickle ran code"


def test_a_shard_the_index_names_must_be_there(tmp_path, monkeypatch, capsys):
    d = tmp_path / "sharded"
    _gpt2().save_pretrained(d, max_shard_size="40KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    check_weights(d)  # all present: fine
    assert len(AutoModelForCausalLM.from_pretrained(d).transformer.h) == TINY["n_layer"]
    shards[1].unlink()
    with pytest.raises(LayerlabError, match=f"names the shard {shards[1].name}, which is missing"):
        check_weights(d)
    line = _fails(["analyze", d, "--tokens", "64"], monkeypatch, capsys)
    assert shards[1].name in line


def test_a_directory_without_weights_says_so(tmp_path):
    d = tmp_path / "empty"
    _gpt2().config.save_pretrained(d)
    with pytest.raises(LayerlabError, match="has no weights: expected model.safetensors"):
        check_weights(d)
