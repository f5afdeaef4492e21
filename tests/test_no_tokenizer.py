"""A model directory without tokenizer files, or with empty ones (issue 12, finding 8).

transformers 5 loads such a directory's tokenizer without an error, as one with an empty vocabulary that
encodes every text to nothing. Every command that reads text refuses it in one line naming the files it
needs, writing nothing; ``convert`` to an exact target needs no text, and checks equality on random ids.
"""

import json
import sys

import pytest
import torch
from conftest import digest, perturb, save_model, tiny_cfg
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

import layerlab
from layerlab.adapters import load_model
from layerlab.cli import app, main
from layerlab.errors import LayerlabError
from layerlab.evaluate import lm_loss

NAMES = ("tokenizer.json, or vocab.json + merges.txt (BPE), vocab.txt (WordPiece) or tokenizer.model "
         "(SentencePiece), with tokenizer_config.json")
MISSING = "has no tokenizer files; expected " + NAMES


def _gpt2(path):
    """The issue's directory: a random-init GPT-2 saved by save_pretrained, which writes no tokenizer."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    perturb(model, 0.1).save_pretrained(path)  # norms off (1, 0), so that the conversion has work to do
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-tokenizer")
    gpt2 = _gpt2(root / "gpt2")
    own = root / "layerlab"
    torch.manual_seed(0)
    perturb(layerlab.build_model(tiny_cfg(layers=2, vocab_size=64))).save_pretrained(own)
    bert = root / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100)).save_pretrained(bert)
    # tokenizer files that hold nothing: GPT-2's own files, and a tokenizer.json with an empty vocabulary
    files = _gpt2(root / "empty-files")
    (files / "vocab.json").write_text("{}")
    (files / "merges.txt").write_text("#version: 0.2\n")
    fast = _gpt2(root / "empty-json")
    Tokenizer(models.BPE()).save(str(fast / "tokenizer.json"))
    (fast / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    for d in (gpt2, own, bert):
        assert not [p for p in d.iterdir() if "token" in p.name or "vocab" in p.name]
    return {"gpt2": gpt2, "layerlab": own, "bert": bert, "empty-files": files, "empty-json": fast}


def _fails(argv, monkeypatch, capsys) -> str:
    """Run the CLI as ``layerlab`` and ``python -m layerlab`` do (``cli.main``, in this process: quicker than a
    fresh interpreter); return its one stderr line after checking the exit status 2 and the empty stdout."""
    monkeypatch.setattr(sys, "argv", ["layerlab", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# every command that takes a model directory; each reads text, or (export) writes the tokenizer it lacks
COMMANDS = {
    "eval": ["eval", "{m}"],
    "sample": ["sample", "{m}", "--tokens", "4"],
    "analyze": ["analyze", "{m}", "--tokens", "64", "--no-progress", "--out", "{out}"],
    "prune": ["prune", "{m}", "--remove", "1", "--out", "{out}"],
    "quantize": ["quantize", "{m}", "--bits", "3", "--out", "{out}"],
    "convert-no-norm": ["convert", "{m}", "--to", "no-norm", "--steps", "2", "--out", "{out}"],
    "convert-data": ["convert", "{m}", "--to", "rmsnorm", "--data", "{text}", "--out", "{out}"],
    "convert-tokens": ["convert", "{m}", "--to", "rmsnorm", "--tokens", "64", "--out", "{out}"],
    "export": ["export", "{m}", "--out", "{out}"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_that_need_text_refuse_a_model_without_tokenizer(dirs, command, tmp_path, monkeypatch, capsys):
    model = dirs["layerlab" if command == "export" else "gpt2"]  # export takes layerlab models only
    text = tmp_path / "text.txt"
    text.write_text("some text to read " * 50)
    out = tmp_path / "out"
    argv = [a.format(m=model, out=out, text=text) for a in COMMANDS[command]]
    before = digest(model)
    line = _fails(argv, monkeypatch, capsys)
    assert line == f"error: {model} {MISSING}: copy them from the model it came from (only convert --to " \
                   "rmsnorm|crmsnorm, without --data, works without them)"
    assert not out.exists() and digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]  # no partial output either


def test_an_encoder_without_tokenizer_is_refused_too(dirs, tmp_path, monkeypatch, capsys):
    """transformers 5 gives a BERT directory without files a WordPiece of its five special tokens, which
    reads every word as [UNK]."""
    line = _fails(["analyze", dirs["bert"], "--tokens", "64", "--out", tmp_path / "r"], monkeypatch, capsys)
    assert line.startswith(f"error: {dirs['bert']} {MISSING}")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind, found", [("empty-files", "vocab.json + merges.txt hold"),
                                         ("empty-json", "tokenizer.json holds")])
def test_an_empty_tokenizer_is_named_as_such(dirs, kind, found, monkeypatch, capsys):
    line = _fails(["eval", dirs[kind]], monkeypatch, capsys)
    assert line.startswith(f"error: {dirs[kind]} has an empty tokenizer: {found} no token but special ones; "
                           f"expected {NAMES}")


def test_the_library_loads_it_without_a_tokenizer_only_when_asked(dirs):
    with pytest.raises(LayerlabError, match="has no tokenizer files; expected tokenizer.json"):
        load_model(dirs["gpt2"])
    model, tokenizer, v = load_model(dirs["gpt2"], need_tokenizer=False)
    assert tokenizer is None and v.num_layers == 2
    with pytest.raises(LayerlabError, match="^no tokenizer to read text with: a model directory holds it as "):
        lm_loss(model, tokenizer)
    assert load_model(dirs["empty-json"], need_tokenizer=False).tokenizer is None
    # a real tokenizer is kept: layerlab's byte tokenizer, saved beside the same weights
    path = save_model(GPT2LMHeadModel.from_pretrained(dirs["gpt2"]), dirs["gpt2"].parent / "with-tokenizer")
    assert load_model(path).tokenizer("ab").input_ids == [97, 98]


@pytest.mark.parametrize("kind, to", [("gpt2", "rmsnorm"), ("layerlab", "crmsnorm"), ("empty-files", "rmsnorm")])
def test_convert_needs_no_text_and_checks_equality_on_random_ids(dirs, kind, to, tmp_path):
    src, out = dirs[kind], tmp_path / "out"
    before = digest(src)
    r = CliRunner().invoke(app, ["convert", str(src), "--to", to, "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert digest(src) == before
    window = 64 if kind != "layerlab" else 16  # the context: shorter than the 256-token measuring window
    check = f"4 x {window} random token ids (seed 0)"
    assert f"max |logit difference| against the original on {check}: " in r.output
    assert "no loss measured: the input has no tokenizer to read text with" in r.output
    man = json.loads((out / "layerlab.json").read_text())
    assert man["checked_on"] == check and man["max_abs_logit_diff"] < 1e-4
    assert man["args"]["data"] is None and man["args"]["seed"] == 0
    assert "the input has no tokenizer: equality checked on random token ids, no loss measured" in man["decisions"]
    assert "loss" not in man["before"] and man["before"]["params"] > 0
    # the tokenizer files there were are copied byte for byte; none are made up
    written = digest(out)
    assert {n: written[n] for n in written if n not in ("config.json", "generation_config.json",
                                                        "model.safetensors", "layerlab.json")} == \
           {n: before[n] for n in ({"vocab.json", "merges.txt"} if kind == "empty-files" else ())}
    # independently: the written model reloaded from disk against the original, on other random ids
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    vocab = original.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (3, window), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        a, b = original(ids).logits, converted(ids).logits
    assert converted.cfg.norm == to and a.abs().max() > 0.1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0.0)
