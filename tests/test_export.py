"""Parity with Hugging Face GPT-2, both directions (the `export --to gpt2` path)."""

import pytest
import torch
from conftest import perturb, tiny_cfg
from transformers import GPT2LMHeadModel

import layerlab
from layerlab.errors import LayerlabError
from layerlab.export import from_gpt2, gpt2_config, to_gpt2


@pytest.mark.parametrize("tie", [True, False])
def test_layerlab_to_gpt2_logits_are_equal(tie):
    cfg = tiny_cfg(layers=3, width=48, heads=3, context=24, vocab_size=100, tie_embeddings=tie)
    ours = perturb(layerlab.build_model(cfg)).eval()
    theirs = to_gpt2(ours).eval()
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(x).logits, ours(x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_to_layerlab_logits_are_equal(tie):
    torch.manual_seed(0)
    cfg = tiny_cfg(layers=2, width=32, heads=4, context=20, vocab_size=90, tie_embeddings=tie)
    theirs = perturb(GPT2LMHeadModel(gpt2_config(cfg))).eval()
    ours = from_gpt2(theirs).eval()
    x = torch.randint(0, 90, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits)
    assert (ours.lm_head.weight is ours.embed.weight) == tie


@pytest.mark.parametrize("change", [dict(norm="rmsnorm"), dict(placement="peri"), dict(positions="rope"),
                                    dict(mlp="swiglu")])
def test_non_gpt2_designs_are_refused_with_the_reason(change):
    model = layerlab.build_model(tiny_cfg(**change))
    with pytest.raises(LayerlabError, match="cannot export to gpt2: .* GPT-2 needs"):
        to_gpt2(model)
