"""The stage commands read as people expect: help in panels (inputs first) within 80 columns, choices listed,
TRL's option names (flags and YAML keys, a TRL DPOConfig file), and did-you-mean for the options people try."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from aligndistil_cli.cli import main
from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import DistillConfig, DpoConfig, EvaluateConfig, SftConfig
from aligndistil_cli.config.trl import alias_map
from aligndistil_cli.core.errors import ConfigError
from aligndistil_cli.stages import STAGES

TRAINING_STAGES = ["sft", "train-dpo", "train-reverse-dpo", "distill"]


def help_text(name: str) -> str:
    """`aligndistil NAME --help` as a user's 80-column terminal shows it."""
    out = subprocess.run([sys.executable, "-m", "aligndistil_cli", name, "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def panels(text: str) -> list[str]:
    return re.findall(r"^([A-Z][^\n]*):$", text, flags=re.M)


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {name: help_text(name) for name in STAGES}


def test_every_help_fits_80_columns(helps):
    for name, text in helps.items():
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert not wide, f"`{name} --help` has lines over 80 columns: {wide}"


def test_panels_inputs_first(helps):
    for name, text in helps.items():
        found = panels(text)
        assert found[0] == "Inputs and output", (name, found)
        assert found[-1] == "Other options", (name, found)  # --help
        inputs = text.split("Inputs and output:")[1].split("\n\n")[0]
        for f in dataclasses.fields(STAGES[name].config):
            if f.metadata.get("required"):
                assert f"--{f.metadata.get('flag') or f.name.replace('_', '-')}" in inputs, (name, f.name)
    assert panels(helps["distill"]) == [
        "Inputs and output", "Teacher", "On-policy sampling", "Training", "LoRA", "Speed and memory",
        "Checkpoints and resume", "Evaluation while training", "More than one GPU (torchrun)",
        "Reading models and data", "Logging and hub", "Run", "Other options"]


def test_choices_listed(helps):
    assert "--variant [aligndistil|contrastive|theorem1|adaptive]" in helps["distill"]
    assert "--mode [off-policy|on-policy]" in helps["distill"]
    assert "--format [auto|logits|hidden|topk]" in helps["precompute"]
    assert "--precision [auto|bf16|fp32]" in helps["sft"]
    # a list too long for the option column is written out in the help text instead
    assert "One of: auto, standard, conversational" in " ".join(helps["sft"].split())


@pytest.mark.parametrize("words,expected", [
    ("aligndistil distill --variant ", ["aligndistil", "contrastive", "theorem1", "adaptive"]),
    ("aligndistil distill --mode on", ["on-policy"]),
    ("aligndistil precompute --format ", ["auto", "logits", "hidden", "topk"]),
])
def test_choices_complete(capsys, monkeypatch, words, expected):
    """Shell completion offers an option's choices (bash's protocol, as the installed completion asks)."""
    monkeypatch.setenv("_ALIGNDISTIL_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - (0 if words.endswith(" ") else 1)))
    with pytest.raises(SystemExit) as e:
        main(words.split()[1:])
    assert e.value.code in (0, None)
    assert capsys.readouterr().out.split() == expected


def test_a_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--student", "s", "--data", "d", "--out", "o", "--variant", "aligndistill"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aligndistill" in err and "aligndistil" in err


TRL_FLAGS = {  # TRL's flag -> our config field (issue 24's list)
    "--learning-rate": "lr", "--num-train-epochs": "epochs", "--gradient-accumulation-steps": "grad_accum",
    "--output-dir": "out", "--warmup-ratio": "warmup_ratio", "--max-length": "max_length",
    "--max-prompt-length": "max_prompt_length", "--beta": "beta", "--seed": "seed", "--report-to": "report_to",
    "--push-to-hub": "push_to_hub", "--hub-model-id": "push_to_hub",
}
VALUES = {"lr": "0.002", "epochs": "3", "grad_accum": "2", "out": "runs/x", "warmup_ratio": "0.2", "max_length": "100",
          "max_prompt_length": "50", "beta": "0.2", "seed": "7", "report_to": "none", "push_to_hub": "me/model"}


@pytest.mark.parametrize("flag,field", sorted(TRL_FLAGS.items()))
def test_trl_flags_set_the_same_field(flag, field):
    """The flag, parsed by the real train-dpo command, sets the same config field as our own flag."""
    required = {"--model": "m", "--data": "d.jsonl", "--out": "o"}
    if flag == "--output-dir":
        required.pop("--out")
    argv = ["train-dpo", *[x for kv in required.items() for x in kv], flag, VALUES[field]]
    config = load_config(DpoConfig, None, _flags_of(argv))
    expected = load_config(DpoConfig, None, {**_flags_of(argv[:-2]), field: _typed(DpoConfig, field, VALUES[field])})
    assert getattr(config, field) == getattr(expected, field) == _typed(DpoConfig, field, VALUES[field])


def _typed(cls, field, text):
    tp = {f.name: f.type for f in dataclasses.fields(cls)}[field]
    return int(text) if "int" in str(tp) else float(text) if "float" in str(tp) else text


def _flags_of(argv: list[str]) -> dict:
    """The keyword arguments click hands the stage command for argv (parsed by the real command)."""
    import typer

    from aligndistil_cli.cli import app

    command = typer.main.get_command(app).commands[argv[0]]
    ctx = command.make_context(argv[0], argv[1:], resilient_parsing=True)
    params = dict(ctx.params)
    params.pop("config_file"), params.pop("ignore_unknown_keys")
    return params


def test_every_alias_is_a_flag_and_a_yaml_key(tmp_path):
    for cls in (SftConfig, DpoConfig, DistillConfig, EvaluateConfig):
        for alias, field in alias_map(cls).items():
            tp = {f.name: f.type for f in dataclasses.fields(cls)}[field]
            if "bool" in str(tp):
                continue
            value = VALUES.get(field, "4")
            path = tmp_path / "c.yaml"
            path.write_text(f"{alias}: {value}\n", encoding="utf-8")
            base = {"out": "o", "model": "m", "data": "d", "student": "s", "cache": "c", "ref": "r", "prompts": "p"}
            names = {f.name for f in dataclasses.fields(cls)}
            flags = {k: v for k, v in base.items() if k in names and k != field}
            assert getattr(load_config(cls, path, flags), field) == _typed(cls, field, value), (cls, alias)


TRL_DPO_YAML = """\
# A TRL DPOConfig, as trl dpo --config takes it
output_dir: runs/dpo-trl
learning_rate: 5.0e-7
num_train_epochs: 1
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
warmup_ratio: 0.1
beta: 0.1
max_length: 1024
max_prompt_length: 512
logging_steps: 10
save_steps: 200
seed: 42
bf16: true
lr_scheduler_type: cosine
loss_type: sigmoid
report_to: none
push_to_hub: true
hub_model_id: me/dpo-model
"""


def test_trl_dpo_config_file(tmp_path, monkeypatch):
    path = tmp_path / "dpo.yaml"
    path.write_text(TRL_DPO_YAML, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(DpoConfig, path, {"model": "m", "data": "d.jsonl"})
    assert str(e.value) == (f"{path}: keys that only TRL knows: bf16, loss_type, lr_scheduler_type; remove them, or "
                            "pass --ignore-unknown-keys to run without them")
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(DpoConfig, path, {"model": "m", "data": "d.jsonl"}, ignore_unknown_keys=True)
    assert (config.out, config.lr, config.epochs, config.grad_accum) == ("runs/dpo-trl", 5e-7, 1, 2)
    assert config.batch_size == 4 * 2 * 2  # per device x accumulation x processes: our global batch
    assert (config.log_every, config.save_every, config.seed, config.push_to_hub) == (10, 200, 42, "me/dpo-model")
    monkeypatch.delenv("WORLD_SIZE")
    flags = load_config(DpoConfig, path, {"model": "m", "data": "d.jsonl", "batch_size": 32}, ignore_unknown_keys=True)
    assert flags.batch_size == 32  # --batch-size on the command line wins over the file's per-device size


def test_trl_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "dpo.yaml"
    path.write_text(TRL_DPO_YAML, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["train-dpo", "--config", str(path), "--model", str(tmp_path / "missing"), "--data", "d.jsonl"])
    assert e.value.code == 2
    assert "keys that only TRL knows: bf16, loss_type, lr_scheduler_type" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("learning_rate: 1e-3\nlr: 1e-3\n", "'learning_rate' and 'lr' name the same option; give one"),
    ("per_device_train_batch_size: 4\nbatch_size: 8\n", "give batch_size (the global batch) or "
     "per_device_train_batch_size, not both"),
    ("push_to_hub: true\n", "push_to_hub: true needs hub_model_id"),
    ("learning-rate: 1e-3\n", "unknown config key 'learning-rate'; did you mean 'learning_rate'?"),
    ("learnin_rate: 1e-3\n", "did you mean 'learning_rate'?"),
])
def test_trl_key_mistakes(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(SftConfig, path, {"model": "m", "data": "d", "out": "o"})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_push_to_hub_false_pushes_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("push_to_hub: false\nhub_model_id: me/x\n", encoding="utf-8")
    assert load_config(SftConfig, path, {"model": "m", "data": "d", "out": "o"}).push_to_hub is None


@pytest.mark.parametrize("argv,meant", [
    (["train-dpo", "--learning_rate", "1e-3"], "did you mean --learning-rate?"),
    (["distill", "--model", "m"], "did you mean --student?"),
    (["sft", "--per-device-train-batch-size", "4"], "did you mean --batch-size, the global batch"),
    (["sft", "--lrr", "1"], "did you mean --lr?"),
])
def test_did_you_mean(capsys, argv, meant):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert meant in err, err
