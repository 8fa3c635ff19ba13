"""--reward-model: a sequence-classification model scores make-prefs pairs and evaluation samples."""

from __future__ import annotations

import json

import pytest
import torch

from aligndistil_cli.config.stages import EvaluateConfig, MakePrefsConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data import toy
from aligndistil_cli.stages import evaluate, make_prefs


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm") / "rm"
    tok = toy.build_tokenizer()
    cfg = toy.model_config(len(tok), 32, 1, 2, 64, 32)
    cfg.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def direct_score(path, prompt: str, response: str) -> float:
    """The reward model's output on "prompt\\nresponse" (no chat template), computed without the scorer."""
    from transformers import AutoModelForSequenceClassification

    tok = toy.build_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tok(f"{prompt}\n{response}", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


def test_make_prefs_pairs_are_ranked_by_the_reward_model(runs, reward_model, tmp_path):
    out = make_prefs.run(MakePrefsConfig(out=str(tmp_path / "p"), model=str(runs / "sft"),
                                         data=str(runs / "toy" / "prompts.jsonl"), num_samples=3, max_prompts=6,
                                         max_new_tokens=12, reward_model=str(reward_model)))
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for p in pairs[:3]:
        assert p["score_chosen"] > p["score_rejected"]
        assert p["score_chosen"] == pytest.approx(direct_score(reward_model, p["prompt"], p["chosen"]), abs=1e-4)
    assert "reward model" in json.loads((out / "manifest.json").read_text())["metrics"]["scorer"]


def test_evaluate_reports_reward_model_scores(runs, reward_model, tmp_path):
    out = evaluate.run(EvaluateConfig(out=str(tmp_path / "e"), ref=str(runs / "sft"), models={"dpo": str(runs / "dpo")},
                                      prompts=str(runs / "toy" / "heldout_prompts.jsonl"), num_prompts=8,
                                      max_new_tokens=8, reward_model=str(reward_model)))
    report = json.loads((out / "report.json").read_text())
    assert "reward model" in report["task"]
    assert set(report["models"]) == {"reference", "dpo"}


def test_a_causal_lm_is_not_a_reward_model(runs, tmp_path):
    from aligndistil_cli.eval.scoring import RewardModelScorer

    with pytest.raises(UserError, match="outputs; a reward model has 1"):
        RewardModelScorer(runs / "sft", torch.device("cpu"))


def test_evaluate_exports_alpaca_eval_answers(runs, tmp_path):
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps([{"instruction": "write a review about the pizza and the staff .", "dataset": "toy"},
                                     {"instruction": "write a review about the soup and the view .", "dataset": "toy"}]))
    out = evaluate.run(EvaluateConfig(out=str(tmp_path / "e"), ref=str(runs / "sft"), ref_name="sft",
                                      models={"dpo": str(runs / "dpo")}, prompts=str(runs / "toy" / "heldout_prompts.jsonl"),
                                      num_prompts=4, max_new_tokens=8, export="alpaca-eval",
                                      export_questions=str(questions)))
    for name in ("sft", "dpo"):
        answers = json.loads((out / "exports" / "alpaca_eval" / f"{name}.json").read_text())
        assert [a["instruction"] for a in answers] == [q["instruction"] for q in json.loads(questions.read_text())]
        assert all(a["generator"] == name and isinstance(a["output"], str) for a in answers)
    assert "exports/alpaca_eval/dpo.json" in json.loads((out / "manifest.json").read_text())["outputs"]


def test_evaluate_refuses_another_tasks_prompts_without_a_reward_model(runs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "we visited on monday . write a review about the pizza and the staff ."})
                       + "\n" + json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    with pytest.raises(UserError, match="--reward-model PATH") as refused:
        evaluate.run(EvaluateConfig(out=str(tmp_path / "e"), ref=str(runs / "sft"), prompts=str(prompts),
                                    num_prompts=2, max_new_tokens=4))
    assert "prompt 2 ('What is the capital of France?')" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "e").exists()  # refused before anything was sampled or written
