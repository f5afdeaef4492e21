"""The offline capability probes (layerlab.probes), `eval --tasks`, convert's probes, and `eval --lm-eval`.

Every figure is checked against a computation the test makes itself: the items' answers by parsing the prompts,
the interval by solving Wilson's quadratic, the scores by a scripted oracle whose logits hold the right answer
and by plain greedy decoding and per-candidate log-likelihoods, one unpadded sequence at a time."""

import json
import math
import re
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, save_model, tiny_cfg
from typer.testing import CliRunner

import layerlab
from layerlab import probes
from layerlab.data import split_ids
from layerlab.errors import LayerlabError
from layerlab.registry import PROBES, probe_tasks
from layerlab.tokenizer import ByteTokenizer, train_bpe

TEXT = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list) "
        "or other iterable object. The while statement is used for repeated execution as long as an expression "
        "is true. A break statement executed in the first suite terminates the loop without executing the else "
        "clause's suite. ") * 3


def _bpe():
    return train_bpe([TEXT.encode(), b"0123456789 ()[]{} = >>> + abcdefghijklmnopqrstuvwxyz\n"], 300)


# ---------------------------------------------------------------- independent answers


def _add_answer(prompt: str) -> str:
    a, b = re.fullmatch(r">>> (\d+) \+ (\d+)\n", prompt).groups()
    assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999
    return str(int(a) + int(b)) + "\n"


def _brackets_answer(prompt: str) -> str:
    stack = []
    for ch in prompt:
        if ch in "([{":
            stack.append(ch)
        else:
            assert stack and "([{".index(stack.pop()) == ")]}".index(ch)  # a valid Dyck prefix
    assert stack
    return ")]}"["([{".index(stack[-1])]


def _copy_answer(prompt: str) -> str:
    first, second = prompt.split("\n")
    assert len(first) == 10 and set(first) <= set(string.ascii_lowercase) and second == first[:2]
    return first[2:]


def _recall_answer(prompt: str) -> str:
    *pairs, query = prompt.rstrip("\n").split("\n")
    table = dict(p.split(" = ") for p in pairs)
    assert len(table) == 6 and len(set(table.values())) == 6
    return table[query.removeprefix(">>> ")]


ANSWERS = {"add": _add_answer, "brackets": _brackets_answer, "copy": _copy_answer, "recall": _recall_answer}
CHOICES = {"add": (), "brackets": tuple(")]}"), "copy": (), "recall": tuple(string.digits)}


@pytest.mark.parametrize("name", ANSWERS)
def test_items_are_deterministic_from_the_seed_and_correct(name):
    items = probes.text_items(name, 300, seed=3)
    assert items == probes.text_items(name, 300, seed=3)
    assert items != probes.text_items(name, 300, seed=4)
    assert len({p for p, _, _ in items}) > 250  # not a handful of repeated items
    for prompt, answer, choices in items:
        assert answer == ANSWERS[name](prompt) and choices == CHOICES[name]
    if CHOICES[name]:  # every candidate is the right answer about equally often
        counts = [sum(a == c for _, a, _ in items) for c in CHOICES[name]]
        assert min(counts) > 300 / len(counts) / 2


