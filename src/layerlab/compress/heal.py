"""Healing: a short fine-tune of a compressed model on the training part of ``--data``.

``lora`` (the default) trains low-rank adapters on every linear layer through ``peft`` and merges
them back, so the written model has its original architecture and no peft dependency; Gromov et
al., 2024 heal pruned models with QLoRA the same way. ``full`` trains all weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import view
from ..data import describe_slice, split_ids, window_length
from ..errors import LayerlabError, choices_error
from ..io import progress_bar
from ..registry import HEAL_MODES

LORA_RANK = 8  # a small rank suffices to heal a few removed layers (Gromov et al., 2024 use QLoRA ranks 2-64)
HEAL_TOKENS = 4_000_000  # healing samples its windows from the first this many tokens of the training split


def train_ids(tokenizer, data: str | Path | None, limit: int) -> torch.Tensor:
    """The first ``limit`` token ids of the training split of ``data`` (:func:`layerlab.data.split_ids`: the
    token stream that ``train`` sees, less its last 10%), as int64. The validation split the compressors
    report on is the rest of the same stream, so no text is in both."""
    return torch.from_numpy(np.array(split_ids(tokenizer, data, "train")[:limit], dtype=np.int64))


def train_slice(tokenizer, data: str | Path | None, used: int) -> str:
    """The name (:func:`layerlab.data.describe_slice`) of the first ``used`` tokens of the training split."""
    available = len(split_ids(tokenizer, data, "train"))
    return describe_slice(data, "train", min(used, available), available)


def lm_step(model, rows: torch.Tensor, params: list, opt: torch.optim.Optimizer) -> torch.Tensor:
    """One next-token step on (B, T+1) token rows: loss, backward, clip to norm 1, update. Returns the loss."""
    logits = model(input_ids=rows[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def heal(model, tokenizer, *, steps: int, mode: str = "lora", data: str | Path | None = None, lr: float | None = None,
         batch_size: int = 8, seq_len: int | None = None, seed: int = 0, progress: bool = True,
         frozen: tuple[str, ...] = ()):
    """Fine-tune ``model`` for ``steps`` steps and return the healed model (LoRA merged in).

    ``frozen`` names modules that must not change (a pruned sublayer's zeroed output projection): LoRA leaves
    them out of its targets (``exclude_modules``; an adapter there would be merged into the zeroed weight), and
    ``full`` fine-tuning does not train their parameters."""
    if mode not in HEAL_MODES:
        raise choices_error("heal mode", mode, HEAL_MODES)
    if steps < 1:
        return model
    if not view(model).causal:
        raise LayerlabError("healing trains a causal LM; this model is an encoder")
    seq_len = window_length(model.config, seq_len=seq_len)
    device = next(model.parameters()).device
    ids = train_ids(tokenizer, data, limit=HEAL_TOKENS)
    if len(ids) < seq_len + 2:
        raise LayerlabError(f"data too short to heal on: {len(ids)} training tokens, need more than {seq_len + 1}")
    torch.manual_seed(seed)  # LoRA's A matrices start random: the same seed gives the same healed model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules="all-linear",
                         exclude_modules=list(frozen) or None)
        with warnings.catch_warnings():  # peft asks transformers about a renamed attribute
            warnings.simplefilter("ignore", FutureWarning)
            # GPT-2's Conv1D stores (in, out): peft notices and transposes, as it should, but says so each time
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
            # peft's built-in rank/alpha patterns for MoE experts name weights that "all-linear" does not target
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                    category=RuntimeWarning)
            model = get_peft_model(model, cfg)
        lr = lr or 1e-3
    else:
        lr = lr or 1e-4
        for name in frozen:
            model.get_submodule(name).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"heal ({mode})", total=steps)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
            rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()]).to(device)
            lm_step(model, rows, params, opt)
            bar.advance(task)
    model.eval()
    if mode == "lora":
        model = model.merge_and_unload()
    return model
