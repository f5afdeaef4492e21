"""The KV cache: cached decoding equals uncached, in scores, under the installed transformers' convention."""

import pytest
import torch
from conftest import perturb, save_model, tiny_cfg
from test_model import left_padded_pair
from transformers import AutoModelForCausalLM

import layerlab
from layerlab.errors import LayerlabError
from layerlab.generate import sample
from layerlab.model import CACHE_NAME, KNOWN_CACHE_NAMES, cache_convention, output_cache
from layerlab.registry import PLACEMENTS


def test_the_installed_transformers_passes_the_cache_in_a_known_way():
    """Fails, naming the version, when a transformers release changes how generate() hands over the cache."""
    assert cache_convention() in KNOWN_CACHE_NAMES


def _greedy(model, x, use_cache: bool, new: int = 8, **kw):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=new, do_sample=False, use_cache=use_cache, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


def _assert_same_decoding(model, x, new: int = 8):
    cached, uncached = _greedy(model, x, True, new), _greedy(model, x, False, new)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.scores) == len(uncached.scores) == new
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_cached_generation_equals_uncached_in_scores(placement, positions):
    cfg = tiny_cfg(placement=placement, positions=positions, context=32, layers=4)
    model = perturb(layerlab.build_model(cfg), scale=0.3).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    _assert_same_decoding(model, x)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_greedy_generation_of_a_left_padded_batch_equals_each_row_alone(positions, use_cache):
    """generate() on two prompts, the shorter left-padded, decodes each as it decodes that prompt alone: the
    same tokens and, step by step, the same scores. RoPE once gave every row row 0's phases, so the unpadded
    row 1 was off by ~2 in its scores here."""
    torch.manual_seed(0)
    cfg = tiny_cfg(positions=positions, context=32)
    model = perturb(layerlab.build_model(cfg), scale=0.3).eval()  # logits spread ~2, and depend on position
    a, b, ids, mask = left_padded_pair(cfg)
    new = 6
    batch = _greedy(model, ids, use_cache, new, attention_mask=mask)
    for row, prompt in enumerate((a, b)):
        alone = _greedy(model, prompt, use_cache, new)
        assert torch.equal(batch.sequences[row, -new:], alone.sequences[0, -new:]), f"row {row}"
        for step, (s, ref) in enumerate(zip(batch.scores, alone.scores, strict=True)):
            torch.testing.assert_close(s[row], ref[0], rtol=1e-5, atol=1e-4,
                                       msg=lambda m, r=row, t=step: f"row {r}, step {t}: {m}")


@pytest.mark.parametrize("unit", ["attn", "mlp"])
def test_generate_on_a_pruned_model_reindexes_the_cache(tmp_path, unit):
    """A model without block 0's attention keeps its keys in cache layer 0: generate() reads that layer."""
    cfg = tiny_cfg(context=32, layers=4, **{f"drop_{unit}": [0, 2]})
    model = perturb(layerlab.build_model(cfg), scale=0.3).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    _assert_same_decoding(loaded, x)


def test_forward_takes_the_cache_under_either_name_and_returns_it_under_the_installed_one():
    cfg = tiny_cfg(context=32)
    model = perturb(layerlab.build_model(cfg)).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x).logits[:, -2:]
        for name in KNOWN_CACHE_NAMES:
            prefix = model(x[:, :8], use_cache=True)
            cache = output_cache(prefix)
            assert cache is not None and cache.get_seq_length() == 8
            out = model(x[:, 8:], **{name: cache})  # use_cache not repeated: a cache passed in is kept
            torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-5)
            assert output_cache(out) is cache and cache.get_seq_length() == 10
            assert CACHE_NAME in out.keys()
        with pytest.raises(ValueError, match="not both"):
            model(x[:, 8:], cache=output_cache(model(x[:, :8], use_cache=True)),
                  past_key_values=output_cache(model(x[:, :8], use_cache=True)))


def test_sample_refuses_an_empty_prompt_and_says_when_the_context_limits_it(tmp_path):
    cfg = tiny_cfg(context=32, vocab_size=320)
    save_model(perturb(layerlab.build_model(cfg)), tmp_path)
    with pytest.raises(LayerlabError, match="prompt is empty"):
        sample(tmp_path, "", tokens=5)
    notes = []
    text = sample(tmp_path, "ab", tokens=100, temperature=0, echo=notes.append)
    assert text.startswith("ab")
    assert len(notes) == 1 and "context of 32" in notes[0] and "30" in notes[0]
    notes.clear()
    sample(tmp_path, "ab", tokens=5, temperature=0, echo=notes.append)
    assert notes == []
