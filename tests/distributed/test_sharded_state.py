"""Sharded state on 2 gloo ranks: sharded checkpoints across world sizes, and train-dpo's sharded reference
(its log-probs, and the host memory of the ranks that do not read the weights)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_torchrun import (
    ENV,
    HERE,
    TRAIN,
    assert_same_weights,
    metrics,
    run_in_process,
    stage_values,
    torchrun,
    write_big_model,
)

from aligndistil_cli.config.files import build_config
from aligndistil_cli.parallel import distributed


def assert_pickle_free(directory: Path) -> None:
    """Every file under directory is JSON or safetensors (a JSON header, then the tensors' bytes): none needs
    unpickling to read, and none is named as a pickle or starts with the pickle magic, except where the
    magic byte is the low byte of a safetensors header's length."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert files
    for file in files:
        data = file.read_bytes()
        assert file.suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle") and ".metadata" not in file.name, file
        if file.suffix == ".json":
            json.loads(data)
            assert not data.startswith(b"\x80"), file
            continue
        assert file.suffix == ".safetensors", file
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        assert 8 + size + max(ends, default=0) == len(data), file


def test_sharded_checkpoints_resume_across_world_sizes(world, tmp_path):
    """sft (tied model, uneven data) stopped after its step-2 checkpoint: sharded on 2 ranks, full on 2 ranks,
    sharded on 1 process. Each resumes on the other world size and ends where the uninterrupted one-process
    run does; the sharded and the full checkpoint of the same run resume to the same weights."""
    from run_stages import interrupted_after_first_checkpoint

    values = {**stage_values(world, "one")["sft"], "save_every": 2}
    runs = {"two-sharded": "sharded", "two-full": "full", "one-sharded": "sharded"}
    run = {name: {**values, "checkpoint_format": fmt, "out": str(tmp_path / name)} for name, fmt in runs.items()}
    step2 = {name: tmp_path / name / "checkpoints" / "step-00000002" for name in runs}
    with interrupted_after_first_checkpoint():
        run_in_process("sft", run["one-sharded"])
    assert_pickle_free(step2["one-sharded"])
    launch = {"sft/interrupted-sharded": run["two-sharded"], "sft/interrupted-full": run["two-full"],
              "sft/resumed": {**run["one-sharded"], "resume": True}}  # 1 -> 2
    args = []
    for i, (stage, config) in enumerate(launch.items()):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(config))
        args.append(f"{stage}={tmp_path / f'{i}.yaml'}")
    done = subprocess.run(torchrun(str(HERE / "run_stages.py"), *args), env=ENV, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = step2["two-sharded"]
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert {p.name for p in sharded.iterdir()} == {"shards", "rng.safetensors", "state.json"}
    state = json.loads((sharded / "state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2
    assert_pickle_free(sharded)
    for name in ("two-sharded", "two-full"):  # 2 -> 1
        run_in_process("sft", {**run[name], "resume": True})
    for name in runs:
        out = tmp_path / name
        assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from"] == 2, name
        assert_same_weights(world / "one" / "sft", out, atol=2e-5)
        for a, b in zip(metrics(world / "one" / "sft"), metrics(out), strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), (name, a["step"])
    assert_same_weights(tmp_path / "two-full", tmp_path / "two-sharded", atol=0)


def test_sharded_reference_scores_as_the_whole_model(world):
    """The reference log-probs of 2 ranks, each scoring its share with the sharded reference (rank 1 running a
    throwaway batch to keep in step), are the whole model's on the same shares in one process, bit for bit."""
    from aligndistil_cli.config.stages import DpoConfig
    from aligndistil_cli.data.encode import encode_pairs, load_data
    from aligndistil_cli.model.loading import load_tokenizer
    from aligndistil_cli.stages import dpo

    config = build_config(DpoConfig, stage_values(world, "two")["train-dpo"] | {"data": str(world / "pairs-17.jsonl")})
    tokenizer = load_tokenizer(config.model)
    rows, stats = load_data(config, "pairs")
    pairs, _ = encode_pairs(tokenizer, rows, config, stats)
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: sums over other thread counts round differently
    try:
        model, pack = dpo.load_reference(config, cpu, "train-dpo")
        shares = [dpo.reference_logps(model, distributed.share(pairs, r, 2), tokenizer.pad_token_id, len(tokenizer),
                                      config.chunk_size, config.batch_size, cpu, pack) for r in range(2)]
    finally:
        torch.set_num_threads(threads)
    [cache] = (world / "two" / "ref-lockstep").glob("*.safetensors")
    two = load_file(cache)
    for k in ("chosen", "rejected"):
        assert torch.equal(torch.cat([s[k] for s in shares]), two[k]), k


def test_train_dpo_holds_no_whole_model_off_rank_0(world, tmp_path):
    """train-dpo under torchrun shards its reference and its policy: through loading and the reference pass
    (until training begins) rank 1 never holds a whole copy of the model, while rank 0, which reads the
    weights, does. (Before, every rank scored the reference with the whole model.) glibc is told to hand
    freed blocks back (MALLOC_MMAP_THRESHOLD_); it otherwise keeps freed blocks of up to 32 MB, and the RSS
    then counts memory the process no longer uses. The model is deep and its vocabulary small: what a
    sharded forward gathers at a time (a layer) is then small beside a rank's half of the model."""
    model_bytes = write_big_model(world / "toy" / "model", tmp_path / "deep", num_hidden_layers=14, vocab_size=128)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({**TRAIN, "max_steps": 1, "model": str(tmp_path / "deep"),
                                      "data": str(world / "pairs.jsonl"), "out": str(tmp_path / "dpo")}))
    done = subprocess.run(torchrun(str(HERE / "run_stages.py"), f"dpo-rss={config}"),
                          env={**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(Path(f"{config}-rss.json").read_text())
    assert ranks[0]["before_training"] > model_bytes, (ranks, model_bytes)
    assert ranks[1]["before_training"] < model_bytes, (ranks, model_bytes)
