"""Kill a stage with SIGKILL mid-run, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aligndistil_cli.config.files import build_config
from aligndistil_cli.stages import STAGES

STEPS = 24


def stage_values(runs: Path, source: str, out: Path, **extra) -> dict:
    values = json.loads((runs / source / "stage_config.json").read_text())
    return values | {"out": str(out)} | extra


def run_in_process(stage: str, values: dict) -> Path:
    return STAGES[stage].run(build_config(STAGES[stage].config, values))


def start_and_kill(stage: str, values: dict, tmp: Path, ready) -> None:
    """Run the stage as the CLI does, in a subprocess, and SIGKILL it once ready(out) holds."""
    cfg = tmp / f"{stage}.yaml"
    cfg.write_text(yaml.safe_dump(values))
    proc = subprocess.Popen([sys.executable, "-m", "aligndistil_cli", stage, "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(values["out"])
    deadline = time.monotonic() + 120
    while not ready(out):
        assert proc.poll() is None, f"{stage} finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "a killed stage must not look complete"


def has_checkpoint(out: Path) -> bool:
    return any((p / "state.json").is_file() for p in (out / "checkpoints").glob("step-*"))


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage,source,extra", [
    ("sft", "sft", {"batch_size": 16}),
    ("train-dpo", "dpo", {"batch_size": 4}),
    ("train-reverse-dpo", "rev", {"batch_size": 4}),
    ("distill", "student", {"batch_size": 4}),
])
def test_kill_and_resume_matches_uninterrupted(runs, tmp_path, stage, source, extra):
    common = {"max_steps": STEPS, "save_every": 3, "keep_checkpoints": 2, **extra}
    reference = run_in_process(stage, stage_values(runs, source, tmp_path / "ref", **common))
    killed = tmp_path / "killed"
    values = stage_values(runs, source, killed, **common)
    start_and_kill(stage, values, tmp_path, has_checkpoint)
    assert len(list((killed / "checkpoints").glob("step-*"))) <= 2
    resumed = run_in_process(stage, values | {"resume": True})
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["resumed_from"] > 0
    assert_same_weights(reference, resumed)
    assert metrics(resumed) == metrics(reference)
    assert not (resumed / "checkpoints").exists(), "checkpoints are removed once the stage is complete"


def test_precompute_resumes_at_shard_granularity(runs, tmp_path):
    values = stage_values(runs, "teacher", tmp_path / "killed", shard_mb=0.01, batch_size=2)
    reference = run_in_process("precompute", values | {"out": str(tmp_path / "ref")})
    start_and_kill("precompute", values, tmp_path, lambda out: len(list(out.glob("shard-*.safetensors"))) >= 2)
    resumed = run_in_process("precompute", values)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["metrics"]["shards_reused"] >= 2
    for shard in sorted(reference.glob("shard-*.safetensors")):
        a, b = load_file(shard), load_file(resumed / shard.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(runs, tmp_path):
    from aligndistil_cli.core.errors import UserError

    values = stage_values(runs, "sft", tmp_path / "s", max_steps=6, save_every=2, batch_size=16)
    start_and_kill("sft", values, tmp_path, has_checkpoint)
    with pytest.raises(UserError, match="different config"):
        run_in_process("sft", values | {"resume": True, "lr": 1e-2})


def replacement(runs: Path, tmp_path: Path, name: str) -> Path:
    """Another valid version of the input: the data less its last row, a trained model, a cache built with r = 5."""
    if name == "data":
        lines = (runs / "toy" / "sft.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / "other.jsonl").write_text("".join(lines[:-1]))
        return tmp_path / "other.jsonl"
    if name == "model":
        return runs / "sft"
    return run_in_process("precompute", stage_values(runs, "teacher", tmp_path / "other-cache", alpha_scale=5.0))


# Issue 22, 1 and 2: a resume never mixes the old and the new version of an input.
@pytest.mark.parametrize("name", ["data", "model", "cache"])
def test_resume_refuses_an_input_changed_since_the_checkpoint(runs, tmp_path, name):
    from aligndistil_cli.core.errors import UserError

    stage, source, original = {"data": ("sft", "sft", runs / "toy" / "sft.jsonl"),
                               "model": ("sft", "sft", runs / "toy" / "model"),
                               "cache": ("distill", "student", runs / "teacher")}[name]
    other = replacement(runs, tmp_path, name)
    given = tmp_path / "input" / original.name
    given.parent.mkdir()
    (shutil.copytree if original.is_dir() else shutil.copy)(original, given)
    values = stage_values(runs, source, tmp_path / "out", max_steps=STEPS, save_every=2, batch_size=4,
                          **{name: str(given)})
    start_and_kill(stage, values, tmp_path, has_checkpoint)
    shutil.rmtree(given) if given.is_dir() else given.unlink()
    (shutil.copytree if other.is_dir() else shutil.copy)(other, given)
    with pytest.raises(UserError, match=rf"another version of input '{name}' \({given}\): its content changed"):
        run_in_process(stage, values | {"resume": True})
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_same_seed_same_metrics(runs, tmp_path):
    values = stage_values(runs, "dpo", tmp_path / "a", max_steps=4, batch_size=4)
    a = run_in_process("train-dpo", values)
    b = run_in_process("train-dpo", values | {"out": str(tmp_path / "b")})
    assert metrics(a) == metrics(b)


def test_eval_every_logs_reward_and_kl_curves(runs, tmp_path):
    values = stage_values(runs, "dpo", tmp_path / "e", max_steps=4, batch_size=4, eval_every=2,
                          eval_prompts=str(runs / "toy" / "heldout_prompts.jsonl"), eval_num_prompts=8,
                          eval_max_new_tokens=8)
    out = run_in_process("train-dpo", values)
    evals = [m for m in metrics(out) if "eval_reward" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(-2.0 <= m["eval_reward"] <= 2.0 and m["eval_length"] > 0 for m in evals)


def test_on_policy_resume_is_exact_mid_rollout(runs, tmp_path):
    """--save-every 3 with 2 updates per rollout: a checkpoint inside a rollout would resample it with
    updated weights, so checkpoints fall on rollout boundaries and the resumed run matches."""
    values = {"mode": "on-policy", "student": str(runs / "sft"), "data": str(runs / "toy" / "prompts.jsonl"),
              "dpo": str(runs / "dpo"), "rev": str(runs / "rev"), "batch_size": 4, "max_steps": 12,
              "updates_per_rollout": 2, "save_every": 3, "keep_checkpoints": 2, "max_new_tokens": 12,
              "max_length": 64, "max_prompt_length": 32, "lr": 1e-2}
    reference = run_in_process("distill", values | {"out": str(tmp_path / "ref")})
    killed = tmp_path / "killed"
    start_and_kill("distill", values | {"out": str(killed)}, tmp_path, has_checkpoint)
    saved = [int(p.name.removeprefix("step-")) for p in (killed / "checkpoints").glob("step-*")]
    assert saved and all(step % 2 == 0 for step in saved), f"checkpoints inside a rollout: {saved}"
    resumed = run_in_process("distill", values | {"out": str(killed), "resume": True})
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["resumed_from"] > 0
    assert_same_weights(reference, resumed)
    # Training steps only: distill ends metrics.jsonl with a record of the final KL to the teacher.
    losses = [[m["loss"] for m in metrics(out) if "loss" in m] for out in (reference, resumed)]
    assert losses[0] and losses[0] == losses[1]


def cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """main(argv) -> (exit code, stdout, stderr lines)."""
    from aligndistil_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err.strip().splitlines()


# Issue 24, 1: --resume on a finished stage keeps it; a finished stage of another config or input is refused.
def test_resume_on_a_complete_stage_says_so_and_trains_nothing(runs, tmp_path, capsys):
    out = tmp_path / "s"
    values = stage_values(runs, "sft", out, max_steps=2, batch_size=16)
    run_in_process("sft", values)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    cfg = tmp_path / "sft.yaml"
    # log_every says how a run logs, not what it trains: a checkpoint resumes across it, and so does this
    cfg.write_text(yaml.safe_dump(values | {"log_every": 5}))
    code, stdout, err = cli(["sft", "--config", str(cfg), "--resume"], capsys)
    assert code == 0 and stdout == f"{out}\n", "stdout is the output directory, as after training"
    assert err == [f"sft: {out} is already complete (same config and inputs); nothing to resume (--force trains it "
                   "again)"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before


def test_resume_on_a_complete_stage_still_uploads_it(runs, tmp_path, capsys, monkeypatch):
    """The upload a first run could not do is what a --resume --push-to-hub of the complete output does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "s"
    values = stage_values(runs, "sft", out, max_steps=2, batch_size=16)
    run_in_process("sft", values)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(values))
    code, _, err = cli(["sft", "--config", str(cfg), "--resume", "--push-to-hub", "someone/sft"], capsys)
    assert code == 1 and err[0].startswith(f"sft: {out} is already complete")
    assert err[1] == (f"error: --push-to-hub someone/sft: {out} is saved and complete, but the upload needs the Hub and "
                      f"HF_HUB_OFFLINE is set; upload later with `hf upload someone/sft {out}`")


