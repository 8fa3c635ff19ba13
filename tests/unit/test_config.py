"""Unit tests for aligndistil_cli.config.stages: defaults < YAML < flags, coercion, one-line errors naming the field."""

from __future__ import annotations

import pytest

from aligndistil_cli.config.files import build_config, load_config
from aligndistil_cli.config.stages import DistillConfig, DpoConfig, MakePrefsConfig, PrecomputeConfig, SftConfig
from aligndistil_cli.core.errors import ConfigError, UsageError

SFT_REQUIRED = {"out": "o", "model": "m", "data": "d.jsonl"}


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str, name: str = "config.yaml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(cls, config_file, overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, config_file, overrides)
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_yaml_then_flags(yaml_file):
    path = yaml_file("out: from_yaml\nmodel: m\ndata: d.jsonl\nlr: 0.01\nbatch_size: 4\nepochs: 3\n")
    cfg = load_config(SftConfig, path, {"lr": 0.5, "batch_size": None, "epochs": None, "seed": 7})
    assert cfg.lr == 0.5            # flag wins over YAML
    assert cfg.batch_size == 4      # a None flag does not override YAML
    assert cfg.epochs == 3
    assert cfg.seed == 7            # flag over default
    assert cfg.out == "from_yaml"
    assert cfg.max_length == 128    # untouched default
    assert cfg.weight_decay == 0.0


def test_flags_only(tmp_path):
    cfg = load_config(SftConfig, None, {**SFT_REQUIRED, "lr": None, "max_steps": 5})
    assert (cfg.out, cfg.model, cfg.data) == ("o", "m", "d.jsonl")
    assert cfg.lr == 1e-4
    assert cfg.max_steps == 5


def test_empty_yaml_is_no_keys(yaml_file):
    cfg = load_config(SftConfig, yaml_file(""), dict(SFT_REQUIRED))
    assert cfg.batch_size == 16


@pytest.mark.parametrize("text, expected", [("lr: 1e-3\n", 0.001), ("lr: 5E-4\n", 0.0005), ("lr: 1\n", 1.0)])
def test_yaml_float_coercion(yaml_file, text, expected):
    cfg = load_config(SftConfig, yaml_file(text), dict(SFT_REQUIRED))
    assert isinstance(cfg.lr, float)
    assert cfg.lr == expected


def test_yaml_int_and_bool_coercion(yaml_file):
    cfg = load_config(DpoConfig, yaml_file("batch_size: '8'\nreverse: yes\nmax_steps: 3.0\n"), dict(SFT_REQUIRED))
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.reverse is True
    assert cfg.max_steps == 3 and isinstance(cfg.max_steps, int)


@pytest.mark.parametrize("text, field", [("batch_size: 2.5\n", "batch_size"), ("lr: fast\n", "lr"),
                                         ("reverse: maybe\n", "reverse"), ("device: [a, b]\n", "device")])
def test_yaml_bad_type_names_field(yaml_file, text, field):
    message = config_error(DpoConfig, yaml_file(text), dict(SFT_REQUIRED))
    assert repr(field) in message


def test_unknown_yaml_key_did_you_mean(yaml_file):
    path = yaml_file("lrr: 0.1\n")
    message = config_error(SftConfig, path, dict(SFT_REQUIRED))
    assert str(path) in message
    assert "'lrr'" in message
    assert "did you mean 'lr'" in message


def test_unknown_key_without_close_match(yaml_file):
    message = config_error(SftConfig, yaml_file("zzzzqqq: 1\n"), dict(SFT_REQUIRED))
    assert "'zzzzqqq'" in message
    assert "did you mean" not in message


def test_unknown_key_via_build_config():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build_config(SftConfig, {**SFT_REQUIRED, "batchsize": 3})


