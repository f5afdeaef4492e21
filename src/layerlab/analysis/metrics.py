"""The per-layer metrics of ``analyze``: one registry entry each (the types are in ``metric_registry``).

Adding a metric is one :func:`register_metric` call here (plus its computation, in ``stats.py`` or
``spectra.py``, when it is new) and one test: the pass computes it, each layer's entry of report.json holds it,
report.html draws it in its figure and shows its column, and docs/report-format.md lists it (a test checks the
page against :func:`layerlab.analysis.metric_docs.render_doc`). docs/analysis.md shows an example.
"""

from __future__ import annotations

import math

import numpy as np

from .metric_registry import (
    FAMILIES,
    KINDS,
    LAYER_FIELDS,
    METRICS,
    SWITCHES,
    Family,
    Kind,
    LayerResults,
    Metric,
    Plot,
    is_off,
    layer_results,
    measure_layer,
    nanmean,
    register_family,
    register_metric,
    registered,
    series_key,
    stream_sums,
)
from .stats import anisotropy, curvature, effective_rank, intrinsic_dimension, prompt_entropy

__all__ = ["FAMILIES", "KINDS", "LAYER_FIELDS", "METRICS", "SWITCHES", "Family", "Kind", "LayerResults", "Metric",
           "Plot", "is_off", "layer_results", "measure_layer", "register_family", "register_metric", "registered",
           "series_key", "stream_sums"]

GROMOV = "Gromov et al., 2024 (The Unreasonable Ineffectiveness of the Deeper Layers)"
SHORTGPT = "Men et al., 2024 (ShortGPT)"
CSORDAS = "Csordás et al., 2025 (Do Language Models Use Their Depth Efficiently?)"
CURSE = "Sun et al., 2025 (The Curse of Depth in LLMs); Kim et al., 2025 (Peri-LN)"
SKEAN = "Skean et al., 2025 (Layer by Layer)"

# ---------------------------------------------------------------------------------------------- the figures
for _family in (
    Family("Layer similarity",
           "Angular distance between the residual stream entering and leaving each block (solid: all tokens, "
           "dashed: last token) and the ShortGPT block influence 1 − cos; low values mark blocks that change "
           "the stream little and are candidates for pruning (Gromov et al., 2024; Men et al., 2024)."),
    Family("Contribution",
           "Size of each block's update relative to the stream it reads, ‖update‖ / ‖input‖, for the whole block "
           "and for its attention and MLP sublayers, and the cosine between each sublayer's output and its input "
           "(negative: the sublayer erases part of the stream) (Csordás et al., 2025)."),
    Family("Hidden-state growth",
           "RMS of the residual stream leaving each block (log scale; the square at “emb” is the embedding "
           "output) and the ratio of its variance to that of the stream entering the block (above 1: the block "
           "grows the stream)."),
    Family("Representation quality",
           "Geometry of the token representations leaving each block: effective rank (Roy & Vetterli, 2007), "
           "prompt entropy and curvature (Skean et al., 2025), TwoNN intrinsic dimension, and anisotropy "
           "(mean cosine between distinct tokens; high values mean the tokens crowd into a narrow cone).",
           row_height=2.6),
    Family("Logit lens",
           "Cross-entropy of the next-token prediction read straight from each block's output through the final "
           "norm and the unembedding, and its KL divergence from the model's own final prediction; the dashed "
           "line is the full model's loss."),
    Family("Layer removal",
           "How much the model's output changes when that single block is skipped: the loss increase in "
           "nats/token for causal LMs, 1 − cos of the mean-pooled output for encoders; high values mark the "
           "blocks the model cannot do without.", ncols=2),
    Family("Weight spectra",
           "Heavy-tail exponent α of the eigenvalue spectrum of each block's weight matrices (HT-SR, Martin & "
           "Mahoney; 2 ≤ α ≤ 6 is typical of well-trained layers, larger α means less structure learned) and "
           "their stable rank ‖W‖²_F / ‖W‖²_2, both averaged over the block's matrices."),
    Family("Max activations",
           "Largest absolute activation over the real tokens at each block's hook points (the residual stream "
           "leaving the block, the attention output, the MLP output, and the MLP's gate: the hidden activation "
           "its output projection reads, silu(gate)·up or GELU(fc), where LLM.int8()'s outlier features live), "
           "log scale, with the embedding output (“emb”) and the final norm (diamond); massive activations show "
           "up as spikes orders of magnitude above their neighbours (Sun et al., 2024; Dettmers et al., 2022).",
           ncols=1, row_height=3.4, own_section=True),
    Family("Expert routing",
           "Mixture-of-experts blocks only: how evenly the router spreads the real tokens' top-k assignments over "
           "the experts, as the entropy of the load shares (ln E when balanced) and the largest share any one "
           "expert receives (1/E when balanced); a collapsed router shows low entropy and a high max share "
           "(Shazeer et al., 2017; Fedus et al., 2022).", ncols=2),
):
    register_family(_family)


