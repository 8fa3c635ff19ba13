"""What is on disk must be what the manifest says (issue 12): each test is a case a reviewer reproduced."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aligndistil_cli.config.files import build_config, load_config
from aligndistil_cli.config.stages import DistillConfig, DpoConfig, PrecomputeConfig, SftConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.orchestrate.pipeline import load_pipeline, run_file
from aligndistil_cli.rundir.artifacts import read_manifest, verify_full
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.stages import STAGES
from aligndistil_cli.teacher.cache import TeacherCache

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "pipelines" / "smoke.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def values_of(runs: Path, stage_dir: str, **extra) -> dict:
    return json.loads((runs / stage_dir / "stage_config.json").read_text()) | extra


def flip_byte(path: Path, offset: int = -5) -> None:
    """Overwrite one byte in place: same size, and the mtime put back, as a careless tool would leave it."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def sft_pipeline(runs: Path, path: Path, root: Path, **with_) -> Path:
    """A one-stage pipeline (SFT of the smoke toy model): seconds, yet a real `run`."""
    values = {"model": str(runs / "toy" / "model"), "data": str(runs / "toy" / "sft.jsonl"), "batch_size": 16,
              "lr": 3e-3, "max_length": 64, "max_prompt_length": 32, "max_steps": 2, **with_}
    path.write_text(yaml.safe_dump({"root": str(root), "seed": 0, "stages": [{"name": "sft", "stage": "sft",
                                                                               "with": values}]}))
    return path


