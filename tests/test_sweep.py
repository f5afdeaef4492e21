"""``layerlab sweep``: a 2x2 grid end to end, resume, bad input before any run, failed runs, Ray."""

import json
import re
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from layerlab.errors import LayerlabError
from layerlab.report.sweep import render_sweep_html
from layerlab.sweep import load_sweep, sweep, value_label

# A few steps of the debug preset, each logged, telemetry at the last one; a small analysis.
BASE = {"preset": "debug", "steps": 3, "eval_every": 3, "eval_batches": 1, "log_every": 1, "telemetry_every": 3,
        "save_every": 3}
ANALYZE = {"tokens": 256, "removal_tokens": 128, "html": False}
IMG = re.compile(r'<img class="plot[^"]*" [^>]*src="data:image/png;base64,')


def write_sweep(path, **doc):
    doc = {"base": dict(BASE), "analyze": dict(ANALYZE), **doc}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 2x2 sweep (placement x seed) run once through the CLI."""
    from typer.testing import CliRunner

    from layerlab.cli import app

    tmp = tmp_path_factory.mktemp("sweep")
    file = write_sweep(tmp / "grid.yaml", name="grid", grid={"placement": ["pre", "post"]}, seeds=2)
    out = tmp / "out"
    r = CliRunner().invoke(app, ["sweep", str(file), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    return file, out, r.output


def test_sweep_trains_analyzes_and_compares(swept):
    _, out, output = swept
    summary = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in summary["runs"]]
    assert names == ["pre-s0", "pre-s1", "post-s0", "post-s1"]
    assert summary["failed"] == [] and all(r["status"] == "finished" for r in summary["runs"])
    for run in summary["runs"]:
        assert (out / run["dir"] / "model.safetensors").is_file()
        assert (out / run["dir"] / "analysis" / "report.json").is_file()
        assert run["curve"]["step"] == [1, 2, 3] and run["val_curve"]["step"] == [0, 3]
        for key in ("angular_distance", "removal_loss_delta", "grad_norm_block"):
            assert len(run["layers"][key]) == 2, key
    assert [c["name"] for c in summary["configs"]] == ["pre", "post"]
    for config in summary["configs"]:
        vl = config["val_loss"]
        assert vl["n"] == 2 and vl["min"] <= vl["mean"] <= vl["max"] and vl["std"] > 0  # two seeds differ
        assert set(config["layers"]) >= {"angular_distance", "removal_loss_delta", "grad_norm_block"}
    # one table: printed, and as CSV
    assert re.search(r"\| pre \| pre \| 2/2 \| \d\.\d{4} \|", output)
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("config,placement,runs,val_loss_mean") and len(rows) == 3
    # the page: self-contained, with the three plots
    page = (out / "sweep.html").read_text()
    assert len(IMG.findall(page)) == 3 and 'data-plots="3"' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for title in ("Loss curves", "Final validation loss", "Per-layer measurements"):
        assert title in page


def test_rerun_skips_finished_runs(swept, monkeypatch):
    file, out, _ = swept
    weights = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    reports = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/analysis/report.json")}
    assert len(weights) == len(reports) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("layerlab.train.train", no_training)
    monkeypatch.setattr("layerlab.analysis.analyze", no_training)
    res = sweep(file, out=out, echo=quiet)
    assert res.failed == [] and [r["action"] for r in res.records] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    assert {p: p.stat().st_mtime_ns for p in reports} == reports
    assert all(r["seconds"] for r in res.summary["runs"])  # timings carried over from the first invocation
    lines = []
    sweep(file, out=out, dry_run=True, echo=lines.append)
    assert "4 already trained, 0 to do" in lines[0] and all(" done " in line for line in lines[1:])

    # the same out directory with a different model is refused before anything runs
    changed = write_sweep(file.parent / "changed.yaml", name="grid", grid={"placement": ["pre", "post"]}, seeds=2,
                          base={**BASE, "width": 32, "heads": 2})
    with pytest.raises(LayerlabError, match=r"run pre-s0: output directory .* holds a run of a different config"):
        load_sweep(changed, out=out)


@pytest.mark.parametrize("doc, message", [
    ({"grid": {"norm": ["layernorm", "foo"]}}, r"run foo-s0: unknown norm 'foo'; valid: .*rmsnorm"),
    ({"grid": {"nrom": ["layernorm"]}}, r"^unknown field 'nrom' in .*bad\.yaml grid; did you mean 'norm'\?$"),
    ({"grid": {"colour": ["red"]}}, r"^unknown field 'colour' in .* grid; valid fields: .*placement"),
    ({"grid": {"presett": ["debug"]}}, r"unknown field 'presett' in .* grid; did you mean 'preset'\?$"),
    ({"grid": {"optimizer": [{"optimizer": "lamb", "lerning_rate": 0.01}]}},
     r"^unknown field 'lerning_rate' in .* grid; did you mean 'lr'\?$"),
    ({"grid": {"norm": ["rmsnrom"]}}, r"run rmsnrom-s0: unknown norm 'rmsnrom'; valid: .*; did you mean 'rmsnorm'\?$"),
    ({"base": {**BASE, "stepz": 3}}, r"^unknown field 'stepz' in .*bad\.yaml base; did you mean 'steps'\?$"),
    ({"base": {**BASE, "lr_": 0.1}}, r"^unknown field 'lr_' in .* base; did you mean 'lr'\?$"),
    ({"base": {**BASE, "placment": "peri"}}, r"^unknown field 'placment' in .* base; did you mean 'placement'\?$"),
    ({"base": {**BASE, "presett": "debug"}}, r"^unknown field 'presett' in .* base; did you mean 'preset'\?$"),
    ({"base": {**BASE, "model": {"widht": 32}}}, r"^unknown field 'widht' in .* base; did you mean 'width'\?$"),
    ({"grid": {"layers": ["many"]}}, r"field 'layers' in .* grid expects int, got 'many'"),
    ({"grid": {"width": [64, 63]}}, r"run width63-s0: width 63 is not divisible by heads 2"),
    ({"grid": {"optimizer": ["adamw", "sgdd"]}}, r"run sgdd-s0: unknown optimizer 'sgdd'"),
    ({"grid": {"placement": []}}, r"grid field 'placement' needs a non-empty list"),
    ({"grid": {"optimizer": [{"lr": 0.1}]}}, r"a mapping in grid field 'optimizer' must set 'optimizer'"),
    ({"seeds": 0}, r"seeds must be a positive count"),
    ({"grid": {"seed": [0, 1]}}, r"give seeds with the top-level seeds: key"),
    ({"analyze": {"tokenz": 5}}, r"^unknown option 'tokenz' in .* analyze; did you mean 'tokens'\?$"),
    ({"analyze": {"colour": 5}}, r"unknown option 'colour' in .* analyze; valid: tokens"),
    ({"ray": {"gpu_per_run": 1}}, r"^unknown option 'gpu_per_run' in .* ray; did you mean 'gpus_per_run'\?$"),
    ({"ray": {"cpus_per_run": 0}}, r"option 'cpus_per_run' in .* ray expects int >= 1"),
    ({"bogus": 1}, r"unknown key 'bogus' in sweep file .*; valid: name, out, base, grid"),
    ({"seed": 1}, r"^unknown key 'seed' in sweep file .*bad\.yaml; did you mean 'seeds'\?$"),
    ({"grids": {"placement": ["pre"]}}, r"^unknown key 'grids' in sweep file .*; did you mean 'grid'\?$"),
    ({"lr": 0.1}, r"unknown key 'lr' in sweep file .*\(config fields go under base: or grid:\)"),
    ({"base": {"preset": "huge"}}, r"unknown preset 'huge'; valid: debug"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path, doc, message):
    file = write_sweep(tmp_path / "bad.yaml", **doc)
    out = tmp_path / "out"
    with pytest.raises(LayerlabError, match=message):
        sweep(file, out=out, echo=quiet)
    assert not out.exists()


def test_summary_csv_leaves_missing_values_empty(tmp_path):
    """A config with one seed has no standard deviation: the CSV field is empty, so pandas reads NaN and every
    numeric column stays numeric; the printed table keeps a readable dash."""
    import pandas as pd

    from layerlab.sweep import Sweep, markdown_table, write_outputs

    def config(name, hidden, seeds, losses, params, seconds):
        stats = {"n": len(losses), "mean": sum(losses) / len(losses) if losses else None,
                 "std": 0.01 if len(losses) > 1 else None, "min": min(losses, default=None),
                 "max": max(losses, default=None)}
        return {"name": name, "fields": {"mlp_hidden": hidden}, "seeds": seeds, "finished": len(losses),
                "failed": [], "val_loss": stats, "val_bpb": {**stats}, "params": params,
                "seconds_per_run": seconds, "layers": {}}

    summary = {"name": "csv", "grid": {"mlp_hidden": [None, 128]}, "runs": [], "failed": [], "configs": [
        config("mlp_hidden-none", None, [0], [3.5], 1000, 2.0),  # one seed: no std
        config("mlp_hidden128", 128, [0, 1], [3.25, 3.75], 2000, 3.0),
        config("broken", 128, [0], [], None, None),  # every run failed: nothing measured
    ]}
    out = tmp_path / "out"
    plan = Sweep(name="csv", path=tmp_path / "csv.yaml", out=out, base={}, grid=summary["grid"], seeds=[0, 1],
                 workers=1, analyze=None, ray={})
    write_outputs(plan, summary)
    assert "–" not in (out / "summary.csv").read_text(encoding="utf-8")
    df = pd.read_csv(out / "summary.csv")
    assert list(df["config"]) == ["mlp_hidden-none", "mlp_hidden128", "broken"]
    for column in ("mlp_hidden", "val_loss_mean", "val_loss_std", "val_loss_min", "val_loss_max", "val_bpb_mean",
                   "params", "seconds_per_run"):
        assert df[column].dtype == "float64", (column, df[column].dtype)
    assert df["val_loss_std"].isna().tolist() == [True, False, True] and df["val_loss_std"][1] == 0.01
    assert df["mlp_hidden"].isna().tolist() == [True, False, False]
    assert df["params"].tolist()[:2] == [1000, 2000] and df["params"].isna()[2]
    assert df["runs"].tolist() == ["1/1", "2/2", "0/1"]
    assert "| mlp_hidden-none | None | 1/1 | 3.5000 | – |" in markdown_table(summary)  # the terminal's table
    assert "3.5000 ± –" in (out / "sweep.html").read_text()  # and the page keep a dash


def test_cli_help_has_examples():
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, ["sweep", "--help"])
    assert r.exit_code == 0 and "layerlab sweep sweeps/norm-placement.yaml" in r.output and "--backend" in r.output


def test_cli_error_is_one_line(tmp_path):
    file = write_sweep(tmp_path / "bad.yaml", grid={"norm": ["layernorm", "foo"]})
    cmd = [sys.executable, "-m", "layerlab", "sweep", str(file), "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith("error: ") and "unknown norm 'foo'" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_failed_run_is_recorded_and_the_others_finish(tmp_path):
    """A missing data file passes validation but fails when the run starts; two workers run in parallel."""
    file = write_sweep(tmp_path / "fail.yaml", grid={"data": [None, str(tmp_path / "missing.txt")]})
    out = tmp_path / "out"
    lines = []
    res = sweep(file, out=out, workers=2, echo=lines.append)
    assert res.failed == ["missing.txt-s0"]
    summary = json.loads((out / "sweep.json").read_text())
    ok, bad = summary["runs"]
    assert ok["name"] == "data-none-s0" and ok["status"] == "finished" and ok["val_loss"] is not None
    assert bad["status"] == "failed" and bad["stage"] == "train" and "missing.txt" in bad["error"]
    assert "Traceback" in bad["traceback"]
    assert summary["failed"] == ["missing.txt-s0"]
    assert any(line.startswith("1 of 2 runs failed") for line in lines)
    page = (out / "sweep.html").read_text()
    assert "Failed runs (1)" in page and "missing.txt-s0" in page


def test_run_names_and_grid_mappings(tmp_path):
    assert [value_label("lr", 1e-3), value_label("bias", False), value_label("placement", ["pre", "post"]),
            value_label("data", None), value_label("data", "corpus/wiki.txt"), value_label("norm", "rms norm:x")] == [
        "lr0.001", "no-bias", "pre+post", "data-none", "wiki.txt", "rms_norm_x"]
    same_name = write_sweep(tmp_path / "same.yaml", grid={"data": ["a/t.txt", "b/t.txt"]})
    assert [r.name for r in load_sweep(same_name, out=tmp_path / "o").runs] == ["data-t.txt-1-s0", "data-t.txt-2-s0"]
    file = write_sweep(tmp_path / "opt.yaml", grid={"optimizer": ["adamw", {"optimizer": "lamb", "lr": 0.02}],
                                                    "layers": [1, 2]}, seeds=[3])
    plan = load_sweep(file, out=tmp_path / "out")
    assert plan.name == "opt"  # the file's name, not the last grid field's
    assert [r.name for r in plan.runs] == ["adamw-layers1-s3", "adamw-layers2-s3", "lamb-layers1-s3",
                                           "lamb-layers2-s3"]
    lamb = plan.runs[2]
    assert lamb.overrides["lr"] == 0.02 and lamb.overrides["seed"] == 3 and lamb.overrides["steps"] == 3
    assert plan.runs[0].overrides.get("lr") is None and not (tmp_path / "out").exists()
    lambs = [{"optimizer": "lamb", "lr": 0.01}, {"optimizer": "lamb", "lr": 0.03}]
    lrs = write_sweep(tmp_path / "lrs.yaml", name="lrs-named", grid={"optimizer": ["adamw", *lambs]})
    named = load_sweep(lrs, out=tmp_path / "o")
    assert named.name == "lrs-named" and [r.name for r in named.runs] == ["adamw-s0", "lamb-lr0.01-s0",
                                                                          "lamb-lr0.03-s0"]


def test_page_renders_degenerate_summaries():
    for summary in ({}, {"runs": [], "configs": []},
                    {"grid": {"norm": []}, "configs": [{"name": "<b>", "val_loss": {"mean": None}}],
                     "runs": [{"name": "<b>-s0", "config": "<b>", "status": "failed", "error": "<x>"}]}):
        page = render_sweep_html(summary)
        assert page.startswith("<!DOCTYPE html>") and "<b>-s0" not in page


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_before_any_run(tmp_path):
    file = write_sweep(tmp_path / "s.yaml", grid={"placement": ["pre"]})
    out = tmp_path / "out"
    try:
        import ray  # noqa: F401

        message = r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+"
    except ImportError:
        message = r"--backend ray needs Ray"
    with pytest.raises(LayerlabError, match=message):
        sweep(file, out=out, backend="ray", address=f"127.0.0.1:{_closed_port()}", echo=quiet)
    assert not out.exists()
    with pytest.raises(LayerlabError, match="--address is for --backend ray"):
        sweep(file, out=out, address="127.0.0.1:1", echo=quiet)


@pytest.mark.slow
def test_ray_backend_runs_a_local_cluster(tmp_path):
    pytest.importorskip("ray")
    file = write_sweep(tmp_path / "ray.yaml", grid={"placement": ["pre", "peri"]})
    out = tmp_path / "out"
    res = sweep(file, out=out, backend="ray", echo=quiet)
    assert res.failed == []
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["pre-s0", "peri-s0"]
    assert all(r["status"] == "finished" and r["layers"]["angular_distance"] for r in summary["runs"])


@pytest.mark.slow
def test_chromium_draws_the_sweep_page(swept, tmp_path):
    browser = pytest.importorskip("browser")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH")
    dom = browser.dump_dom(swept[1] / "sweep.html")
    loaded = re.search(r'data-plots-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == 3