@pytest.mark.parametrize(
    "cls, overrides, field",
    [
        (DpoConfig, {"beta": 0.0}, "beta"),
        (DpoConfig, {"beta": -1.0}, "beta"),
        (SftConfig, {"lr": 0.0}, "lr"),
        (SftConfig, {"lr": -1e-3}, "lr"),
        (SftConfig, {"batch_size": 0}, "batch_size"),
        (SftConfig, {"seed": -1}, "seed"),
        (SftConfig, {"warmup_ratio": 1.0}, "warmup_ratio"),
        (SftConfig, {"max_prompt_length": 128, "max_length": 128}, "max_prompt_length"),
        (MakePrefsConfig, {"num_samples": 1}, "num_samples"),
    ],
)
def test_bad_values_name_the_field(cls, overrides, field):
    message = config_error(cls, None, {**SFT_REQUIRED, **overrides})
    assert f"'{field}'" in message


def test_bad_value_from_yaml_names_the_field(yaml_file):
    message = config_error(DpoConfig, yaml_file("beta: -0.5\n"), dict(SFT_REQUIRED))
    assert "'beta'" in message and "-0.5" in message


def test_invalid_yaml_gives_line_number(yaml_file):
    # line 3 starts with a tab, which cannot start a YAML token
    path = yaml_file("lr: 0.1\nbatch_size: 4\n\tseed: 3\n")
    message = config_error(SftConfig, path, dict(SFT_REQUIRED))
    assert str(path) in message
    assert "invalid YAML" in message
    assert "line 3" in message


def test_yaml_not_a_mapping(yaml_file):
    message = config_error(SftConfig, yaml_file("- lr\n- 0.1\n"), dict(SFT_REQUIRED))
    assert "mapping" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(SftConfig, path, dict(SFT_REQUIRED))
    assert str(path) in message


def test_choice_error_lists_choices():
    message = config_error(PrecomputeConfig, None,
                           {"out": "o", "dpo": "d", "rev": "r", "data": "x", "variant": "nonsense"})
    assert "'variant'" in message and "aligndistil" in message


@pytest.mark.parametrize("variant", ["theorem1", "adaptive"])
def test_precompute_variant_needing_ref(variant):
    base = {"out": "o", "dpo": "d", "rev": "r", "data": "x", "variant": variant}
    message = config_error(PrecomputeConfig, None, base)
    assert "'ref'" in message and variant in message
    assert load_config(PrecomputeConfig, None, {**base, "ref": "sft"}).ref == "sft"


@pytest.mark.parametrize("variant", ["aligndistil", "contrastive"])
def test_precompute_variant_without_ref_ok(variant):
    cfg = load_config(PrecomputeConfig, None, {"out": "o", "dpo": "d", "rev": "r", "data": "x", "variant": variant})
    assert cfg.ref is None


@pytest.mark.parametrize(
    "cls, given, missing",
    [
        (SftConfig, {"out": "o", "data": "d"}, "model"),
        (SftConfig, {"out": "o", "model": "m"}, "data"),
        (SftConfig, {"model": "m", "data": "d"}, "out"),
        (SftConfig, {"out": "", "model": "m", "data": "d"}, "out"),
        (DistillConfig, {"out": "o", "student": "s", "data": "d"}, "cache"),
    ],
)
def test_missing_required_field_is_named(cls, given, missing):
    message = config_error(cls, None, given)
    assert f"'{missing}'" in message
    assert "required" in message
    assert f"--{missing}" in message


def test_yaml_type_error_names_the_file(yaml_file):
    path = yaml_file("lr: fast\n")
    assert config_error(SftConfig, path, SFT_REQUIRED).startswith(f"{path}: config field 'lr' must be float; got 'fast'")


@pytest.mark.parametrize("bad, problem", [("lr: fast", "config field 'lr' must be float; got 'fast'"),
                                          ("batch_size: 0", "config field 'batch_size' must be > 0")])
def test_pipeline_value_error_names_the_file_and_stage(tmp_path, bad, problem):
    from aligndistil_cli.orchestrate.pipeline import load_pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text("stages:\n"
                    "  - {name: sft, stage: sft, with: {model: m, data: d.jsonl}}\n"
                    f"  - {{name: dpo, stage: train-dpo, with: {{model: '{{sft}}', data: d.jsonl, {bad}}}}}\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert str(e.value).startswith(f"{path}: stage 2 (dpo): {problem}")
