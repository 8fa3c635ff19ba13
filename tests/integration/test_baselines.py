"""`aligndistil train-dpo --loss simpo|tdpo2` end to end through the CLI on a tiny model: a model directory that
loads, its metrics, and the first step's loss pinned to a value computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aligndistil_cli.cli import main
from aligndistil_cli.config.files import build_config
from aligndistil_cli.config.stages import DpoConfig
from aligndistil_cli.rundir.artifacts import verify_full

PAIRS = 25
TRAIN = ["--epochs", "2", "--batch-size", "32", "--lr", "1e-3", "--max-length", "64", "--max-prompt-length", "32"]


def cli(*argv) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A random-init toy model and PAIRS pairs (each SFT answer against the next prompt's)."""
    w = tmp_path_factory.mktemp("baselines")
    cli("init-toy", "--out", w / "toy", "--num-sft", 64, "--hidden-size", 32, "--num-layers", 1, "--num-heads", 2,
        "--intermediate-size", 64)
    rows = [json.loads(line) for line in (w / "toy" / "sft.jsonl").read_text().splitlines()][: PAIRS + 1]
    pairs = [{"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]} for a, b in zip(rows, rows[1:])]
    (w / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:PAIRS]))
    return w


def train(toy: Path, loss: str, *extra) -> Path:
    out = toy / loss
    cli("train-dpo", "--loss", loss, "--model", toy / "toy" / "model", "--data", toy / "pairs.jsonl", "--out", out,
        *TRAIN, *extra)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_model_dir(out: Path, loss: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert verify_full(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-dpo" and manifest["config"]["loss"] == loss
    assert f"- {loss}" in (out / "README.md").read_text(), "the model card is tagged with the loss"
    return manifest


def plain_average_logps(model_dir: Path, toy: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's chosen and rejected mean response log-prob, one float64 forward per sequence."""
    from transformers import AutoModelForCausalLM

    from aligndistil_cli.data.encode import encode_pairs, load_data
    from aligndistil_cli.model.loading import load_tokenizer

    config = build_config(DpoConfig, {"model": str(model_dir), "data": str(toy / "pairs.jsonl"), "out": "unused",
                                      "max_length": 64, "max_prompt_length": 32})
    tokenizer = load_tokenizer(model_dir)
    rows, stats = load_data(config, "pairs")
    pairs, _ = encode_pairs(tokenizer, rows, config, stats)  # the data's encoding, not under test here
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    vocab = len(tokenizer)

    def average(e) -> float:
        ids = torch.tensor([e.prompt + e.response])
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=ids).logits[0, len(e.prompt) - 1 : -1, :vocab], -1)
        return log_p.gather(1, torch.tensor(e.response).unsqueeze(1)).mean().item()

    return (torch.tensor([average(c) for c, _ in pairs], dtype=torch.float64),
            torch.tensor([average(r) for _, r in pairs], dtype=torch.float64))


def test_simpo_through_the_cli(toy):
    out = train(toy, "simpo", "--simpo-gamma", "0.5")
    manifest = check_model_dir(out, "simpo")
    assert manifest["config"]["beta"] == 2.5, "SimPO's default beta (the official train_simpo.py's)"
    assert "ref_logps" not in manifest["inputs"], "SimPO has no reference"
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2]
    # Step 1 is every pair (batch 32 > 25 pairs) at the initial weights: mean of -log sigmoid(2.5 (a_w - a_l) - 0.5).
    a_w, a_l = plain_average_logps(toy / "toy" / "model", toy)
    expected = sum(math.log1p(math.exp(-(2.5 * (w - r) - 0.5))) for w, r in zip(a_w.tolist(), a_l.tolist())) / PAIRS
    assert steps[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert steps[0]["reward_chosen"] == pytest.approx(2.5 * a_w.mean().item(), abs=1e-5)


def test_tdpo2_through_the_cli(toy):
    out = train(toy, "tdpo2", "--tdpo-alpha", "0.3")
    manifest = check_model_dir(out, "tdpo2")
    assert manifest["config"]["beta"] == 0.1 and manifest["config"]["tdpo_alpha"] == 0.3
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2]
    # At step 1 the policy is the reference: u = 0 and both sequential KLs are 0, so the loss is log 2.
    assert steps[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert abs(steps[0]["kl_chosen"]) < 1e-5 and abs(steps[0]["kl_rejected"]) < 1e-5
    # After one update the policy has left the reference, and the KLs say so.
    assert steps[1]["kl_chosen"] > 1e-5 and steps[1]["kl_rejected"] > 1e-5
    assert steps[1]["loss"] != pytest.approx(math.log(2.0), abs=1e-6)