def test_next_token_items_are_seeded_positions_of_the_held_out_text(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    tok = ByteTokenizer()
    stream = list(TEXT.encode()) + [tok.eos_id]  # the user's text is all of it, then eos
    items = PROBES["next_token"](tok, 40, 7, str(data), window=16)
    assert [i.context for i in items] == [i.context for i in PROBES["next_token"](tok, 40, 7, str(data), window=16)]
    positions = set()
    for it in items:
        seq = it.context + it.choices[0]
        assert 1 <= len(it.context) <= 15
        starts = [s for s in range(len(stream) - len(seq) + 1) if stream[s:s + len(seq)] == seq]
        assert starts  # a real slice of the text, predicting its next token
        positions.add(starts[0] + len(it.context))
    assert len(positions) > 30


def test_wilson_interval_against_the_quadratic_and_published_values():
    z = 1.959963984540054
    for k, n in [(8, 10), (0, 10), (10, 10), (37, 200), (1, 3)]:
        p = k / n  # Wilson's bounds are the roots of (p - q)^2 = z^2 q (1 - q) / n in q
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
        disc = math.sqrt(b * b - 4 * a * c)
        lo, hi = probes.wilson(k, n)
        assert lo == pytest.approx((-b - disc) / (2 * a), abs=1e-12)
        assert hi == pytest.approx((-b + disc) / (2 * a), abs=1e-12)
    assert probes.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # Newcombe (1998), Table I
    assert probes.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert probes.wilson(0, 0) == (0.0, 1.0)


def test_task_names_resolve_before_torch_with_one_line_errors():
    assert probe_tasks("all") == ["add", "brackets", "copy", "recall", "next_token"]
    assert probe_tasks("copy, add,copy") == ["copy", "add"]
    with pytest.raises(LayerlabError, match=r"^unknown probe 'ad'; valid: .*did you mean 'add'\?$"):
        probe_tasks("add,ad")
    for name in PROBES:  # each declared entry is what layerlab.probes registers
        assert PROBES[name] is getattr(probes, name)


# ---------------------------------------------------------------- scripted models


class Scripted(torch.nn.Module):
    """A stand-in causal LM: at each position, its logits put all the mass on ``table[prefix]`` (the prefix of
    ids up to and including that position), and are uniform where the prefix is not in the table."""

    def __init__(self, vocab: int, table: dict[tuple, int], context: int = 64):
        super().__init__()
        self.vocab, self.table = vocab, table
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        rows = input_ids.tolist()
        for b in range(B):
            for t in range(T):
                nxt = self.table.get(tuple(rows[b][:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 100.0
        return SimpleNamespace(logits=logits)


def _oracle_table(tok, name, n, seed, keep=lambda i: True, tokens=None):
    """prefix -> next id along prompt + the test's own answer, for the items ``keep`` selects (and only the
    answer's first ``tokens`` tokens, if given)."""
    table = {}
    for i, (prompt, _, _) in enumerate(probes.text_items(name, n, seed)):
        if keep(i):
            seq = [int(x) for x in tok.encode(prompt)]
            answer = [int(x) for x in tok.encode(ANSWERS[name](prompt))]
            for k, a in enumerate(answer[:tokens]):
                table[tuple(seq + answer[:k])] = a
    return table


@pytest.mark.parametrize("tok", [ByteTokenizer(), _bpe()], ids=["byte", "bpe"])
def test_an_oracle_scores_everything_and_a_uniform_model_scores_chance(tok):
    n, seed = 60, 5
    for name in ANSWERS:
        oracle = Scripted(tok.vocab_size, _oracle_table(tok, name, n, seed))
        r = probes.measure(oracle, tok, [name], seed=seed, n=n)[name]
        assert (r["correct"], r["n"], r["accuracy"]) == (n, n, 1.0), name

        uniform = probes.measure(Scripted(tok.vocab_size, {}), tok, [name], seed=seed, n=n)[name]
        texts = probes.text_items(name, n, seed)
        # ties go to the first candidate: a uniform model is right exactly where the answer comes first;
        # greedily it emits id 0 (no answer holds it), so it never completes one
        first = sum(a == c[0] for _, a, c in texts) if CHOICES[name] else 0
        assert uniform["correct"] == first, name
        lo, hi = uniform["ci95"]
        assert lo <= (1 / len(CHOICES[name]) if CHOICES[name] else 0.0) <= hi


def test_next_token_oracle_on_a_text_file(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    tok = ByteTokenizer()
    stream = [int(x) for x in split_ids(tok, str(data), "all")]
    window = 32
    table = {tuple(stream[max(0, p - window + 1):p]): stream[p] for p in range(1, len(stream))}
    r = probes.measure(Scripted(tok.vocab_size, table, context=window), tok, "next_token", n=50, data=str(data))
    assert (r["next_token"]["correct"], r["next_token"]["n"]) == (50, 50)
    assert r["next_token"]["slice"].startswith(f"{data} (all)")


def _greedy_decode(model, tok, prompt, answer, window):
    """Plain greedy decoding, one token at a time, as many tokens as the answer has."""
    ids = [int(x) for x in tok.encode(prompt)]
    want = [int(x) for x in tok.encode(answer)]
    out = []
    for _ in want:
        x = torch.tensor([(ids + out)[-window:]])
        out.append(int(model(input_ids=x).logits[0, -1].argmax()))
    return out == want


def _best_choice(model, tok, prompt, choices, window):
    """The candidate with the largest log-likelihood, each scored in its own unpadded forward."""
    ids = [int(x) for x in tok.encode(prompt)]
    scores = []
    for c in choices:
        cand = [int(x) for x in tok.encode(c)]
        ctx = ids[-(window - len(cand)):]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ctx + cand])).logits[0].float(), -1)
        scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cand)))
    return choices[int(np.argmax(scores))]


