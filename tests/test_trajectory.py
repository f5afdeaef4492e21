"""``layerlab analyze RUN --trajectory`` (issue 14 §4): every checkpoint of a run analyzed, each per-block metric
against the training step.

Runs are built here by hand: tiny layerlab models saved as RUN/steps/step<N:07d>/ (what ``train --save-every``
keeps) and tiny GPT-NeoX models (the Pythia family) saved as Hugging Face style RUN/step<N>/, each "step" with its
own weights. trajectory.json is checked against independent runs of the plain ``layerlab analyze`` on each
checkpoint directory, its step order against the numbers (step 2000 after step 900), the page's heatmaps, the
one-model-at-a-time promise (weak references to every model analyze opens) and the one-line errors.
"""

import importlib
import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from conftest import perturb, save_model, tiny_cfg
from typer.testing import CliRunner

import layerlab
from layerlab.analysis.trajectory import find_checkpoints, metric_table, trajectory
from layerlab.cli import app
from layerlab.errors import LayerlabError
from layerlab.report.trajectory import headline_metrics, write_trajectory

TOKENS = ["--tokens", "256", "--removal-tokens", "128"]
# deliberately out of lexical order: "step2000" < "step900" as strings, and step0 sorts before both
STEPS = (900, 2000, 0)


def _layerlab_step(path: Path, seed: int) -> Path:
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(vocab_size=257, context=64, layers=3)), 0.05 * (seed + 1), seed)
    return save_model(model, path)


def _neox_step(path: Path, seed: int) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return save_model(perturb(model, 0.05 * (seed + 1), seed).eval(), path)


@pytest.fixture(scope="module")
def layerlab_run(tmp_path_factory) -> Path:
    """A layerlab run: RUN/steps/step0000900/ ... with the final model in RUN itself (as train writes it)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    for seed, step in enumerate(STEPS):
        _layerlab_step(run / "steps" / f"step{step:07d}", seed)
    _layerlab_step(run, 9)  # the run directory is a model too; --trajectory reads its steps/
    (run / "steps" / "step0000050").mkdir()  # no config.json: not a checkpoint
    return run


@pytest.fixture(scope="module")
def pythia_run(tmp_path_factory) -> Path:
    """A folder of Hugging Face GPT-NeoX checkpoints named as Pythia's revisions: step900/, step2000/, step0/."""
    run = tmp_path_factory.mktemp("pythia") / "pythia-tiny"
    for seed, step in enumerate(STEPS):
        _neox_step(run / f"step{step}", seed)
    (run / "notes").mkdir()
    return run


def _cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.mark.parametrize("which", ["layerlab", "pythia"])
def test_trajectory_equals_analyze_on_each_checkpoint(which, layerlab_run, pythia_run, tmp_path):
    """trajectory.json holds, per step and block, exactly what ``layerlab analyze`` reports on that checkpoint
    alone; the steps come in numeric order; the page holds one heatmap per metric with a value."""
    run = layerlab_run if which == "layerlab" else pythia_run
    out = tmp_path / "traj"
    r = _cli("analyze", str(run), "--trajectory", *TOKENS, "--out", str(out), "--no-progress")
    assert "3 checkpoints, steps 0..2000" in r.output and "trajectory:" in r.output
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["format"] == "layerlab-trajectory/1"
    assert [s["step"] for s in traj["steps"]] == [0, 900, 2000]  # numeric, not "step0", "step2000", "step900"
    where = run / "steps" if which == "layerlab" else run
    names = [f"step{s:07d}" if which == "layerlab" else f"step{s}" for s in (0, 900, 2000)]
    assert [Path(s["path"]) for s in traj["steps"]] == [where / n for n in names]

    for n, name in enumerate(names):  # independent runs of the ordinary analyze on each checkpoint directory
        entry = json.loads(layerlab.analyze(where / name, tokens=256, removal_tokens=128, progress=False).to_json())
        entry = entry["models"][0]
        assert traj["steps"][n]["loss"] == entry["loss"] and traj["steps"][n]["num_layers"] == 3
        assert traj["steps"][n]["best_block_to_prune"] == entry["best_block_to_prune"]["1"]["start"]
        for key in ("angular_distance", "removal_loss_delta", "esd_alpha", "effective_rank", "logit_lens_loss",
                    "stable_rank", "block_influence"):
            assert traj["metrics"][key][n] == [lay[key] for lay in entry["layers"]], (name, key)
        scalar = [k for k, v in entry["layers"][0].items() if k not in ("index", "placement") and not
                  isinstance(v, dict)]
        assert sorted(traj["metrics"]) == sorted(scalar)  # every scalar per-layer metric, nothing else
        for key in scalar:
            assert traj["metrics"][key][n] == [lay[key] for lay in entry["layers"]], (name, key)
    # the checkpoints differ, so a trajectory that repeated one checkpoint would be caught above
    assert traj["steps"][0]["loss"] != traj["steps"][2]["loss"]

    html = (out / "trajectory.html").read_text()
    headline, rest = headline_metrics(traj)
    assert headline == ["angular_distance", "removal_loss_delta", "esd_alpha", "effective_rank"]
    assert html.count('class="plot heatmap"') == len(headline) + len(rest) and len(rest) >= 10
    assert f'data-plots="{len(headline) + len(rest) + 1}"' in html  # the heatmaps and the loss curve
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html


