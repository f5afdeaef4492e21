"""Configs: presets, YAML, overrides, and one-line errors for bad fields."""

import pytest

from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, TrainConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.recipe import preset_names, read_preset, resolve


def test_presets_exist_and_default_is_tiny():
    assert {"debug", "tiny", "small"} <= set(preset_names())
    spec = resolve()
    assert spec.preset == "tiny" and spec.model.width == 256 and spec.model.layers == 4


def test_small_preset_is_about_25m_parameters():
    import layerlab
    from layerlab.model import num_params

    spec = resolve("small")
    n = num_params(layerlab.build_model(spec.model))
    assert 20e6 < n < 30e6


def test_yaml_sections_or_flat_and_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  layers: 6\n  norm: dyt\ntrain:\n  steps: 7\nlr: 0.01\n")
    spec = resolve("debug", f, {"steps": 9})
    assert spec.model.layers == 6 and spec.model.norm == "dyt" and spec.train.lr == 0.01
    assert spec.train.steps == 9 and spec.model.width == 64  # from the preset


def test_wrong_type_is_one_line_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("layers: many\n")
    with pytest.raises(LayerlabError, match="field 'layers' in .* expects int, got 'many'"):
        resolve(None, f)
    with pytest.raises(LayerlabError, match="expects bool"):
        check_fields({"tie_embeddings": "maybe"}, from_text=True)


def test_unknown_field_lists_valid_fields():
    with pytest.raises(LayerlabError, match=r"^unknown field 'colour' in config; valid fields: .*layers") as e:
        check_fields({"colour": 3})
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("name, close", [
    ("placment", "placement"), ("layres", "layers"), ("lr_", "lr"), ("mix-alpa", "mix_alpha"),
    ("lerning_rate", "lr"), ("learning_rate", "lr"), ("num_layers", "layers"), ("d_model", "width"),
])
def test_misspelt_field_suggests_the_closest(name, close):
    with pytest.raises(LayerlabError) as e:
        check_fields({name: "1"}, from_text=True, source="sweeps/x.yaml")
    assert str(e.value) == f"unknown field {name!r} in sweeps/x.yaml; did you mean {close!r}?"


def test_misspelt_field_on_the_command_line_and_in_a_config_file(tmp_path):
    with pytest.raises(LayerlabError, match=r"^unknown field 'placment' in command line; did you mean 'placement'\?$"):
        check_fields(parse_extra(["--placment", "peri"]), from_text=True, source="command line")
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  placment: peri\n")
    with pytest.raises(LayerlabError, match=r"^unknown field 'placment' in .*c\.yaml; did you mean 'placement'\?$"):
        resolve(None, f)


def test_unknown_choice_suggests_the_closest():
    with pytest.raises(LayerlabError, match=r"^unknown norm 'rmsnrom'; valid: .*; did you mean 'rmsnorm'\?$"):
        ModelConfig(norm="rmsnrom")
    with pytest.raises(LayerlabError, match=r"^unknown placement 'peir'; valid: .*; did you mean 'peri'\?$"):
        ModelConfig(placement="peir")
    with pytest.raises(LayerlabError, match=r"per-block schedule 'psot'; valid: .*; did you mean 'post'\?$"):
        ModelConfig(layers=2, placement=["pre", "psot"])
    with pytest.raises(LayerlabError, match=r"^unknown optimizer 'lamd'; valid: .*; did you mean 'lamb'\?$"):
        TrainConfig(optimizer="lamd")
    with pytest.raises(LayerlabError, match=r"^unknown preset 'tiyn'; valid: .*; did you mean 'tiny'\?$"):
        read_preset("tiyn")
    with pytest.raises(LayerlabError, match=r"^unknown mlp 'swigul'; valid: gelu, moe, swiglu; "
                                            r"did you mean 'swiglu'\?$"):
        ModelConfig(mlp="swigul")
    with pytest.raises(LayerlabError) as e:  # nothing close: only the valid names
        ModelConfig(norm="fancy")
    assert "did you mean" not in str(e.value) and "valid: " in str(e.value)


def test_text_values_are_parsed_by_type():
    out = check_fields({"lr": "1e-3", "layers": "8", "tie_embeddings": "false", "placement": "pre,post",
                        "compile": "null", "data": "corpus.txt"}, from_text=True)
    assert out == {"lr": 1e-3, "layers": 8, "tie_embeddings": False, "placement": ["pre", "post"],
                   "compile": None, "data": "corpus.txt"}


def test_unknown_preset_and_missing_file():
    with pytest.raises(LayerlabError, match="unknown preset 'huge'; valid: debug"):
        resolve("huge")
    with pytest.raises(LayerlabError, match="config file not found"):
        resolve(None, "/nonexistent.yaml")


def test_parse_extra_arguments():
    assert parse_extra(["--lr", "0.1", "--mlp=swiglu"]) == {"lr": "0.1", "mlp": "swiglu"}
    with pytest.raises(LayerlabError, match="option --lr needs a value"):
        check_fields(parse_extra(["--lr"]), from_text=True)
    # a boolean field written alone is switched on (--early-exit-loss), before another option or at the end
    fields = check_fields(parse_extra(["--early-exit-loss", "--tie-embeddings", "false", "--bias"]), from_text=True)
    assert fields == {"early_exit_loss": True, "tie_embeddings": False, "bias": True}


def test_subln_is_an_alias_of_sandwich():
    assert ModelConfig(placement="subln").placement == "sandwich"