def test_batched_scores_equal_decoding_item_by_item():
    """Half an oracle (it knows the even items) for the greedy probes; a random layerlab model for the choice
    probes: the batched, padded, teacher-forced scores equal greedy decoding and per-candidate likelihoods."""
    tok, n, seed = ByteTokenizer(), 24, 1
    for name in ("add", "copy"):
        half = Scripted(tok.vocab_size, _oracle_table(tok, name, n, seed, keep=lambda i: i % 2 == 0))
        want = [_greedy_decode(half, tok, p, a, 64) for p, a, _ in probes.text_items(name, n, seed)]
        assert want == [i % 2 == 0 for i in range(n)]
        assert probes.score(half, PROBES[name](tok, n, seed), "greedy", window=64, batch=7)[0] == want
        assert probes.measure(half, tok, name, seed=seed, n=n)[name]["correct"] == sum(want)
        first = Scripted(tok.vocab_size, _oracle_table(tok, name, n, seed, tokens=1))  # knows each first token
        assert not any(_greedy_decode(first, tok, p, a, 64) for p, a, _ in probes.text_items(name, n, seed))
        assert probes.measure(first, tok, name, seed=seed, n=n)[name]["correct"] == 0
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(vocab_size=257, context=64, layers=2)), 0.5).eval()
    for name in ("brackets", "recall"):
        want = [_best_choice(model, tok, p, c, 64) == a for p, a, c in probes.text_items(name, n, seed)]
        assert probes.score(model, PROBES[name](tok, n, seed), "choice", window=64, batch=5)[0] == want
        got = probes.measure(model, tok, name, seed=seed, n=n)[name]
        assert got["correct"] == sum(want) and 0 < sum(want) < n  # a model with preferences, right on some items
    # a window shorter than the prompts: both keep the prompt's last tokens; item by item
    want = [_best_choice(model, tok, p, c, 16) == a for p, a, c in probes.text_items("recall", n, seed)]
    right, truncated = probes.score(model, PROBES["recall"](tok, n, seed), "choice", window=16, batch=5)
    assert right == want and truncated == n
    model.config.max_position_embeddings = 16
    assert probes.measure(model, tok, "recall", seed=seed, n=n)["recall"]["correct"] == sum(want)


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(vocab_size=257, context=64, layers=2)), 0.5).eval()
    return save_model(model, tmp_path_factory.mktemp("probes") / "m")