# ---------------------------------------------------------------------------------------------- computations
def _max_abs(r: LayerResults) -> dict[str, float | None]:
    """max |.| over the real tokens per hook point; None for a part the block lacks (no attention or MLP)."""
    return {"resid": r.leaving["max_resid"], "attn": r.block["max_attn"], "mlp": r.block["max_mlp"],
            "gate": r.block["max_gate"]}


def _max_abs_activation(r: LayerResults) -> float:
    return max(v for v in _max_abs(r).values() if v is not None)  # the residual stream is always there


def _variance_growth(r: LayerResults) -> float | None:
    return r.leaving["var"] / r.entering["var"] if r.entering["var"] > 0 else None


def _of_tokens(fn):
    """A token-sample measure of x_l+1: ``fn`` of the (N, C) sample, NaN for an empty one."""
    return lambda r: fn(r.tokens) if r.tokens.numel() else math.nan


def _over_sequences(fn):
    """A per-prompt measure of x_l+1: the mean of ``fn`` over the sampled sequences, ignoring NaN."""
    return lambda r: float(np.nanmean([fn(s) for s in r.sequences])) if r.sequences else math.nan


def _over_matrices(attr: str):
    """A weight measure of the block: the mean of each matrix's ``attr``, ignoring NaN."""
    return lambda r: nanmean([getattr(m, attr) for m in r.matrices])


_SIM, _CON, _GROW, _REP, _LENS, _REM, _W, _MAX = (
    "Layer similarity", "Contribution", "Hidden-state growth", "Representation quality", "Logit lens",
    "Layer removal", "Weight spectra", "Max activations")
_ANG = r"Angular distance $d(x_l, x_{l+1})$"
_REL, _COS = "Relative contribution", "Cosine of the update with its input"