# 1. A rerun of precompute never re-blesses a corrupted shard.
def test_precompute_rerun_recomputes_a_corrupted_shard(runs, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", copy)
    victim = sorted(copy.glob("shard-*.safetensors"))[1]
    original = victim.read_bytes()
    flip_byte(victim)
    with pytest.raises(UserError, match=f"{victim.name} is corrupted.*rerun precompute"):
        cache = TeacherCache(copy)
        cache.fetch([cache.shards[1]["row_start"]])
    # Follow the message's advice.
    STAGES["precompute"].run(load_config(PrecomputeConfig, None, values_of(runs, "teacher", out=str(copy))))
    assert victim.read_bytes() == original, "the corrupted shard was recomputed, not reused"
    manifest = read_manifest(copy)
    assert manifest["metrics"]["shards_reused"] == manifest["metrics"]["shards"] - 1
    assert verify_full(copy) == []


# 2. Every file of a cache is checked when distill opens it, not only the shards.
def test_cache_index_edit_is_refused_on_open(runs, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", copy)
    index = copy / "index.json"
    text = index.read_text()
    assert '"temperature": 1.0' in text
    index.write_text(text.replace('"temperature": 1.0', '"temperature": 9.0'))
    with pytest.raises(UserError, match="index.json differs from its manifest"):
        TeacherCache(copy)


def test_cache_heads_edit_is_refused_on_open(runs, tmp_path):
    values = values_of(runs, "teacher", out=str(tmp_path / "hidden"), format="hidden")
    out = STAGES["precompute"].run(load_config(PrecomputeConfig, None, values))
    TeacherCache(out)
    flip_byte(out / "heads.safetensors")
    with pytest.raises(UserError, match="heads.safetensors differs from its manifest"):
        TeacherCache(out)


# 3. Input models are checked against their manifest's hashes, not only fingerprinted from it.
def test_distill_notices_dpo_weights_overwritten_in_place(runs, tmp_path):
    teacher = values_of(runs, "teacher")
    dpo = tmp_path / "dpo"
    shutil.copytree(teacher["dpo"], dpo)
    flip_byte(dpo / "model.safetensors")
    values = values_of(runs, "student", dpo=str(dpo), rev=teacher["rev"], max_steps=1, out=str(tmp_path / "s"))
    with pytest.raises(UserError, match="model.safetensors differs from its manifest"):
        STAGES["distill"].run(load_config(DistillConfig, None, values))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_run_redoes_a_stage_whose_weights_were_overwritten(runs, tmp_path, capsys):
    pipe = sft_pipeline(runs, tmp_path / "p.yaml", tmp_path / "root")
    run_file(pipe)
    weights = tmp_path / "root" / "sft" / "model.safetensors"
    original = weights.read_bytes()
    flip_byte(weights)
    capsys.readouterr()
    run_file(pipe)
    err = capsys.readouterr().err
    assert "run sft" in err and "skip sft" not in err
    assert weights.read_bytes() == original, "the rerun trains the same weights again"
    assert verify_full(tmp_path / "root" / "sft") == []


# 4. A directory of ours without a manifest is unfinished; a plain HF directory is still accepted.
def test_model_dir_without_manifest_is_refused(runs, tmp_path):
    unfinished = tmp_path / "dpo"
    shutil.copytree(runs / "dpo", unfinished)
    (unfinished / "manifest.json").unlink()
    values = values_of(runs, "sft", model=str(unfinished), max_steps=1, out=str(tmp_path / "s"))
    with pytest.raises(UserError, match="unfinished"):
        STAGES["sft"].run(load_config(SftConfig, None, values))
    plain = tmp_path / "plain"
    shutil.copytree(runs / "toy" / "model", plain)  # save_pretrained output, no aligndistil files
    out = STAGES["sft"].run(load_config(SftConfig, None, values | {"model": str(plain), "out": str(tmp_path / "ok")}))
    assert read_manifest(out)["inputs"]["model"]["path"] == str(plain)


def test_finalize_writes_the_manifest_before_dropping_checkpoints(runs, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    shutil.copytree(runs / "sft", out)
    (out / "manifest.json").unlink()
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    config = build_config(SftConfig, values_of(runs, "sft", out=str(out)))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while deleting the checkpoints

    import aligndistil_cli.rundir.finish as finish

    monkeypatch.setattr(finish.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        finalize(out, "sft", config, {})
    assert read_manifest(out)["complete"] is True


# 5. One process per output directory: a second one is refused with the holder's PID.
def test_second_run_on_the_same_root_is_refused(runs, tmp_path):
    pipe = sft_pipeline(runs, tmp_path / "p.yaml", tmp_path / "root", max_steps=None, epochs=1000, save_every=5)
    cmd = [sys.executable, "-m", "aligndistil_cli", "run", str(pipe)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "root" / "sft" / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"PID {first.pid}" in errors[0], second.stderr
        assert first.poll() is None, "the first run goes on undisturbed"
    finally:
        first.kill()
        first.wait()


# 6 is in test_resume.py (on-policy resume at a rollout boundary).


def kill_when_checkpointed(pipe: Path, out: Path) -> None:
    """Start `aligndistil run pipe` and SIGKILL it once the stage writing out has a complete checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "aligndistil_cli", "run", str(pipe)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any((p / "state.json").is_file() for p in (out / "checkpoints").glob("step-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# 7. After a kill, a changed pipeline: a one-line way out, and --force starts over.
def test_force_discards_a_stale_checkpoint(runs, tmp_path):
    root = tmp_path / "root"
    pipe = sft_pipeline(runs, tmp_path / "p.yaml", root, max_steps=None, epochs=1000, save_every=2)
    kill_when_checkpointed(pipe, root / "sft")
    changed = sft_pipeline(runs, tmp_path / "p2.yaml", root, max_steps=4, lr=1e-3)
    with pytest.raises(UserError) as refused:
        run_file(changed)
    assert "--force" in str(refused.value) and "--resume" not in str(refused.value)
    run_file(changed, force=True)
    assert read_manifest(root / "sft")["metrics"]["resumed_from"] == 0
    clean = sft_pipeline(runs, tmp_path / "p3.yaml", tmp_path / "clean", max_steps=4, lr=1e-3)
    run_file(clean)
    assert (root / "sft" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "sft" / "model.safetensors").read_bytes()


# 8. Cache keys are content and paths relative to the root: a moved run directory is still up to date.
def test_moved_root_skips_every_stage(runs, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(runs, moved)
    capsys.readouterr()
    run_file(SMOKE, root=moved)
    lines = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("skip ") for line in lines) == len(load_pipeline(SMOKE, moved))
    assert not any(line.startswith("run ") for line in lines)


# Input 7 / integrity 8: a stage never adopts a directory it did not write.
def test_stage_refuses_another_stages_finished_directory(runs, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", teacher)
    before = sorted(p.name for p in teacher.iterdir())
    values = values_of(runs, "dpo", out=str(teacher), max_steps=1)
    with pytest.raises(UserError, match="holds the output of stage precompute"):
        STAGES["train-dpo"].run(build_config(DpoConfig, values))
    assert sorted(p.name for p in teacher.iterdir()) == before
    assert verify_full(teacher) == []


def test_stage_refuses_an_unrelated_directory_unless_forced(runs, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "notes.txt").write_text("mine\n")
    (other / "sub").mkdir()
    (other / "sub" / "data.csv").write_text("a,b\n")
    values = values_of(runs, "sft", out=str(other), max_steps=1)
    with pytest.raises(UserError, match="not empty.*--force"):
        STAGES["sft"].run(build_config(SftConfig, values))
    assert (other / "checkpoints").is_dir() and (other / "notes.txt").is_file() and (other / "sub" / "data.csv").is_file()
    out = STAGES["sft"].run(build_config(SftConfig, values | {"force": True}))
    assert not {"notes.txt", "sub/data.csv"} & set(read_manifest(out)["outputs"])
    assert verify_full(out) == []


def test_verify_fails_a_directory_with_files_its_stage_does_not_write(runs, tmp_path):
    mixed = tmp_path / "dpo"
    shutil.copytree(runs / "dpo", mixed)
    for name in ("index.json", "shard-00000.safetensors"):
        shutil.copy(runs / "teacher" / name, mixed / name)
    # The manifest a stage used to write over a finished precompute directory: it listed the shards.
    finalize(mixed, "train-dpo", build_config(DpoConfig, values_of(runs, "dpo", out=str(mixed))), {})
    assert {"index.json", "shard-00000.safetensors"} <= set(read_manifest(mixed)["outputs"])
    problems = verify_full(mixed)
    assert any(p.startswith("index.json: not a file that stage train-dpo writes") for p in problems), problems
    assert any(p.startswith("shard-00000.safetensors: not a file") for p in problems), problems
    extra = tmp_path / "sft"
    shutil.copytree(runs / "sft", extra)
    (extra / "notes.txt").write_text("added later\n")
    assert verify_full(extra) == ["notes.txt: not listed in the manifest"]


# Issue 22, 5 and 6: --force never deletes (or writes into) one of the stage's own inputs.
@pytest.mark.parametrize("relation", ["is", "contains", "is inside"])
def test_force_refuses_an_out_that_overlaps_an_input(runs, tmp_path, relation):
    shutil.copytree(runs / "sft", tmp_path / "model")
    (tmp_path / "data").mkdir()
    shutil.copy(runs / "toy" / "sft.jsonl", tmp_path / "data" / "sft.jsonl")
    stage, flag, out = {"is": ("train-dpo", "--model", tmp_path / "model"),
                        "contains": ("sft", "--data", tmp_path / "data"),
                        "is inside": ("sft", "--model", tmp_path / "model" / "sub")}[relation]
    values = values_of(runs, "dpo" if stage == "train-dpo" else "sft", model=str(tmp_path / "model"),
                       out=str(out), force=True, max_steps=1)
    if stage == "sft":
        values["data"] = str(tmp_path / "data" / "sft.jsonl")
    with pytest.raises(UserError, match=f"--out {out} {relation} the stage's input {flag} ") as caught:
        STAGES[stage].run(build_config(STAGES[stage].config, values))
    assert "\n" not in str(caught.value)
    assert verify_full(tmp_path / "model") == []
    assert (tmp_path / "data" / "sft.jsonl").read_bytes() == (runs / "toy" / "sft.jsonl").read_bytes()
    assert not (tmp_path / "model" / "sub").exists()


def dry_run_reasons(pipe: Path, capsys) -> str:
    capsys.readouterr()
    run_file(pipe, dry_run=True)
    return " ".join(capsys.readouterr().err.split())


# Issue 22, 3: after a kill, a stage whose input changed starts over instead of resuming on the old one.
def test_run_starts_over_a_stage_whose_input_changed_since_its_checkpoint(runs, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    shutil.copy(runs / "toy" / "sft.jsonl", data)
    root = tmp_path / "root"
    pipe = sft_pipeline(runs, tmp_path / "p.yaml", root, data=str(data), max_steps=40, save_every=2)
    kill_when_checkpointed(pipe, root / "sft")
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    assert re.search(r"run sft \(sft\): unfinished \(no manifest\); input data changed since its checkpoint at "
                     r"step \d+: starts over", dry_run_reasons(pipe, capsys))
    run_file(pipe)
    assert read_manifest(root / "sft")["metrics"]["resumed_from"] == 0
    run_file(sft_pipeline(runs, tmp_path / "clean.yaml", tmp_path / "clean", data=str(data), max_steps=40, save_every=2))
    assert (root / "sft" / "model.safetensors").read_bytes() == (tmp_path / "clean" / "sft" / "model.safetensors").read_bytes()


def prefs_dpo_pipeline(runs: Path, path: Path, root: Path, max_prompts: int) -> Path:
    path.write_text(yaml.safe_dump({"root": str(root), "seed": 0, "stages": [
        {"name": "prefs", "stage": "make-prefs",
         "with": {"model": str(runs / "sft"), "data": str(runs / "toy" / "prompts.jsonl"), "num_samples": 3,
                  "max_prompts": max_prompts, "max_new_tokens": 16}},
        {"name": "dpo", "stage": "train-dpo",
         "with": {"model": str(runs / "sft"), "data": "{prefs}/pairs.jsonl", "max_steps": 40, "save_every": 2,
                  "batch_size": 4, "lr": 1e-3, "max_length": 64, "max_prompt_length": 32}}]}))
    return path


def test_run_starts_over_a_stage_whose_upstream_reran_since_its_checkpoint(runs, tmp_path, capsys):
    root = tmp_path / "root"
    kill_when_checkpointed(prefs_dpo_pipeline(runs, tmp_path / "p.yaml", root, max_prompts=16), root / "dpo")
    pairs = (root / "prefs" / "pairs.jsonl").read_bytes()
    changed = prefs_dpo_pipeline(runs, tmp_path / "p2.yaml", root, max_prompts=24)
    assert re.search(r"run dpo \(train-dpo\): unfinished \(no manifest\); resumes from its checkpoint at step \d+, "
                     r"or starts over if prefs changes its inputs", dry_run_reasons(changed, capsys))
    run_file(changed)
    assert (root / "prefs" / "pairs.jsonl").read_bytes() != pairs
    assert read_manifest(root / "dpo")["metrics"]["resumed_from"] == 0
    _, _, config = load_pipeline(changed)[1]
    clean = STAGES["train-dpo"].run(dataclasses.replace(config, out=str(tmp_path / "clean")))
    assert (root / "dpo" / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs: room for a stage's small files but not for its weights. Skipped where mounting is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    # Lazily: the failed stage's process (this one) still holds its lock on the output directory's marker.
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


# Issue 22, 8: safetensors' own write error on a full disk is the README's one line, not an internal error.
def test_full_disk_names_the_weights_file(runs, tmp_path, tiny_disk, capsys):
    from aligndistil_cli.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values_of(runs, "sft", out=str(tiny_disk / "sft"), max_steps=1, save_every=0)))
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--config", str(config)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 1
    assert errors == [f"error: no space left on device (writing {tiny_disk / 'sft' / 'model.safetensors'})"]
    assert not (tiny_disk / "sft" / "manifest.json").exists()


# Issue 22, 9: a plain Hugging Face directory whose config.json contradicts its weights is one line naming both.
def test_plain_model_dir_whose_config_contradicts_its_weights_is_one_line(runs, tmp_path, capsys):
    from aligndistil_cli.cli import main

    model = tmp_path / "model"
    shutil.copytree(runs / "toy" / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--model", str(model), "--data", str(runs / "toy" / "sft.jsonl"), "--out", str(tmp_path / "o")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 1
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot load a model from {model}: {model}/model.safetensors "
                                                     f"holds ") and f"but {model}/config.json gives it" in errors[0]


# Issue 22, 10: every output is 0666 less the umask, model.safetensors too.
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_outputs_get_0666_less_the_umask(runs, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = STAGES["sft"].run(build_config(SftConfig, values_of(runs, "sft", out=str(tmp_path / "sft"), max_steps=1)))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
    # The smoke pipeline ran under the test's own umask: every stage's outputs follow it.
    every = {str(p.relative_to(runs)): oct(stat.S_IMODE(p.stat().st_mode)) for p in runs.rglob("*") if p.is_file()}
    assert {mode for mode in every.values()} == {oct(0o666 & ~old)}, every