def test_eval_cli_prints_the_probe_table_next_to_perplexity(model_dir):
    from layerlab.adapters import load_model
    from layerlab.cli import app

    r = CliRunner().invoke(app, ["eval", str(model_dir), "--tokens", "512", "--tasks", "recall,copy",
                                 "--probe-items", "20", "--seed", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "perplexity" in lines[0] and lines[1].startswith("probes (seed 2;")
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert list(rows) == ["recall", "copy"]
    model, tok, _ = load_model(model_dir)
    tok = ByteTokenizer()
    texts = probes.text_items("recall", 20, 2)
    k = sum(_best_choice(model, tok, p, c, 64) == a for p, a, c in texts)
    lo, hi = probes.wilson(k, 20)
    assert rows["recall"][1:4] == [f"{k / 20:.3f}", f"[{lo:.3f},", f"{hi:.3f}]"] and rows["recall"][4] == "20"
    bad = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "add,brackts"])
    assert bad.exit_code != 0 and "did you mean 'brackets'" in str(bad.exception)


def _choices_right(model, tok, name: str, n: int, seed: int) -> int:
    """How many of a choice probe's ``n`` items (from ``seed``) ``model`` answers right, recounted one by one."""
    return sum(_best_choice(model, tok, p, c, 64) == a for p, a, c in probes.text_items(name, n, seed))


def test_convert_manifest_holds_probes_before_and_after(model_dir, tmp_path):
    from layerlab.adapters import load_model
    from layerlab.compress import convert, convert_lines

    out = tmp_path / "rms"
    record = convert(model_dir, to="rmsnorm", out=out, tokens=256, tasks="brackets,recall", probe_items=30,
                     probe_seed=4)
    manifest = json.loads((out / "layerlab.json").read_text())
    tok = ByteTokenizer()
    for stage, path in (("before", model_dir), ("after", out)):
        model = load_model(path)[0]
        for name in ("brackets", "recall"):
            got = manifest[stage]["probes"][name]
            want = _choices_right(model, tok, name, 30, 4)
            assert (got["correct"], got["n"], got["seed"]) == (want, 30, 4), (stage, name)
    text = "\n".join(convert_lines(record))
    assert "probes (accuracy [Wilson 95% interval], n 30 each, seed 4)" in text and "recall" in text
    plain = convert(model_dir, to="rmsnorm", out=tmp_path / "plain", tokens=256)
    assert "probes" not in plain["before"] and "probes" not in "\n".join(convert_lines(plain))


