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

from aligndistil_cli.eval.curves import file_name, grid, log_scale, panels, plot_training
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
    assert not [name for name in written if name.startswith("training_curves")]
    assert not list(tmp_path.glob("training_curves*.png"))
    assert "0.600 ± 0.100" in md  # dpo reward cell
    assert "0.750" in md and "0.812" in md and "16" in md  # implicit accuracies
    assert "- AlignDistil beats DPO on gold reward." in md
    # pipes inside example cells are escaped; newlines cannot break the row
    assert "rate this \\| movie" in md
    assert "great<br>film \\| 10/10" in md


# What train-dpo logs (metrics.jsonl of the tiny pipeline), plus a flag and a note that are not numbers, a metric
# logged once (as distill's final_kl_teacher) and one that is never finite.
DPO_RECORDS = [{"elapsed_s": 0.27 * s, "grad_norm": 0.6 / s, "loss": 0.69 - 0.01 * s, "lr": 2e-4, "margin": 0.01 * s,
                "reward_accuracy": 0.5 + 0.05 * s, "reward_chosen": 0.002 * s, "reward_rejected": -0.001 * s, "step": s,
                "resumed": False, "note": "x", "broken": float("nan")} for s in range(1, 6)]
DPO_RECORDS[-1]["final_kl_teacher"] = 0.04
DPO_PANELS = ["loss", "margin", "reward_accuracy", "reward_chosen", "reward_rejected", "final_kl_teacher", "grad_norm",
              "lr"]


def _write_metrics(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_panels_are_every_number_logged_but_the_step_and_the_clock():
    # loss first, then in the order logged, the optimizer's grad_norm and lr last
    assert panels(DPO_RECORDS) == DPO_PANELS
    logged = {k for r in DPO_RECORDS for k, v in r.items() if isinstance(v, float) and v == v} - {"elapsed_s"}
    assert set(panels(DPO_RECORDS)) == logged


@pytest.mark.parametrize("n, rows", [(1, [1]), (4, [4]), (5, [3, 2]), (6, [3, 3]), (7, [4, 3]), (8, [4, 4]),
                                     (9, [3, 3, 3]), (10, [4, 3, 3]), (13, [4, 3, 3, 3])])
def test_the_grid_holds_one_panel_per_metric(n, rows):
    assert grid(n) == rows


def test_the_grid_is_never_wider_than_four_nor_uneven():
    for n in range(1, 40):
        rows = grid(n)
        assert sum(rows) == n and max(rows) <= 4 and max(rows) - min(rows) <= 1 and rows == sorted(rows, reverse=True)


def test_log_scale_for_spikes_and_decades_only():
    assert log_scale([0.03, 0.02, 8.0, 0.01, 0.02])  # spikes 400x the median
    assert log_scale([0.7, 0.2, 0.06, 0.05, 0.04])  # a KL falling over a decade: 0.7 >= 10 x the median 0.06
    assert not log_scale([1e-8, 0.01, 0.05, 0.1, 0.2])  # a margin growing from zero: max 4x the median
    assert not log_scale([-0.1, 0.02, 8.0])  # not all positive
    assert not log_scale([0.04])


def test_curve_files_are_named_after_their_model():
    assert file_name("alignDistil") == "training_curves_alignDistil.png"
    odd = file_name("a b/c")
    assert re.fullmatch(r"training_curves_a_b_c-[0-9a-f]{6}\.png", odd) and odd != file_name("a_b_c")


def test_write_report_draws_a_png_per_model_with_a_panel_per_metric(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = _write_metrics(tmp_path / "dpo" / "metrics.jsonl", DPO_RECORDS)
    assert plot_training(plt, "dpo", DPO_RECORDS, tmp_path / "dpo.png") == DPO_PANELS
    assert (tmp_path / "dpo.png").read_bytes()[:4] == PNG_MAGIC
    sft = _write_metrics(tmp_path / "sft" / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2)])
    out = tmp_path / "report"
    out.mkdir()
    (out / "training_curves_old.png").write_bytes(b"left by an earlier run")
    training = {"sft": str(sft), "dpo": str(dpo), "aligndistil": str(tmp_path / "missing" / "metrics.jsonl")}
    written = write_report(out, _report(training))
    md, images = _check_written(out, written)
    assert [n for n in written if n.startswith("training_curves")] == ["training_curves_sft.png",
                                                                        "training_curves_dpo.png"]
    assert {"training_curves_sft.png", "training_curves_dpo.png"} <= set(images)
    assert not (out / "training_curves_old.png").exists()


def test_write_report_training_with_only_missing_files_has_no_curves(tmp_path):
    written = write_report(tmp_path, _report({"dpo": str(tmp_path / "nope.jsonl")}))
    assert not [name for name in written if name.startswith("training_curves")]
    assert not list(tmp_path.glob("training_curves*.png"))


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
