"""Offline capability probes: small tasks generated from a seed, scored on a model, with no download.

Perplexity averages over every token, so a model can lose a skill that few tokens exercise while its perplexity
barely moves; depth pruning, for one, can wipe out arithmetic and bracket matching that way (arXiv 2602.01997).
Each probe here generates ``n`` items from ``seed`` and scores them one of two ways:

- ``greedy``: the item is right when the model's greedy continuation of the prompt is exactly the answer. Scored
  in one teacher-forced forward: greedy decoding yields the answer's tokens exactly when, at each of its positions,
  the argmax of the logits (given the prompt and the answer's earlier tokens) is the answer's next token. Used where
  the answer is open-ended (a sum, a copied string): any other output is wrong, and chance is ~0.
- ``choice``: the item is right when the answer has the largest log-likelihood among a fixed set of candidates
  (the lm-evaluation-harness ``multiple_choice`` rule, unnormalised). Used where the answer is one of a few
  equally long strings (a closing bracket, a digit), so chance is 1 / the number of candidates; ties go to the
  first candidate, so a model with uniform logits scores the share of items whose answer comes first.

The probes (:data:`layerlab.registry.PROBES` names them before torch loads):

- ``add``: ``>>> 482 + 91`` (numbers of 2 or 3 digits) then a newline; the answer is the sum and a newline
  (greedy). Written as the Python prompt of the docs in the embedded corpus.
- ``brackets``: a random prefix of a balanced sequence over ``()[]{}``, with at least one bracket open; the
  answer is the closer of the innermost open one, among ``)``, ``]``, ``}`` (choice, chance 1/3). Next-bracket
  prediction on a Dyck language needs the stack, not the last character: closed pairs come before the open ones.
- ``copy``: a random string of 10 lowercase letters, a newline, and its first 2 letters; the answer is the rest of
  the string (greedy). With random letters only the earlier copy predicts them: an induction test (Olsson et al.,
  2022, "In-context Learning and Induction Heads").
- ``recall``: six ``key = digit`` lines with distinct two-letter keys and distinct digits, then ``>>> key`` and a
  newline; the answer is that key's digit, among the ten digits (choice, chance 1/10). Key-value recall from
  context (the associative-recall task of Ba et al., 2016, and of Arora et al., 2023, "Zoology").
- ``next_token``: ``n`` positions of the held-out text (the validation split that :func:`layerlab.evaluate.lm_loss`
  reads), drawn without replacement from ``seed``; each is predicted greedily from up to one measuring window of
  the tokens before it. The positions share text, so their outcomes are not quite independent and the interval
  is somewhat too narrow. It has no chance level (``chance`` None): predicting the most frequent token alone
  (a space: a quarter of the embedded validation split's bytes) is right that often.

Text is tokenized through :func:`layerlab.tokenizer.stream_tokenizer`, so layerlab's byte tokenizer and a Hugging
Face BPE are handled alike: the prompt and each candidate are encoded separately and joined (as lm-eval joins a
context and its continuation). For bytes this is the text's own encoding; a BPE may merge across the join when
the text is encoded whole (``((`` + ``)``), so its candidate then is a valid but not always canonical split.
A prompt longer than the model's window (:func:`layerlab.data.window_length`) keeps its last tokens; the result
counts such items as ``truncated``.

Every result holds ``accuracy``, its Wilson 95% interval ``ci95`` (:func:`wilson`), ``correct``, ``n``, ``seed``,
``scoring`` and ``chance``. :func:`measure` is the one call every command makes; :func:`probe_lines` and
:func:`stage_lines` lay the results out.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import view
from .data import default_split, describe_slice, split_ids, window_length
from .errors import LayerlabError
from .registry import PROBE_ITEMS, PROBES, probe_tasks
from .tokenizer import stream_tokenizer

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
CLOSERS = {"(": ")", "[": "]", "{": "}"}
BATCH = 32  # sequences per forward


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson, 1927, "Probable inference, the law of
    succession, and statistical inference", JASA 22:209-212): the p whose normal test at ``z`` accepts
    ``correct``/``n``. Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0 or n.
    Returns (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Item:
    """One probe item in token ids: the ``context``, the candidate continuations ``choices`` (one for a greedy
    probe) and the index of the right one, with the text it came from (``prompt``, ``answer``)."""

    context: list[int]
    choices: list[list[int]]
    answer: int
    prompt: str = ""
    text_answer: str = ""


# ---------------------------------------------------------------- the probes


def _probe(name: str, scoring: str, chance: float | None) -> Callable:
    """Register a probe ``(tokenizer, n, seed, data) -> list[Item]`` under ``name`` (declared in
    :data:`PROBES`), with how it is scored and the accuracy of chance (None where there is no such level)."""
    def wrap(fn):
        fn.scoring, fn.chance = scoring, chance
        return PROBES.register(name, fn)

    return wrap


def _rng(name: str, seed: int) -> random.Random:
    """Each probe's own generator: the items of one probe do not depend on which others run."""
    return random.Random(f"{name}:{seed}")


