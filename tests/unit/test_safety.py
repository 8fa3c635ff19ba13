"""Issues 12 and 22, Safety: stage names, pickle weights, Ctrl-C, a full disk, file modes and hostile YAML."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aligndistil_cli import cli
from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import SftConfig
from aligndistil_cli.core.errors import ConfigError, UserError
from aligndistil_cli.model.loading import load_model
from aligndistil_cli.orchestrate.pipeline import load_pipeline
from aligndistil_cli.rundir.artifacts import atomic_write_json
from aligndistil_cli.train import checkpoint


@pytest.mark.parametrize("name", ["../x", "/tmp/evil", "a/b", "..", ".hidden"])
def test_stage_names_that_leave_the_root_are_refused(tmp_path, name):
    path = tmp_path / "p.yaml"
    path.write_text(f'stages:\n  - name: "{name}"\n    stage: init-toy\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="plain identifier"):
        load_pipeline(path, root=tmp_path / "root")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_pickle_only_weights_are_refused_in_one_line(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "m")  # transformers 5 no longer writes .bin: the old layout, by hand
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickle form \(pytorch_model.bin\).*safe_serialization=True") as caught:
        load_model(tmp_path / "m", torch.device("cpu"))
    assert "\n" not in str(caught.value)
    tiny_llama().save_pretrained(tmp_path / "s")
    assert load_model(tmp_path / "s", torch.device("cpu")) is not None


@pytest.mark.parametrize("typer_converts", [False, True])
def test_ctrl_c_exits_130_naming_the_last_checkpoint(monkeypatch, capsys, tmp_path, typer_converts):
    def interrupted(**_):
        if typer_converts:  # what Typer does with a KeyboardInterrupt when standalone_mode is off
            return 130
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.setitem(checkpoint._saved, "last", tmp_path / "checkpoints" / "step-00000004")
    with pytest.raises(SystemExit) as code:
        cli.main(["sft"])
    assert code.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step-00000004" in err and "--resume" in err


@pytest.mark.parametrize("sharded", [False, True])
def test_full_disk_removes_the_half_written_checkpoint_and_says_so(monkeypatch, tmp_path, sharded):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as caught:
        checkpoint.save(tmp_path, 1, model, optimizer, scheduler, "h", keep=2, inputs={}, sharded=sharded)
    assert list((tmp_path / "checkpoints").iterdir()) == [], "the temporary checkpoint is cleaned up"
    line = cli.internal_error_line(caught.value)
    assert line.startswith("no space left on device (writing ") and "internal error" not in line


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings."""
    lines = ["  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


LIMITED = """import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))
from aligndistil_cli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["config", "pipeline"])
def test_alias_bomb_is_refused_in_bounded_memory(tmp_path, where):
    if where == "config":
        (tmp_path / "c.yaml").write_text("lora_target:\n" + alias_bomb())
        argv = ["sft", "--config", "c.yaml", "--model", ".", "--data", "d.jsonl", "--out", "o"]
    else:
        (tmp_path / "c.yaml").write_text("stages:\n  - stage: sft\n    with:\n      lora_target:\n"
                                         + alias_bomb().replace("  - ", "        - "))
        argv = ["run", "c.yaml", "--dry-run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LIMITED, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.startswith("error: c.yaml: its aliases expand it by more than") and done.stderr.count("\n") == 1


def test_a_type_error_shows_the_value_cut_short(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_target: [" + ", ".join(["x" * 1000] * 1000) + "]\n")
    with pytest.raises(ConfigError, match=r"'lora_target' must be str; got \[") as caught:
        load_config(SftConfig, tmp_path / "c.yaml", {"model": ".", "data": "d", "out": "o"})
    assert len(str(caught.value).partition(" got ")[2]) <= 100
