"""evaluate --lm-eval through the CLI: the harness' scores in report.json, report.md and each model's card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aligndistil_cli.cli import main

DOCS = [("the pizza was", ["good .", "the staff", "monday"], 0), ("we visited on", ["monday .", "the", "pizza was"], 0),
        ("i did not like the", ["staff .", "very", "we"], 1), ("the staff was very", ["nice .", "on", "the"], 0),
        ("overall it was", ["bad .", "good .", "pizza"], 1), ("i will come", ["back .", "the", "staff"], 0),
        ("the view was", ["not great .", "monday", "we"], 2)]
LIMIT = 5


def write_mc_task(directory: Path) -> None:
    directory.mkdir()
    data = directory / "toy_mc.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in DOCS))
    (directory / "toy_mc.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory.parent / 'datasets-cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def expected_acc(model_dir: Path) -> float:
    """Accuracy on the first LIMIT documents from log-likelihoods of a plain forward (test_harness's oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.unit.test_harness import oracle_loglikelihood

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for context, choices, gold in DOCS[:LIMIT]:
        lls = [oracle_loglikelihood(model, tokenizer, context, c)[0] for c in choices]
        right += max(range(len(lls)), key=lls.__getitem__) == gold
    return right / LIMIT


def test_lm_eval_scores_reach_the_report_and_the_cards(runs, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from huggingface_hub import ModelCard

    from aligndistil_cli.rundir.artifacts import read_manifest, verify_full

    tasks = tmp_path / "tasks"
    write_mc_task(tasks)
    models = {name: tmp_path / name for name in ("sft", "dpo")}  # copies: evaluate writes into their cards
    for name, path in models.items():
        shutil.copytree(runs / name, path)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--ref", str(models["sft"]), "--ref-name", "sft", "--model", f"dpo={models['dpo']}",
              "--prompts", str(runs / "toy" / "heldout_prompts.jsonl"), "--num-prompts", "8", "--max-new-tokens", "8",
              "--lm-eval", "toy_mc", "--lm-eval-tasks-dir", str(tasks), "--lm-eval-limit", str(LIMIT),
              "--out", str(out)])
    assert exit_.value.code == 0
    assert "batch size" not in capsys.readouterr().out, "the harness' own prints stay off stdout"
    lm_eval = json.loads((out / "report.json").read_text())["lm_eval"]
    assert (lm_eval["tasks"], lm_eval["limit"], lm_eval["samples"]) == (["toy_mc"], LIMIT, {"toy_mc": LIMIT})
    assert set(lm_eval["scores"]) == {"sft", "dpo"}
    markdown = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in markdown and "| model | toy_mc acc | toy_mc acc_norm |" in markdown
    for name, path in models.items():
        acc = lm_eval["scores"][name]["toy_mc"]["acc"]
        assert acc["value"] == pytest.approx(expected_acc(path), abs=1e-12)
        assert f"| {name} | {acc['value']:.4f} ± {acc['stderr']:.4f} |" in markdown
        card = ModelCard.load(path / "README.md")
        harness = {e.metric_type: e.metric_value for e in card.data.eval_results if e.dataset_type == "toy_mc"}
        assert harness == {m: v["value"] for m, v in lm_eval["scores"][name]["toy_mc"].items()}
        assert "| model | toy_mc acc | toy_mc acc_norm |" in card.text
        assert verify_full(path) == []
    assert "lm_eval_tasks_dir" in read_manifest(out)["inputs"]


@pytest.mark.parametrize("command", ["evaluate", "run"])
def test_missing_lm_eval_is_one_line_before_any_work(runs, tmp_path, command):
    """sys.modules[name] = None is Python's own way to make a package absent. `run` checks before its first stage."""
    out = tmp_path / "eval"
    values = {"ref": str(runs / "sft"), "prompts": str(runs / "toy" / "heldout_prompts.jsonl"), "lm_eval": "hellaswag"}
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"root": str(tmp_path), "stages": [
        {"name": "sft", "stage": "sft", "with": {"model": str(runs / "toy" / "model"), "data": "missing.jsonl"}},
        {"name": "eval", "stage": "evaluate", "with": values}]}))
    argv = (["evaluate", "--ref", values["ref"], "--prompts", values["prompts"], "--lm-eval", "hellaswag", "--out",
             str(out)] if command == "evaluate" else ["run", str(pipeline)])
    code = f"import sys; sys.modules['lm_eval'] = None; from aligndistil_cli.cli import main; main({argv!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: --lm-eval needs EleutherAI's lm-evaluation-harness (the lm_eval package): "
                                   "pip install 'aligndistil[lm-eval]'")
    assert not out.exists() and not (tmp_path / "sft").exists()
