"""Unit tests for aligndistil_cli.eval.report.

Expected numbers are worked out by hand (written next to each assertion), not
by calling the code under test a second time.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from rich.console import Console

from aligndistil_cli.eval.report import (
    format_ci,
    kl_estimate,
    length_stats,
    mean_ci,
    results_table,
    win_rate,
    write_report,
)

PNG_MAGIC = b"\x89PNG"


def test_mean_ci_four_values():
    d = mean_ci([1, 2, 3, 4])
    # deviations -1.5, -.5, .5, 1.5 -> squares sum 5; sample var 5/3; n = 4 -> sqrt(n) = 2
    h = 1.96 * math.sqrt(5 / 3) / 2
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(2.5)
    assert d["lo"] == pytest.approx(2.5 - h)
    assert d["hi"] == pytest.approx(2.5 + h)


def test_mean_ci_single_value_has_zero_width():
    d = mean_ci([0.7])
    assert d == {"mean": 0.7, "lo": 0.7, "hi": 0.7, "n": 1}


def test_mean_ci_empty_raises():
    with pytest.raises(ValueError):
        mean_ci([])


def test_win_rate_wins_ties_losses():
    # 1 > 0 win; 0 == 0 tie; 2 < 3 loss; -1 == -1 tie -> outcomes 1, .5, 0, .5
    d = win_rate([1, 0, 2, -1], [0, 0, 3, -1])
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(0.5)
    # deviations .5, 0, -.5, 0 -> squares sum .5; sample var 1/6
    h = 1.96 * math.sqrt(1 / 6) / 2
    assert d["hi"] - d["mean"] == pytest.approx(h)


def test_win_rate_tiny_difference_is_tie():
    assert win_rate([1.0 + 1e-12], [1.0])["mean"] == pytest.approx(0.5)


def test_win_rate_length_mismatch_raises():
    with pytest.raises(ValueError):
        win_rate([1, 2, 3], [1, 2])


def test_kl_estimate_hand_example():
    # -1 - (-2) = 1; -2 - (-2.5) = .5 -> mean .75
    d = kl_estimate([-1, -2], [-2, -2.5])
    assert d["mean"] == pytest.approx(0.75)
    # sample std of (1, .5) = sqrt(.125) ; n = 2
    h = 1.96 * math.sqrt(0.125) / math.sqrt(2)
    assert d["lo"] == pytest.approx(0.75 - h)


def test_kl_estimate_length_mismatch_raises():
    with pytest.raises(ValueError):
        kl_estimate([-1.0], [-1.0, -2.0])


def test_length_stats_with_cap():
    s = length_stats([1, 2, 3, 10, 10], cap=10)
    assert s["cap_rate"] == pytest.approx(0.4)  # two of five hit the cap
    assert s["max"] == 10
    assert s["median"] == 3
    assert s["mean"] == pytest.approx(26 / 5)
    assert s["p90"] == 10  # nearest rank: ceil(.9 * 5) = 5th smallest


def test_length_stats_p90_nearest_rank():
    # ten values 1..10: ceil(.9 * 10) = 9th smallest = 9; nothing reaches cap 100
    s = length_stats(list(range(10, 0, -1)), cap=100)
    assert s["p90"] == 9
    assert s["median"] == 5.5
    assert s["cap_rate"] == 0


def test_format_ci():
    assert format_ci({"mean": 0.412, "lo": 0.361, "hi": 0.463, "n": 10}) == "0.412 ± 0.051"
    assert format_ci({"mean": 1.0, "lo": 0.5, "hi": 1.5, "n": 3}, digits=1) == "1.0 ± 0.5"
    assert format_ci(None) == "—"


def _ci(mean, half, n=8):
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def _report(training=None):
    def model(path, reward, kl, wr, mean_len):
        return {
            "path": path,
            "reward": _ci(reward, 0.1),
            "kl": _ci(kl, 0.02),
            "win_rate": wr,
            "length": {"mean": mean_len, "median": mean_len, "p90": 30, "max": 32, "cap_rate": 0.25},
            "examples": [{"prompt": "rate this | movie", "response": "great\nfilm | 10/10", "reward": reward}],
        }

    return {
        "task": "embedded toy review task",
        "num_prompts": 8,
        "max_new_tokens": 32,
        "reference": "sft",
        "models": {
            "sft": model("runs/sft", 0.1, 0.0, None, 20.0),
            "dpo": model("runs/dpo", 0.6, 0.3, _ci(0.7, 0.15), 25.0),
            "aligndistil": model("runs/ad", 0.8, 0.2, _ci(0.8, 0.12), 22.5),
        },
        "implicit_accuracy": {"dpo": 0.75, "contrastive": 0.8125, "num_pairs": 16},
        "training": training or {},
        "verdict": ["AlignDistil beats DPO on gold reward.", "Both stay within the KL budget."],
    }


def _referenced_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _check_written(out, written):
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "report.md" in written
    for name in ("sft", "dpo", "aligndistil"):
        assert name in md
    assert "| model | gold reward | KL to ref | win rate vs ref | mean length | cap rate | final KL to teacher |" in md
    images = _referenced_images(md)
    assert images
    for img in images:
        assert img in written
        assert (out / img).read_bytes()[:4] == PNG_MAGIC
    for name in written:
        assert (out / name).is_file()
    return md, images


def test_write_report_without_training(tmp_path):
    written = write_report(tmp_path, _report())
    md, images = _check_written(tmp_path, written)
    assert {"reward_vs_kl.png", "lengths.png"} <= set(images)
    assert "training_curves.png" not in written
    assert not (tmp_path / "training_curves.png").exists()
    assert "0.600 ± 0.100" in md  # dpo reward cell
    assert "0.750" in md and "0.812" in md and "16" in md  # implicit accuracies
    assert "- AlignDistil beats DPO on gold reward." in md
    # pipes inside example cells are escaped; newlines cannot break the row
    assert "rate this \\| movie" in md
    assert "great<br>film \\| 10/10" in md


def test_write_report_with_training_curves(tmp_path):
    metrics = tmp_path / "train" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = [{"step": s, "loss": 1.0 / s, "alpha_mean": 0.1 * s} for s in range(1, 6)]
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    training = {"aligndistil": str(metrics), "dpo": str(tmp_path / "missing" / "metrics.jsonl")}
    written = write_report(out, _report(training))
    md, images = _check_written(out, written)
    assert "training_curves.png" in written
    assert "training_curves.png" in images


def test_write_report_training_with_only_missing_files_has_no_curves(tmp_path):
    written = write_report(tmp_path, _report({"dpo": str(tmp_path / "nope.jsonl")}))
    assert "training_curves.png" not in written
    assert not (tmp_path / "training_curves.png").exists()


def test_results_table_rows_and_columns():
    table = results_table(_report())
    assert [c.header for c in table.columns] == [
        "model", "gold reward", "KL to ref", "win rate vs ref", "mean length", "cap rate", "final KL to teacher"]
    assert table.row_count == 3
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "aligndistil" in text and "0.800 ± 0.120" in text and "25.0%" in text


def test_unconverged_student_is_marked_in_the_table_and_every_verdict():
    from aligndistil_cli.eval.report import results_markdown
    from aligndistil_cli.stages.evaluate import verdicts

    report = {**_report(), "reward_name": "toy gold reward"}
    report["models"]["aligndistil"]["final_kl_teacher"] = 1.8  # > 0.05 nats/token
    report["models"]["dpo"]["final_kl_teacher"] = None
    table = "\n".join(results_markdown(report))
    assert "| aligndistil (unconverged) |" in table and "| 1.800 |" in table
    assert "| toy gold reward |" in table.splitlines()[0].replace("| model ", "")
    lines = verdicts(report)
    mentions = [v for v in lines if "aligndistil" in v]
    assert len(mentions) == 2 and all("unconverged: final KL to its teacher 1.800" in v for v in mentions)
    assert not any("unconverged" in v for v in lines if "aligndistil" not in v)
    assert all("on toy gold reward" in v for v in lines)
    report["models"]["aligndistil"]["final_kl_teacher"] = 0.01
    assert not any("unconverged" in v for v in verdicts(report))


def test_verdicts_state_how_far_apart_the_kls_are():
    from aligndistil_cli.stages.evaluate import verdicts

    report = _report()  # dpo at KL 0.3, aligndistil at KL 0.2: 0.1 apart, more than 20% of 0.3
    pair = verdicts(report)[-1]
    assert pair.startswith("dpo ") and "at KLs that differ by 0.10 nats (0.30 against 0.20)" in pair
    report["models"]["aligndistil"]["kl"] = _ci(0.28, 0.02)
    assert "at matched KL (0.30 and 0.28 nats)" in verdicts(report)[-1]
    assert "at KL 0.30 nats from it" in verdicts(report)[0]