# ---------------------------------------------------------------------------------------------- the metrics
for _metric in (
    # stream: running sums over every non-padding token (stats.StreamStats)
    Metric("angular_distance", "stream", lambda r: r.block["ang"],
           "arccos(cos(x_l, x_l+1))/pi, mean over non-padding tokens", GROMOV, 0.21,
           (Plot(_SIM, _ANG, "all tokens", ylabel="arccos(cos) / π"),)),
    Metric("angular_distance_last_token", "stream", lambda r: r.block["ang_last"],
           "same, last non-padding token of each sequence", GROMOV, 0.18,
           (Plot(_SIM, _ANG, "last token", style="--"),)),
    Metric("block_influence", "stream", lambda r: r.block["block_influence"],
           "1 - E cos(x_l, x_l+1)", SHORTGPT, 0.07,
           (Plot(_SIM, "Block influence (ShortGPT)", "block", ylabel=r"$1 - \cos(x_l, x_{l+1})$"),)),
    Metric("relative_contribution", "stream", lambda r: r.block["relative_contribution"],
           "||x_l+1 - x_l|| / ||x_l||, mean over tokens", CSORDAS, 0.4,
           (Plot(_CON, _REL, "block", ylabel="‖update‖ / ‖input‖"),)),
    Metric("attn_relative_contribution", "stream", lambda r: r.block["attn_relative_contribution"],
           "||attn out|| / ||x entering attn||", CSORDAS, 0.3, (Plot(_CON, _REL, "attention", style="--"),)),
    Metric("attn_cosine", "stream", lambda r: r.block["attn_cosine"],
           "cos(attn out, x entering attn)", CSORDAS, 0.05,
           (Plot(_CON, _COS, "attention", style="--", ylabel="cosine", hline=0.0),)),
    Metric("mlp_relative_contribution", "stream", lambda r: r.block["mlp_relative_contribution"],
           "||mlp out|| / ||x entering mlp||", CSORDAS, 0.3, (Plot(_CON, _REL, "MLP", style=":"),)),
    Metric("mlp_cosine", "stream", lambda r: r.block["mlp_cosine"],
           "cos(mlp out, x entering mlp)", CSORDAS, -0.02, (Plot(_CON, _COS, "MLP", style=":"),)),
    Metric("hidden_rms", "stream", lambda r: r.leaving["rms"],
           "RMS of x_l+1 (the stream leaving the block)", CURSE, 1.3,
           (Plot(_GROW, "RMS of the stream leaving the block", "leaving the block", ylabel="RMS (log scale)",
                 log=True, embedding_key="hidden_rms"),)),
    Metric("variance_growth", "stream", _variance_growth, "Var(x_l+1) / Var(x_l)", CURSE, 1.2,
           (Plot(_GROW, "Variance growth", "block", ylabel=r"Var$(x_{l+1})$ / Var$(x_l)$", hline=1.0),)),
    Metric("max_abs_activation", "stream", _max_abs_activation,
           "max |.| over this block's hook points, real tokens",
           "Sun et al., 2024 (Massive Activations in Large Language Models)", 12.5),
    Metric("max_abs", "stream", _max_abs,
           "max |.| per hook point: x_l+1, attention and MLP outputs, MLP gate (down-projection input)",
           "Dettmers et al., 2022 (LLM.int8())", {"resid": 12.5, "attn": 3.1, "mlp": 7.7, "gate": 9.4},
           tuple(Plot(_MAX, "Max |activation| per block", label, part=part, style=style,
                      ylabel="max |activation| (log scale)", log=True, embedding_key="max_abs_activation",
                      final_key="final_norm_max_abs")
                 for part, label, style in (("resid", "residual stream", "-"), ("attn", "attention output", "--"),
                                            ("mlp", "MLP output", ":"), ("gate", "MLP gate", "-.")))),
    # sample: the token sample of x_l+1 (stats.TokenSample)
    Metric("effective_rank", "sample", _of_tokens(effective_rank),
           "exp(entropy of normalized singular values), token sample", "Roy & Vetterli, 2007", 80.2,
           (Plot(_REP, "Effective rank", "effective rank", ylabel="exp(entropy of σ)"),)),
    Metric("prompt_entropy", "sample", _over_sequences(prompt_entropy),
           "normalized matrix-based entropy of the token Gram matrix", SKEAN, 0.81,
           (Plot(_REP, "Prompt entropy", "prompt entropy", ylabel="normalized entropy"),)),
    Metric("curvature", "sample", _over_sequences(curvature),
           "mean angle (radians) between successive token steps",
           "Hosseini & Fedorenko, 2023; " + SKEAN, 1.9,
           (Plot(_REP, "Curvature", "curvature", ylabel="mean angle (rad)"),)),
    Metric("intrinsic_dimension", "sample", _of_tokens(intrinsic_dimension),
           "TwoNN, token sample", "Facco et al., 2017 (TwoNN)", 14.1,
           (Plot(_REP, "Intrinsic dimension (TwoNN)", "TwoNN", ylabel="dimension"),), switch="intrinsic"),
    Metric("anisotropy", "sample", _of_tokens(anisotropy),
           "mean cosine between distinct tokens, token sample", "Ethayarajh, 2019", 0.12,
           (Plot(_REP, "Anisotropy", "anisotropy", ylabel="mean cosine"),)),
    # stream again: the logit lens (stats.StreamStats.update_lens); then layer removal (stats.RemovalSums)
    Metric("logit_lens_loss", "stream", lambda r: r.block["lens_ce"],
           "CE of final norm + unembedding applied to x_l+1", "nostalgebraist, 2020 (the logit lens)", 3.2,
           (Plot(_LENS, "Logit-lens loss", "logit lens", ylabel="cross-entropy (nats/token)", loss_line=True),)),
    Metric("logit_lens_kl", "stream", lambda r: r.block["lens_kl"],
           "KL(p_final || p_lens(x_l+1)), nats", "nostalgebraist, 2020 (the logit lens)", 1.1,
           (Plot(_LENS, "KL to the final prediction", "KL", ylabel="KL (nats)"),)),
    Metric("removal_loss_delta", "removal", lambda r: r.block["removal"] if r.causal else None,
           "loss with block l skipped - full loss (causal)",
           "Gromov et al., 2024; Sun et al., 2024 (Transformer Layers as Painters)", 0.05,
           (Plot(_REM, "Loss increase when the block is skipped", "Δ loss", ylabel="Δ loss (nats/token)",
                 hline=0.0),)),
    Metric("removal_effect", "removal", lambda r: None if r.causal else r.block["removal"],
           "encoders: 1 - cos(mean-pooled out with / without block)", "Sun et al., 2024 (Transformer Layers as "
           "Painters)", None,
           (Plot(_REM, "Removal effect (encoders)", "removal effect", ylabel="1 − cos (pooled output)",
                 hline=0.0),)),
    # stream: the MoE router's selections (adapters.router_load), None for dense blocks and models
    Metric("router_entropy", "stream", lambda r: r.block["router_entropy"],
           "MoE blocks: entropy (nats) of the share of top-k token assignments per expert; ln E when balanced",
           "Shazeer et al., 2017 (Outrageously Large Neural Networks); Fedus et al., 2022 (Switch Transformers)",
           None, (Plot("Expert routing", "Router load entropy", "entropy", ylabel="entropy (nats)"),), table=False),
    Metric("router_max_share", "stream", lambda r: r.block["router_max_share"],
           "MoE blocks: largest share of the top-k token assignments that one expert receives; 1/E when balanced",
           "Fedus et al., 2022 (Switch Transformers)", None,
           (Plot("Expert routing", "Router max share", "max share", ylabel="share of assignments"),), table=False),
    # weights: the block's weight matrices (spectra.weight_spectra, cached per checkpoint)
    Metric("esd_alpha", "weights", _over_matrices("esd_alpha"),
           "mean heavy-tail exponent over the block's matrices", "Martin & Mahoney, 2021 (HT-SR)", 3.4,
           (Plot(_W, "Heavy-tail exponent α", "α", ylabel="α"),)),
    Metric("stable_rank", "weights", _over_matrices("stable_rank"),
           "mean stable rank over the block's matrices", "Rudelson & Vershynin, 2007", 12.0,
           (Plot(_W, "Stable rank", "stable rank", ylabel="stable rank"),)),
):
    register_metric(_metric)
