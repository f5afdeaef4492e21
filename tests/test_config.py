"""Configs: presets, YAML, overrides, and one-line errors for bad fields."""

import pytest

from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, check_fields, preset_names, resolve
from layerlab.errors import LayerlabError


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
    with pytest.raises(LayerlabError, match="unknown field 'layres'.*valid fields: .*layers"):
        check_fields({"layres": 3})


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
    with pytest.raises(LayerlabError, match="needs a value"):
        parse_extra(["--lr"])


def test_subln_is_an_alias_of_sandwich():
    assert ModelConfig(placement="subln").placement == "sandwich"
