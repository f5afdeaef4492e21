"""Language-model loss, perplexity and bits per byte of a model on one named slice of text.

One definition serves every command that reports a loss (``train``'s final figure, ``eval``, and the
before/after tables of ``prune``, ``quantize`` and ``convert``): the text is a split of the token stream
that training sees (:func:`layerlab.data.split_ids`), cut into consecutive windows of
``layerlab.data.DEFAULT_SEQ_LEN`` tokens (or the context, if shorter), each predicting its next token; by default the
whole validation split, which takes seconds for the models layerlab trains on a CPU. Every result
carries ``slice``, the name of the text it was measured on, and the commands print it.

``eval`` adds, on request, the offline capability probes (:mod:`layerlab.probes`, ``--tasks``) and
lm-evaluation-harness tasks run offline on the loaded model (:func:`run_lm_eval`, ``--lm-eval``, the optional
``lm-eval`` extra).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import load_model, view
from .data import batches, default_split, describe_slice, split_ids, stream_tokenizer, window_length
from .errors import LayerlabError, check_loss_tokens, close_match
from .registry import PROBE_ITEMS


def masked_loss_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of predictions) over the real tokens of a (B, T) batch."""
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum")
    return float(ce), int(valid.sum())


@torch.no_grad()
def lm_loss(model, tokenizer, data: str | Path | None = None, tokens: int | None = None, split: str = "validation",
            seq_len: int | None = None, batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy (nats/token) over the first ``tokens`` tokens of ``split`` of ``data``
    (default: all of it; every token after the first is predicted), with perplexity, bits per byte, and
    ``slice``, the text's name. ``tokens`` in the result counts the tokens read, ``predictions`` the scored."""
    v = view(model)
    if not v.causal or not v.has_lm_head:
        raise LayerlabError(f"{v.arch_name} models have no language-model loss to evaluate")
    check_loss_tokens(tokens)
    tokenizer = stream_tokenizer(tokenizer)  # once: a transformers tokenizer is copied to build it
    stream = split_ids(tokenizer, data, split)
    available = len(stream)
    if available < 2:
        raise LayerlabError(f"data too short: the {split} split holds fewer than 2 tokens")
    used = available if tokens is None else min(tokens, available)
    n = used - 1  # predictions
    ids = torch.from_numpy(np.asarray(stream[:used], dtype=np.int64))
    seq_len = window_length(model.config, seq_len=seq_len)
    device = next(model.parameters()).device
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]  # whole windows go in batches, a short last one alone
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in starts[len(full):]]
    total = 0.0
    for group in groups:
        width = min(seq_len, n - group[0])
        x = torch.stack([ids[s:s + width] for s in group]).to(device)  # (B, T)
        y = torch.stack([ids[s + 1:s + width + 1] for s in group]).to(device)
        logits = v.forward(x, torch.ones_like(x)).logits  # (B, T, V)
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum"))
    loss = total / n
    text = tokenizer.decode(ids[1:].numpy())  # the predicted tokens' text
    n_bytes = max(len(text.encode("utf-8")), 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": loss / math.log(2) * n / n_bytes,
            "tokens": used, "predictions": n, "slice": describe_slice(data, split, used, available)}


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 mean of ``hidden`` (B, T, C) over the real tokens of each row: a sentence embedding (the
    pooling of sentence-transformers' MiniLM)."""
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def embedding_similarity(model, tokenizer, data: str | Path | None = None, tokens: int | None = None,
                         split: str = "validation", reference: torch.Tensor | None = None,
                         batch_size: int = 8) -> tuple[dict, torch.Tensor]:
    """An encoder's counterpart of :func:`lm_loss` in the compressors' tables, which has no language-model loss:
    how close its sentence embeddings stay to the input model's.

    The first ``tokens`` tokens (default all) of ``split`` of ``data`` are read in windows as ``analyze`` reads
    an encoder's ([CLS] ... [SEP], :data:`~layerlab.data.ENCODER_SEQ_LEN` tokens); each window's embedding is
    the mean of the last hidden state over its tokens (:func:`mean_pooled`). ``embedding_cosine`` is the mean
    over windows of the cosine between this model's embedding and ``reference``'s row for the same window (the
    input model's, from an earlier call), 1.0 without a reference. Returns the row and the (windows, C) float32
    embeddings on the CPU, the reference for later calls."""
    v = view(model)
    if v.causal:
        raise LayerlabError("embedding_similarity measures encoders; a causal LM is measured by lm_loss")
    check_loss_tokens(tokens)
    stream = split_ids(tokenizer, data, split)
    available = len(stream)
    used = available if tokens is None else min(tokens, available)
    if used < 2:
        raise LayerlabError(f"data too short: the {split} split holds fewer than 2 tokens")
    device = next(model.parameters()).device
    pooled = []
    for ids, mask in batches(tokenizer, stream[:used].tolist(), used, window_length(model.config, False),
                             batch_size, causal=False):
        ids, mask = ids.to(device), mask.to(device)
        pooled.append(mean_pooled(v.forward(ids, mask).last_hidden_state, mask).cpu())
    emb = torch.cat(pooled)
    if reference is not None and reference.shape != emb.shape:
        raise LayerlabError(f"embedding_similarity: the reference holds {tuple(reference.shape)} embeddings, "
                            f"this model gives {tuple(emb.shape)} on the same text")
    cos = 1.0 if reference is None else float(F.cosine_similarity(emb.double(), reference.double(), dim=-1).mean())
    return {"embedding_cosine": cos, "tokens": used, "windows": int(emb.shape[0]),
            "slice": describe_slice(data, split, used, available)}, emb


LM_EVAL_EXTRA = "pip install 'layerlab[lm-eval]' (or: pip install lm-eval)"
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _lm_eval_task_names(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise LayerlabError("--lm-eval needs task names, comma-separated (e.g. --lm-eval wikitext)")
    return names


def run_lm_eval(model, tokenizer, tasks: str | list[str], include: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict[str, dict]:
    """lm-evaluation-harness (Gao et al., EleutherAI, github.com/EleutherAI/lm-evaluation-harness) on the
    already loaded ``model``: its ``HFLM`` wraps the model object and ``tokenizer`` (no hub name, nothing loaded
    again), ``simple_evaluate`` runs ``tasks`` (names; task YAML files under ``include`` come first), offline:
    ``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set for this process, so a task
    reads local files (a YAML over a local jsonl, ``dataset_path: json``) or the datasets cache, and never the
    network. ``limit``: the first documents of each task only.

    Returns ``{task: {metric: value}}``, lm-eval's own metrics (``acc``, ...; its ``,none`` filter suffix
    dropped). A ``loglikelihood_rolling`` task also gets ``tokens`` and ``token_perplexity``: lm-eval's
    ``word_perplexity`` is exp(-LL / words), words being the whitespace-separated pieces of each document;
    ``byte_perplexity`` is exp(-LL / UTF-8 bytes) and ``bits_per_byte`` -LL / bytes / ln 2; ``token_perplexity``
    is exp(-LL / tokens), the per-token perplexity that layerlab's own ``eval`` reports, LL being the summed
    log-likelihood lm-eval measured (each document scored in rolling windows after its prefix token)."""
    for name in OFFLINE_ENV:  # before lm_eval imports datasets, which reads them once
        os.environ[name] = "1"
    try:
        import datasets
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LayerlabError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {LM_EVAL_EXTRA}") \
            from None
    datasets.config.HF_DATASETS_OFFLINE = True  # in case datasets was imported before the variables were set
    names = _lm_eval_task_names(tasks) if isinstance(tasks, str) else list(tasks)
    if include is not None and not Path(include).is_dir():
        raise LayerlabError(f"--lm-eval-include {include} is not a directory of task YAML files")
    # lm-eval's own ~15,000 task files take seconds to index: only when a name is not under ``include``
    manager = TaskManager(include_path=str(include), include_defaults=False) if include is not None else None
    if manager is None or any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=str(include) if include is not None else None)
    for name in names:
        if name not in manager.all_tasks:  # thousands of names: the closest, not the list
            close = close_match(name, manager.all_tasks)
            hint = f"did you mean {close!r}? " if close else ""
            raise LayerlabError(f"unknown lm-eval task {name!r}; {hint}give a task's YAML directory with "
                                "--lm-eval-include, or see `lm-eval ls tasks`")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=True,
                                  bootstrap_iters=0)
    except Exception as e:  # noqa: BLE001  (a missing dataset offline surfaces as many exception types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayerlabError(f"lm-eval could not run {','.join(names)} offline: {first}") from None
    out: dict[str, dict] = {}
    for task, metrics in res["results"].items():
        row = {k.removesuffix(",none"): v for k, v in metrics.items()
               if isinstance(v, int | float) and "_stderr" not in k and k != "sample_len"}
        samples = res.get("samples", {}).get(task, [])
        if "word_perplexity" in row and samples:  # rolling: LL summed over documents, tokens as HFLM encodes them
            ll = sum(float(np.asarray(s["filtered_resps"]).reshape(-1)[0]) for s in samples)
            n = sum(len(lm.tok_encode(s["target"])) for s in samples)
            row.update(tokens=n, loglikelihood=ll, token_perplexity=math.exp(min(-ll / max(n, 1), 700)))
        out[task] = row
    return out


def lm_eval_lines(results: dict[str, dict]) -> list[str]:
    """What ``eval --lm-eval`` prints: one line per task, the perplexities named by what they divide by."""
    def ppl(x: float) -> str:
        return f"{x:.2f}" if x < 1e6 else f"{x:.3e}"

    lines = []
    for task, row in results.items():
        if "word_perplexity" in row:
            tok = f"token perplexity {ppl(row['token_perplexity'])} ({row['tokens']:,} tokens), " \
                if "token_perplexity" in row else ""
            lines.append(f"lm-eval {task}: {tok}word perplexity {ppl(row['word_perplexity'])}, byte perplexity "
                         f"{row['byte_perplexity']:.4f}, {row['bits_per_byte']:.4f} bits/byte")
        else:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
            lines.append(f"lm-eval {task}: {shown}")
    return lines


def evaluate(model_dir: str | Path, data: str | Path | None = None, tokens: int | None = None,
             split: str | None = None, *, tasks: str | list[str] | None = None, probe_items: int = PROBE_ITEMS,
             seed: int = 0, lm_eval: str | list[str] | None = None, lm_eval_include: str | Path | None = None,
             lm_eval_limit: int | None = None, dtype: str | torch.dtype = "auto") -> dict:
    """:func:`lm_loss` of a model directory, loaded in ``dtype`` (``"auto"``: the checkpoint's own, so a bf16
    checkpoint runs in bf16, with the loss summed in float32; ``record["dtype"]`` says which); ``split`` defaults
    to :func:`default_split` of ``data``. With ``tasks``, the record adds ``probes``,
    :func:`layerlab.probes.measure` of them (``probe_items`` each, from ``seed``, next_token on ``data``); with
    ``lm_eval``, ``lm_eval``, :func:`run_lm_eval` of those tasks."""
    check_loss_tokens(tokens)
    if isinstance(dtype, str) and dtype != "auto":
        from .offload import resolve_dtype

        dtype = resolve_dtype(dtype, None, None)  # an unknown name is one line, before the load
    model, tok, _ = load_model(model_dir, dtype=dtype)
    record = lm_loss(model, tok, data, tokens, split=split or default_split(data))
    record["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if tasks:
        from .probes import measure

        record["probes"] = measure(model, tok, tasks, seed=seed, n=probe_items, data=data)
    if lm_eval:
        record["lm_eval"] = run_lm_eval(model, tok, lm_eval, lm_eval_include, lm_eval_limit)
    return record