def test_metric_table_is_block_by_step():
    """The heatmap's layout: row b holds block b at every step (a hand-written record)."""
    traj = {"steps": [{"step": 1}, {"step": 5}], "metrics": {"m": [[1.0, 2.0, 3.0], [4.0, None, 6.0]]}}
    assert metric_table(traj, "m") == [[1.0, 4.0], [2.0, None], [3.0, 6.0]]
    short = {"steps": [{"step": 1}, {"step": 5}], "metrics": {"m": [[1.0], [4.0, 5.0]]}}  # a block more later
    assert metric_table(short, "m") == [[1.0, 4.0], [None, 5.0]]


def test_one_model_alive_at_a_time(layerlab_run, monkeypatch):
    """Memory stays flat in the number of checkpoints: when analyze opens a checkpoint, every model it opened
    before is gone (weak references, no collection by the test), and the last one is gone at the end."""
    an = importlib.import_module("layerlab.analysis.analyze")  # the package re-exports a function of that name
    opened: list[weakref.ref] = []
    alive_at_open: list[int] = []
    real = an.open_model

    def watched(path, *args, **kwargs):
        alive_at_open.append(sum(r() is not None for r in opened))
        model, tok, om = real(path, *args, **kwargs)
        opened.append(weakref.ref(model))
        return model, tok, om

    monkeypatch.setattr(an, "open_model", watched)
    traj = trajectory(layerlab_run, tokens=128, removal_tokens=64, spectra=False, progress=False)
    assert len(traj["steps"]) == len(opened) == 3
    assert alive_at_open == [0, 0, 0]
    assert [r() is None for r in opened] == [True, True, True]


def test_find_checkpoints_orders_by_number_and_prefers_steps(tmp_path):
    run = tmp_path / "run"
    for name in ("step10", "step9", "step100", "step0000050"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
    (run / "step7").mkdir()  # no config.json
    (run / "stepX").mkdir()
    (run / "stepX" / "config.json").write_text("{}")
    assert [s for s, _ in find_checkpoints(run)] == [9, 10, 50, 100]
    (run / "steps" / "step0000003").mkdir(parents=True)
    (run / "steps" / "step0000003" / "config.json").write_text("{}")
    assert find_checkpoints(run) == [(3, run / "steps" / "step0000003")]  # the save-every layout wins
    (run / "steps" / "step3").mkdir()
    (run / "steps" / "step3" / "config.json").write_text("{}")
    with pytest.raises(LayerlabError, match=r"^step0000003 and step3 in .* are both step 3; keep one$"):
        find_checkpoints(run)


def test_one_line_errors(tmp_path, layerlab_run):
    empty = tmp_path / "empty"
    (empty / "steps").mkdir(parents=True)
    msg = f"no checkpoints found: looked for step<N>/ directories holding a config.json in {empty / 'steps'} " \
          f"and in {empty}"
    with pytest.raises(LayerlabError) as e:
        find_checkpoints(empty)
    assert str(e.value) == msg
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    for args, text in (([str(empty)], msg), ([str(tmp_path / "missing")], "run directory does not exist"),
                       ([str(layerlab_run), str(layerlab_run)], "--trajectory reads one run directory, got 2"),
                       ([str(layerlab_run), "--out", str(tmp_path / "taken")], "already exists and is not empty; "
                        "choose another --out, or pass --overwrite to replace its trajectory"),
                       ([str(layerlab_run), "--out", str(layerlab_run / "t")], "refusing to write into the input")):
        r = CliRunner().invoke(app, ["analyze", *args, "--trajectory", "--no-progress"])
        assert isinstance(r.exception, LayerlabError) and text in str(r.exception), r.exception
        assert "\n" not in str(r.exception)


def test_write_is_atomic_and_strict_json(tmp_path):
    """NaN becomes null (strict JSON), and the atomic writes leave no temporary file beside the two outputs."""
    traj = {"format": "layerlab-trajectory/1", "run": "r", "steps": [{"step": 1, "loss": float("nan")}],
            "metrics": {"angular_distance": [[0.5, float("nan")]]}, "provenance": {}}
    out = write_trajectory(traj, tmp_path / "t")
    data = json.loads((out / "trajectory.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["metrics"]["angular_distance"] == [[0.5, None]] and data["steps"][0]["loss"] is None
    assert sorted(p.name for p in out.iterdir()) == ["trajectory.html", "trajectory.json"]


@pytest.mark.slow
def test_trajectory_of_a_training_run_end_to_end(tmp_path):
    """``train`` keeping steps 0, 10 and 20 (``keep_every``, issue 14 §4), then ``analyze RUN --trajectory``: the
    last step's values are those of ``analyze`` on the final run directory (the same weights), and the loss of
    the first step (the initialisation) is above the last one's."""
    from layerlab.train import train

    run = tmp_path / "run"
    train(preset="debug", overrides={"steps": 20, "eval_every": 20, "layers": 3, "keep_every": 10}, out=run,
          progress=False, echo=lambda *a: None)
    out = tmp_path / "traj"
    _cli("analyze", str(run), "--trajectory", *TOKENS, "--out", str(out), "--no-progress")
    traj = json.loads((out / "trajectory.json").read_text())
    assert [s["step"] for s in traj["steps"]] == [0, 10, 20]
    final = layerlab.analyze(run, tokens=256, removal_tokens=128, progress=False).models[0]
    assert traj["steps"][-1]["loss"] == final["loss"] < traj["steps"][0]["loss"]
    for key in ("angular_distance", "removal_loss_delta", "esd_alpha", "effective_rank"):
        assert traj["metrics"][key][-1] == [lay[key] for lay in final["layers"]], key
