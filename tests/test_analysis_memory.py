"""What the streaming analysis holds in memory (issue 13 §3/§4): each block's sublayer outputs are reduced as the
block returns and dropped, the logits are made a chunk of rows at a time, the token sample stores each token once
in the model's dtype, and the fidelity check reruns one or two rows. Each is checked against a computation written
here."""

import os
import platform
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, measure_fake_ids, perturb, tiny_cfg
from transformers import LlamaConfig, LlamaForCausalLM

import layerlab
from layerlab.adapters import view
from layerlab.analysis import stats
from layerlab.analysis.analyze import analyze_model, check_fidelity, fidelity_rows
from layerlab.analysis.stats import StreamStats, TokenSample, chunked_loss_sum
from layerlab.errors import LayerlabError

V = 64


def _llama():
    torch.manual_seed(0)
    return perturb(LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)), scale=0.02).eval()


def _layerlab():
    torch.manual_seed(0)
    return perturb(layerlab.build_model(tiny_cfg(layers=4, context=32, vocab_size=V)), scale=0.02).eval()


@pytest.mark.parametrize("build", [_llama, _layerlab], ids=["llama", "layerlab"])
def test_a_blocks_sublayer_outputs_are_dropped_once_reduced(build, monkeypatch):
    """When block i is reduced, no attention output, MLP output or mid stream of an earlier block of the same batch
    is alive any more: the pass holds one block's, not all L (5 x L states of a batch before)."""
    measure_fake_ids(monkeypatch)
    alive: list[list[weakref.ref]] = []
    real = StreamStats.update_block

    def spy(self, i, inp, attn, mlp, mid, gate=None):
        if i == 0:
            alive.clear()
        assert all(r() is None for refs in alive for r in refs), f"block {i}: an earlier block's parts are held"
        real(self, i, inp, attn, mlp, mid, gate)
        alive.append([weakref.ref(x) for x in (attn, mlp, mid) if x is not None])

    monkeypatch.setattr(StreamStats, "update_block", spy)
    entry = analyze_model(build(), FakeTok(V), name="m", path=None, tokens=80, seq_len=16, batch_size=4,
                          spectra=False, intrinsic=False, progress=False)
    assert len(alive) == 4 and all(len(refs) == 3 for refs in alive)
    assert all(x["attn_relative_contribution"] > 0 for x in entry["layers"])


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunked_loss_sum_is_the_masked_cross_entropy(chunk_rows, monkeypatch):
    """The chunked loss of read(hidden) equals a loop over the predicting positions of the padded batch."""
    monkeypatch.setattr(stats, "CHUNK_VALUES", chunk_rows * 11)
    g = torch.Generator().manual_seed(0)
    B, T, C = 3, 6, 5
    head = torch.randn(C, 11, generator=g)
    hidden, labels = torch.randn(B, T, C, generator=g), torch.randint(0, 11, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    total, n = chunked_loss_sum(lambda h: h @ head, hidden, labels, mask, 11)
    want = [float(F.cross_entropy((hidden[b, t] @ head).double()[None], labels[b, t + 1][None]))
            for b in range(B) for t in range(T - 1) if mask[b, t] and mask[b, t + 1]]
    assert n == len(want) == 11
    assert total == pytest.approx(sum(want), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_sample_keeps_the_first_tokens_and_sequences_each_once(dtype):
    """Over padded batches, the sample matrix is the first ``size`` real tokens in order and the sequences the first
    ``max_sequences`` rows' real tokens; tokens are stored in the states' dtype, each once."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0
        batches.append(([torch.randn(2, 5, 4, generator=g).to(dtype) for _ in range(2)], mask))
    for size, max_sequences in ((6, 3), (12, 2), (30, 1), (4, 4)):
        sample = TokenSample(2, size, max_sequences)
        for states, mask in batches:
            sample.update(states, mask)
        for i in range(2):
            rows = [s[i][b][m[b].bool()] for s, m in batches for b in range(2)]  # every row's real tokens
            tokens = torch.cat(rows)
            assert torch.equal(sample.matrix(i), tokens[:size].float())
            seqs = sample.sequences(i)
            assert len(seqs) == max_sequences
            assert all(torch.equal(a, b.float()) for a, b in zip(seqs, rows, strict=False))
            stored = sample.seqs[i] + sample.rows[i]
            assert all(x.dtype == dtype for x in stored)
            assert sum(len(x) for x in stored) == max(sum(len(r) for r in rows[:max_sequences]), min(size, len(tokens)))
        assert sample.count == min(size, 24)


def test_fidelity_reruns_the_first_row_and_a_padded_last_one(monkeypatch):
    """The rows checked: the first, and the last where it is padded. A divergence placed in the padded last row
    only is caught with those rows, and (the rows being honoured) not when only the first is checked."""
    assert fidelity_rows(torch.ones(4, 8)).tolist() == [0]
    padded = torch.ones(4, 8)
    padded[-1, 5:] = 0
    assert fidelity_rows(padded).tolist() == [0, 3]
    assert fidelity_rows(torch.ones(1, 8)).tolist() == [0]
    model = _layerlab()
    v = view(model)
    torch.manual_seed(2)
    ids = torch.randint(1, V, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[-1, 10:] = 0
    with torch.no_grad():
        with v.trace() as t:
            out = v.forward(ids, mask)
        states = [t.resid_in[0], *t.resid_out]
        ok = check_fidelity(v, ids, mask, states, out, rows=fidelity_rows(mask))
        assert ok["passed"] and ok["max_rel_hidden_diff"] <= 1e-5
        bent = [s.clone() for s in states]
        bent[2][-1, 3] += 0.05 * float(bent[2].abs().max())  # block 1's output, in the padded row's real part
        with pytest.raises(LayerlabError, match="diverges from the plain forward at block 1"):
            check_fidelity(v, ids, mask, bent, out, rows=fidelity_rows(mask))
        assert check_fidelity(v, ids, mask, bent, out, rows=torch.tensor([0]))["passed"]


_PROBE = """
import sys, torch
from layerlab.allocator import return_freed_memory
def rss():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
if sys.argv[1] == "fixed":
    assert return_freed_memory()
torch.set_num_threads(1)
x = torch.ones(20 << 18)  # 20 MiB, mapped by glibc and unmapped on free, which raises its threshold to 20 MiB
del x
base = rss()
held = [torch.ones(4 << 18) for _ in range(40)]  # 40 x 4 MiB, all freed but the last
keep = held[-1]
del held
print(rss() - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_buffers_go_back_to_the_system():
    """The pattern of an offloaded pass (a large buffer freed, then many mid-sized ones freed but the last): with
    glibc's default, the freed 4 MiB buffers stay resident (heap below the one still held); with
    return_freed_memory, they are unmapped (run in fresh interpreters, so nothing else set the allocator)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    held = {mode: int(subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                                     env=env, check=True).stdout) for mode in ("default", "fixed")}
    assert held["default"] >= 100 and held["fixed"] <= 20, held


_FAULTS = """
import resource, sys, torch
from layerlab import allocator
mode = allocator.for_weights(int(sys.argv[1]), streamed=sys.argv[2] == "1")
torch.set_num_threads(1)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a forward's pattern: a 512 KiB activation, and two 8 MiB buffers, one freed while the other lives
    x = torch.ones(512, 256)
    h = torch.ones(2 << 20) * 2
    return float(x.sum() + h.sum())
for _ in range(10):
    step()
before = faults()
for _ in range(20):
    step()
print(mode, faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_small_models_reuse_freed_buffers_and_large_or_streamed_ones_return_them():
    """for_weights: a small model's analysis reuses freed 8 MiB buffers (no page faults per step after a warm-up),
    a large or streamed one's maps each afresh (2048 faults of 4 KiB pages per buffer and write), in fresh
    interpreters."""
    from layerlab.allocator import LARGE_WEIGHTS

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}

    def run(weights: int, streamed: bool) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(weights), str(int(streamed))], capture_output=True,
                             text=True, env=env, check=True).stdout.split()
        return out[0], int(out[1])

    small, large, streamed = run(40 << 20, False), run(LARGE_WEIGHTS, False), run(40 << 20, True)
    # reuse: at most a fresh 8 MiB region or two over the 20 steps (the heap's layout varies with the process:
    # 0 faults in a shell, 1920-2048 under pytest), against two 8 MiB buffers faulted in every step under return
    assert small[0] == "reuse" and small[1] < 5000, small
    assert large[0] == "return" and large[1] > 20 * 1000, large
    assert streamed[0] == "return" and streamed[1] > 20 * 1000, streamed
    kept = subprocess.run([sys.executable, "-c", _FAULTS, "0", "0"], capture_output=True, text=True, check=True,
                          env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout.split()
    assert kept[0] == "None"  # the user's own setting is left alone


def test_model_bytes_counts_tied_parameters_once_and_buffers():
    """The size that picks the allocator mode: a packed low-bit model keeps its weights in buffers."""
    from layerlab.allocator import model_bytes, param_bytes

    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 3, bias=False)  # 12 float32
    m.b = torch.nn.Linear(4, 3, bias=False)
    m.b.weight = m.a.weight  # tied: counted once
    m.register_buffer("packed", torch.zeros(10, dtype=torch.uint8))
    assert param_bytes(m) == 48 and model_bytes(m) == 58