def test_resume_on_a_complete_stage_of_another_config_or_input_is_refused(runs, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    shutil.copy(runs / "toy" / "sft.jsonl", data)
    out = tmp_path / "s"
    values = stage_values(runs, "sft", out, max_steps=2, batch_size=16, data=str(data))
    run_in_process("sft", values)
    manifest = (out / "manifest.json").read_bytes()
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(values))
    code, stdout, err = cli(["sft", "--config", str(cfg), "--resume", "--lr", "0.01"], capsys)
    assert code == 1 and stdout == ""
    assert err == [f"error: --resume: {out} is already a complete sft output, but not of what is asked now (config "
                   "changed: lr); nothing to resume: pass --force to train it again"]
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    code, _, err = cli(["sft", "--config", str(cfg), "--resume"], capsys)
    assert code == 1 and len(err) == 1 and "(input changed: data)" in err[0]
    assert (out / "manifest.json").read_bytes() == manifest, "a refused --resume leaves the output as it was"
    code, stdout, _ = cli(["sft", "--config", str(cfg), "--force", "--lr", "0.01"], capsys)
    assert code == 0 and stdout == f"{out}\n"
    assert json.loads((out / "manifest.json").read_text())["config"]["lr"] == 0.01


def test_a_config_field_added_since_is_no_change_at_its_default(runs, tmp_path):
    """A manifest of an older version lacks the fields added since: at their defaults they change nothing, so
    an upgrade does not rerun every finished stage."""
    from aligndistil_cli.rundir.current import difference

    values = stage_values(runs, "sft", tmp_path / "s", max_steps=1, batch_size=16)
    out = run_in_process("sft", values)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["compile"], manifest["config"]["eval_every"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    config = build_config(STAGES["sft"].config, values)
    assert difference(config) is None
    assert difference(build_config(STAGES["sft"].config, values | {"compile": True})) == "config changed: compile"