@pytest.mark.parametrize("offload", [False, True], ids=["in-memory", "offload"])
def test_prune_cli_prints_and_records_probes_before_and_after(model_dir, tmp_path, offload):
    """``layerlab prune --tasks``: each stage's manifest row holds the probes, recounted here by brute force on
    the input and on the pruned output; the table prints them; a bad task name is one line before any work."""
    from typer.testing import CliRunner

    from layerlab.adapters import load_model
    from layerlab.cli import app

    out = tmp_path / "pruned"
    args = ["prune", str(model_dir), "--remove", "1", "--tokens", "256", "--tasks", "brackets,recall",
            "--probe-items", "30", "--probe-seed", "4", "--out", str(out), "--offload" if offload else "--no-offload"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "probes (accuracy [Wilson 95% interval], n 30 each, seed 4)" in r.output and "recall" in r.output
    manifest = json.loads((out / "layerlab.json").read_text())
    tok = ByteTokenizer()
    for stage, path in (("before", model_dir), ("pruned", out)):
        model = load_model(path)[0]
        for name in ("brackets", "recall"):
            got = manifest[stage]["probes"][name]
            want = _choices_right(model, tok, name, 30, 4)
            assert (got["correct"], got["n"], got["seed"]) == (want, 30, 4), (stage, name)
    bad = CliRunner().invoke(app, [*args[:-3], "--tasks", "brackts", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "brackts" in str(bad.exception) and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- lm-evaluation-harness


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
DOCS = ["The for statement is used to iterate over a sequence.", "A yield statement is a yield expression."]


def test_lm_eval_rolling_perplexities_equal_a_hand_computed_likelihood(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra layerlab[lm-eval]")
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # restored after the test; run_lm_eval sets them to 1
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tasks / "tiny.yaml").write_text(TASK_YAML.format(name="tinydocs", data=tmp_path / "docs.jsonl"))

    from layerlab.adapters import load_model
    from layerlab.cli import app
    from layerlab.evaluate import run_lm_eval

    model, tok, _ = load_model(model_dir)
    row = run_lm_eval(model, tok, "tinydocs", include=tasks)["tinydocs"]
    assert datasets.config.HF_DATASETS_OFFLINE
    ll, n_tokens = 0.0, 0  # each document after the end-of-text token, in one window: every token scored
    for d in DOCS:
        ids = [256, *d.encode()]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        ll += sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        n_tokens += len(ids) - 1
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert row["tokens"] == n_tokens == n_bytes  # bytes are the tokens here
    assert row["token_perplexity"] == pytest.approx(math.exp(-ll / n_tokens), rel=1e-4)
    assert row["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert row["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert row["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)

    r = CliRunner().invoke(app, ["eval", str(model_dir), "--tokens", "256", "--lm-eval", "tinydocs",
                                 "--lm-eval-include", str(tasks)])
    assert r.exit_code == 0, r.output
    shown = re.search(r"lm-eval tinydocs: token perplexity (\S+) \(([\d,]+) tokens\), word perplexity (\S+), "
                      r"byte perplexity (\S+), (\S+) bits/byte", r.output)
    assert shown is not None, r.output
    token_ppl, count, word_ppl, byte_ppl, bpb = shown.groups()
    assert int(count.replace(",", "")) == n_tokens and float(bpb) == pytest.approx(-ll / n_bytes / math.log(2), 1e-3)
    assert float(token_ppl) == pytest.approx(math.exp(-ll / n_tokens), rel=1e-3)
    assert float(word_ppl.rstrip(",")) == pytest.approx(math.exp(-ll / words), rel=1e-3)
    assert float(byte_ppl) == pytest.approx(math.exp(-ll / n_bytes), rel=1e-3)
    with pytest.raises(LayerlabError, match=r"^unknown lm-eval task 'tinydoc'; did you mean 'tinydocs'\?"):
        run_lm_eval(model, tok, "tinydoc", include=tasks)


def test_lm_eval_missing_is_one_line_naming_the_extra(model_dir, monkeypatch):
    import sys

    from layerlab.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    r = CliRunner().invoke(app, ["eval", str(model_dir), "--tokens", "64", "--lm-eval", "wikitext"])
    assert r.exit_code != 0
    msg = str(r.exception)
    assert "\n" not in msg and "layerlab[lm-eval]" in msg and "pip install lm-eval" in msg


def test_quantize_cli_probes_the_input_and_the_chosen_allocation(model_dir, tmp_path):
    """``layerlab quantize --tasks``: the input's row and the chosen allocation's hold the probes (the baselines
    are not probed); the written model's probes, recounted by brute force, equal the chosen row's."""
    from layerlab.adapters import load_model
    from layerlab.cli import app

    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(model_dir), "--bits", "4", "--widths", "4,8", "--group", "32",
                                 "--tokens", "256", "--calibration-tokens", "256", "--tasks", "recall",
                                 "--probe-items", "20", "--probe-seed", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "probes (accuracy [Wilson 95% interval], n 20 each, seed 1)" in r.output
    manifest = json.loads((out / "layerlab.json").read_text())
    runs = manifest["runs"]
    assert "probes" in runs["original"] and "probes" in runs["lim"]
    assert all("probes" not in row for name, row in runs.items() if name not in ("original", "lim"))
    tok = ByteTokenizer()
    for row, path in ((runs["original"], model_dir), (runs["lim"], out)):
        model = load_model(path)[0]
        want = _choices_right(model, tok, "recall", 20, 1)
        assert row["probes"]["recall"]["correct"] == want
