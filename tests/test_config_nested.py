"""Configs as pydantic models: optimizer settings nest by optimizer, the flat names of earlier versions still work."""

import json

import pytest

from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, TrainConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.recipe import resolve


def test_optimizer_settings_nest_and_flat_names_map_into_them():
    tc = TrainConfig(optimizer="llr", llr_every=5, lisa_layers=2, noise_s_max=3.0)
    assert (tc.llr.every, tc.lisa.layers, tc.noise.s_max) == (5, 2, 3.0)
    assert TrainConfig(llr={"every": 5}).llr == TrainConfig(llr_every=5).llr
    d = tc.to_dict()
    assert d["llr"]["every"] == 5 and "llr_every" not in d
    assert tc.flat_dict()["llr_every"] == 5 and "llr" not in tc.flat_dict()


def test_to_dict_round_trips_through_json():
    mc = ModelConfig(layers=3, width=96, heads=3, placement=["pre", "post", "peri"], drop_mlp=[0])
    tc = TrainConfig(optimizer="lisa", lisa_every=3, compile=False, data="x.txt")
    assert ModelConfig(**json.loads(json.dumps(mc.to_dict()))) == mc
    assert TrainConfig(**json.loads(json.dumps(tc.to_dict()))) == tc


def test_a_flat_layerlab_json_of_an_earlier_version_loads():
    saved = {**{k: v for k, v in TrainConfig().to_dict().items() if k not in ("llr", "noise", "lisa")},
             "llr_every": 7, "llr_ramp": 10, "llr_until": 0.2, "llr_s_min": 1.0, "llr_s_max": 3.0,
             "noise_s_min": 0.5, "noise_s_max": 2.0, "lisa_every": 20, "lisa_layers": 1}
    assert TrainConfig(**saved).llr.every == 7


def test_nested_and_dotted_names_on_the_command_line_and_in_yaml(tmp_path):
    assert check_fields(parse_extra(["--llr.every", "5", "--llr-s-max", "4"]), from_text=True) == \
        {"llr_every": 5, "llr_s_max": 4.0}
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  optimizer: llr\n  llr:\n    every: 3\n    s_min: 0.5\n")
    spec = resolve("debug", f, {"llr.ramp": 2})
    assert (spec.train.llr.every, spec.train.llr.s_min, spec.train.llr.ramp) == (3, 0.5, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: check_fields(parse_extra(["--llr.evry", "5"]), from_text=True, source="command line"),
     r"^unknown field 'llr\.evry' in command line; did you mean 'llr_every'\?$"),
    (lambda: check_fields({"lr": "abc"}, from_text=True, source="command line"),
     r"^field 'lr' in command line expects float, got 'abc'$"),
    (lambda: TrainConfig(llr={"every": "x"}), r"^field 'llr_every' in config expects int, got 'x'$"),
    (lambda: TrainConfig(lisa_every=0), r"^lisa_every must be at least 1, got 0$"),
    (lambda: TrainConfig(noise_s_min=3.0), r"^need 0 < noise_s_min <= noise_s_max, got 3.0 and 2.0$"),
    (lambda: ModelConfig(layers=True), r"^field 'layers' in config expects int, got True$"),
    (lambda: setattr(TrainConfig(), "steps", "many"), r"^field 'steps' in config expects int, got 'many'$"),
])
def test_errors_stay_one_line(call, message):
    with pytest.raises(LayerlabError, match=message):
        call()


def test_a_rejected_assignment_keeps_the_old_value():
    tc = TrainConfig(steps=5)
    with pytest.raises(LayerlabError, match="steps must be at least 1, got 0"):
        tc.steps = 0
    assert tc.steps == 5