def add_text(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """(prompt, answer, choices) of one ``add`` item: two numbers of 2 or 3 digits each."""
    a, b = (rng.randrange(10 ** (d - 1), 10 ** d) for d in (rng.randint(2, 3), rng.randint(2, 3)))
    return f">>> {a} + {b}\n", f"{a + b}\n", ()


def brackets_text(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """(prompt, answer, choices) of one ``brackets`` item: 4 to 12 random steps of a stack machine, each opening a
    random bracket or closing the innermost open one, ending with at least one bracket open."""
    out, stack = [], []
    for _ in range(rng.randint(4, 12)):
        if stack and rng.random() < 0.45:
            out.append(CLOSERS[stack.pop()])
        else:
            stack.append(rng.choice("([{"))
            out.append(stack[-1])
    if not stack:
        stack.append(rng.choice("([{"))
        out.append(stack[-1])
    return "".join(out), CLOSERS[stack[-1]], tuple(CLOSERS.values())


def copy_text(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """(prompt, answer, choices) of one ``copy`` item: 10 random lowercase letters, repeated after a newline."""
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(10))
    return f"{s}\n{s[:2]}", s[2:], ()


def recall_text(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """(prompt, answer, choices) of one ``recall`` item: six distinct two-letter keys bound to distinct digits."""
    keys = set()
    while len(keys) < 6:
        keys.add("".join(rng.choice(string.ascii_lowercase) for _ in range(2)))
    keys = sorted(keys)
    rng.shuffle(keys)
    values = rng.sample(string.digits, 6)
    query = rng.randrange(6)
    lines = "".join(f"{k} = {v}\n" for k, v in zip(keys, values, strict=True))
    return f"{lines}>>> {keys[query]}\n", values[query], tuple(string.digits)


TEXT_PROBES = {"add": add_text, "brackets": brackets_text, "copy": copy_text, "recall": recall_text}


def text_items(name: str, n: int, seed: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """The ``n`` (prompt, answer, choices) texts of a text probe, the same for the same ``seed``."""
    rng = _rng(name, seed)
    return [TEXT_PROBES[name](rng) for _ in range(n)]


def _encode(tokenizer, texts: Iterable[tuple[str, str, tuple[str, ...]]]) -> list[Item]:
    tok = stream_tokenizer(tokenizer)
    enc = lambda s: [int(i) for i in tok.encode(s)]  # noqa: E731
    items = []
    for prompt, answer, choices in texts:
        options = list(choices) or [answer]
        items.append(Item(enc(prompt), [enc(c) for c in options], options.index(answer), prompt, answer))
    return items


@_probe("add", "greedy", 0.0)
def add(tokenizer, n: int, seed: int, data=None) -> list[Item]:
    """Multi-digit addition, ``>>> a + b`` then the sum (greedy)."""
    return _encode(tokenizer, text_items("add", n, seed))


@_probe("brackets", "choice", 1 / 3)
def brackets(tokenizer, n: int, seed: int, data=None) -> list[Item]:
    """The closer of the innermost open bracket of a random Dyck prefix (choice among ``)]}``)."""
    return _encode(tokenizer, text_items("brackets", n, seed))


@_probe("copy", "greedy", 0.0)
def copy(tokenizer, n: int, seed: int, data=None) -> list[Item]:
    """Continue the second copy of a random string of letters (greedy; induction)."""
    return _encode(tokenizer, text_items("copy", n, seed))


@_probe("recall", "choice", 0.1)
def recall(tokenizer, n: int, seed: int, data=None) -> list[Item]:
    """The digit a key was bound to earlier in the context (choice among the ten digits)."""
    return _encode(tokenizer, text_items("recall", n, seed))


@_probe("next_token", "greedy", None)  # no chance level: the most frequent token alone scores well
def next_token(tokenizer, n: int, seed: int, data=None, window: int = 256) -> list[Item]:
    """``n`` seeded positions of the held-out text, each with up to ``window - 1`` tokens before it (greedy)."""
    stream = split_ids(tokenizer, data, default_split(data))
    if len(stream) < 2:
        raise LayerlabError("data too short for next_token: the split holds fewer than 2 tokens")
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(np.arange(1, len(stream)), size=min(n, len(stream) - 1), replace=False))
    return [Item([int(i) for i in stream[max(0, p - window + 1):p]], [[int(stream[p])]], 0) for p in positions]


# ---------------------------------------------------------------- scoring


def _forward(model, rows: list[list[int]], pad: int) -> torch.Tensor:
    """(B, T, V) float logits of right-padded ``rows``, on the input embedding's device (a model streamed block by
    block, :mod:`layerlab.offload`, keeps most of its parameters on ``meta``)."""
    embed = getattr(model, "get_input_embeddings", None)
    device = embed().weight.device if embed is not None else next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _fit(item: Item, window: int) -> tuple[list[int], bool]:
    """The item's context cut to its last tokens so that it and its longest choice fit in ``window``."""
    room = window - max(len(c) for c in item.choices)
    if room < 1:
        raise LayerlabError(f"a probe answer of {window - room} tokens does not fit the model's {window}-token window")
    return item.context[-room:], len(item.context) > room


@torch.no_grad()
def score(model, items: list[Item], scoring: str, window: int, pad: int = 0,
          batch: int = BATCH) -> tuple[list[bool], int]:
    """(whether each item is right, how many were truncated): ``greedy``, every answer token is the argmax given
    what precedes it; ``choice``, the right candidate has the largest summed log-likelihood (ties: the first)."""
    rows, owners = [], []  # one row per (item, choice), or one per item where every choice is one token
    truncated = 0
    for i, item in enumerate(items):
        ctx, cut = _fit(item, window)
        truncated += cut
        one = all(len(c) == 1 for c in item.choices)
        mine = [(ctx, None)] if one else [(ctx, c) for c in item.choices]
        rows.extend(mine)
        owners.extend([i] * len(mine))
    # per item, the score of each choice: greedy, whether all its tokens are the argmax; choice, its log-likelihood
    scores: list[list[float]] = [[] for _ in items]
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        logits = _forward(model, [ctx + (c or []) for ctx, c in chunk], pad)
        for (ctx, c), i, lg in zip(chunk, owners[start:start + batch], logits, strict=True):
            at = len(ctx) - 1  # the logits that predict the first continuation token
            if c is None:  # every choice one token: all read from the last context position
                logp = F.log_softmax(lg[at], -1)
                choices = [cc[0] for cc in items[i].choices]
                scores[i] = [float(logp[t]) if scoring == "choice" else float(lg[at].argmax() == t) for t in choices]
                continue
            pred = lg[at:at + len(c)]  # (len(c), V)
            target = torch.tensor(c, device=pred.device)
            if scoring == "choice":
                scores[i].append(float(F.log_softmax(pred, -1).gather(1, target[:, None]).sum()))
            else:
                scores[i].append(float(bool((pred.argmax(-1) == target).all())))
    if scoring == "greedy":
        return [bool(s[item.answer]) for item, s in zip(items, scores, strict=True)], truncated
    return [max(range(len(s)), key=lambda k: (s[k], -k)) == item.answer
            for item, s in zip(items, scores, strict=True)], truncated


def measure(model, tokenizer, tasks: str | Iterable[str] | None = "all", *, seed: int = 0, n: int = PROBE_ITEMS,
            data: str | Path | None = None) -> dict[str, dict]:
    """Each probe of ``tasks`` (names, a comma-separated string, or ``"all"``) on ``model``: ``{name: {accuracy,
    ci95, correct, n, seed, scoring, chance, truncated}}``, ``n`` items each from ``seed``. ``next_token`` reads
    the held-out text of ``data`` (default: the embedded validation split) and names it in ``slice``."""
    names = probe_tasks(tasks) if isinstance(tasks, str) or tasks is None else [PROBES.check(t) for t in tasks]
    if n < 1:
        raise LayerlabError(f"--probe-items must be at least 1, got {n}")
    if getattr(model.config, "model_type", None) is not None:  # a real model, not a scripted stand-in
        v = view(model)
        if not v.causal or not v.has_lm_head:
            raise LayerlabError(f"{v.arch_name} models have no next-token predictions to probe")
    window = window_length(model.config)
    tok = stream_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name in names:
            probe = PROBES[name]
            kw = {"window": window} if name == "next_token" else {}
            items = probe(tok, n, seed, data, **kw)
            right, truncated = score(model, items, probe.scoring, window, pad=tok.eos_id)
            correct = sum(right)
            lo, hi = wilson(correct, len(items))
            out[name] = {"accuracy": correct / len(items), "ci95": [lo, hi], "correct": correct, "n": len(items),
                         "seed": seed, "scoring": probe.scoring, "chance": probe.chance, "truncated": truncated}
            if name == "next_token":
                available = len(split_ids(tok, data, default_split(data)))
                out[name]["slice"] = describe_slice(data, default_split(data), available, available)
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- tables


def _cell(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def probe_lines(results: dict[str, dict]) -> list[str]:
    """One model's probes: probe, accuracy, Wilson 95% interval, n, chance, scoring."""
    if not results:
        return []
    seed = next(iter(results.values()))["seed"]
    lines = [f"probes (seed {seed}; accuracy, Wilson 95% interval):",
             f"  {'probe':12s}{'accuracy':>10s}{'95% CI':>18s}{'n':>7s}{'chance':>8s}  scoring"]
    for name, r in results.items():
        lo, hi = r["ci95"]
        chance = "-" if r["chance"] is None else f"{r['chance']:.3f}"
        lines.append(f"  {name:12s}{r['accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>18s}{r['n']:>7d}"
                     f"{chance:>8s}  {r['scoring']}")
    return lines


def probe_spec(tasks: str | Iterable[str] | None, n: int = PROBE_ITEMS, seed: int = 0) -> dict | None:
    """What a compressor measures at each stage: ``{"tasks": names, "n": n, "seed": seed}``, or None without
    ``tasks``. Unknown names and ``n`` < 1 are one-line errors, raised before any model loads."""
    if not tasks:
        return None
    names = probe_tasks(tasks) if isinstance(tasks, str) else [PROBES.check(t) for t in tasks]
    if n < 1:
        raise LayerlabError(f"--probe-items must be at least 1, got {n}")
    return {"tasks": names, "n": n, "seed": seed}


def measure_spec(model, tokenizer, spec: dict, data: str | Path | None = None) -> dict[str, dict]:
    """:func:`measure` of a compressor's stage, as :func:`probe_spec` describes it (its tasks, items and seed)."""
    return measure(model, tokenizer, spec["tasks"], seed=spec["seed"], n=spec["n"], data=data)


def stage_lines(stages: dict[str, dict]) -> list[str]:
    """The before/after probe table of a compressor: one row per probe, one column per stage whose row holds
    ``probes`` (accuracy [Wilson 95% interval]); nothing when no stage measured them."""
    stages = {name: row["probes"] for name, row in stages.items() if row.get("probes")}
    if not stages:
        return []
    names = list(next(iter(stages.values())))
    first = next(iter(next(iter(stages.values())).values()))
    lines = [f"probes (accuracy [Wilson 95% interval], n {first['n']} each, seed {first['seed']}):",
             f"  {'probe':12s}" + "".join(f"{s:>26s}" for s in stages)]
    for name in names:
        lines.append(f"  {name:12s}" + "".join(f"{_cell(p[name]) if name in p else '-':>26s}" for p in stages.values()))
    return lines
