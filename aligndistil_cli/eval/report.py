"""Evaluation results -> numbers, a terminal table, report.md and PNG plots.

The statistics helpers are plain python so they can be checked by hand; the
plotting code imports matplotlib lazily so that commands which never write a
report do not pay for (or depend on) a plotting backend.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aligndistil_cli.eval.curves import write_training_curves

_Z95 = 1.96
# Rewards are floats from the same scorer; differences this small are ties, not wins.
_TIE_EPS = 1e-9
# nats per token: a distilled student further than this from its teacher (distill's final_kl_teacher) did not converge
CONVERGED_KL = 0.05


def columns(report: dict) -> list[str]:
    """The results table's header; the reward column is named after the reward that scored it."""
    return ["model", report.get("reward_name", "gold reward"), "KL to ref", "win rate vs ref", "mean length",
            "cap rate", "final KL to teacher"]


def unconverged(res: dict) -> bool:
    """A distilled student whose final KL to its teacher is above CONVERGED_KL."""
    kl = res.get("final_kl_teacher")
    return kl is not None and kl > CONVERGED_KL


def mean_ci(values: list[float]) -> dict:
    """Mean with a normal-approximation 95% interval (half-width 0 for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = math.fsum(values) / n
    h = _Z95 * statistics.stdev(values) / math.sqrt(n) if n >= 2 else 0.0
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n}


def win_rate(model_rewards: list[float], ref_rewards: list[float]) -> dict:
    """Paired win rate: per prompt 1 for a win, 0.5 for a tie, 0 for a loss."""
    if len(model_rewards) != len(ref_rewards):
        raise ValueError(f"win_rate: {len(model_rewards)} model rewards vs {len(ref_rewards)} reference rewards")
    outcomes = []
    for m, r in zip(model_rewards, ref_rewards):
        diff = float(m) - float(r)
        outcomes.append(0.5 if abs(diff) <= _TIE_EPS else (1.0 if diff > 0 else 0.0))
    return mean_ci(outcomes)


def kl_estimate(model_logps: list[float], ref_logps: list[float]) -> dict:
    """Monte-Carlo KL(model || ref) from responses sampled from the model.

    E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] is the sequence-level KL, so the
    per-sample log-ratio is an unbiased (if noisy, possibly negative) estimate.
    """
    if len(model_logps) != len(ref_logps):
        raise ValueError(f"kl_estimate: {len(model_logps)} model log-probs vs {len(ref_logps)} reference log-probs")
    return mean_ci([float(m) - float(r) for m, r in zip(model_logps, ref_logps)])


def length_stats(lengths: list[int], cap: int) -> dict:
    """Response-length summary; cap_rate is the share of responses cut off at the cap."""
    if not lengths:
        raise ValueError("length_stats needs at least one length")
    ordered = sorted(lengths)
    n = len(ordered)
    p90 = ordered[max(math.ceil(0.9 * n), 1) - 1]  # nearest-rank percentile
    return {"mean": sum(ordered) / n, "median": statistics.median(ordered), "p90": p90,
            "max": ordered[-1], "cap_rate": sum(1 for x in ordered if x >= cap) / n}


def health_line(health: dict) -> str:
    """The health record in one line: p(EOS) at the ends, alpha_t and TVD_t quantiles, the mirror cosine."""
    names = {"ref": "reference", "dpo": "DPO", "rev": "reverse DPO", "teacher": "teacher"}
    eos = ", ".join(f"{names[k]} {v:.3g}" for k, v in health["p_eos_at_end"].items() if v is not None)
    a, t = health["alpha"], health["tvd"]
    mirror = health.get("mirror_cosine_median")
    return (f"teacher health (r {health['spec']['alpha_scale']:g}, {health['responses_ending_in_eos']} chosen responses): "
            f"p(EOS) where they end: {eos}; alpha_t median {a['p50']:.3g} (p95 {a['p95']:.3g}, max {a['max']:.3g}); "
            f"TVD median {t['p50']:.3g} (p95 {t['p95']:.3g}); "
            + (f"mirror cosine median {mirror:.2f}" if mirror is not None else "mirror cosine: no reference"))


def format_ci(d: dict | None, digits: int = 3) -> str:
    """'0.412 ± 0.051'; '—' where there is no value (the reference's win rate against itself)."""
    if d is None:
        return "—"
    half = (d["hi"] - d["lo"]) / 2
    return f"{d['mean']:.{digits}f} ± {half:.{digits}f}"


def _row(name: str, res: dict) -> list[str]:
    length = res.get("length") or {}
    mean_len = f"{length['mean']:.1f}" if "mean" in length else "—"
    cap = f"{100 * length['cap_rate']:.1f}%" if "cap_rate" in length else "—"
    teacher_kl = "—" if res.get("final_kl_teacher") is None else f"{res['final_kl_teacher']:.3f}"
    return [name + (" (unconverged)" if unconverged(res) else ""), format_ci(res.get("reward")), format_ci(res.get("kl")),
            format_ci(res.get("win_rate")), mean_len, cap, teacher_kl]


def results_table(report: dict) -> Table:
    """The report's per-model numbers as a rich table for the terminal."""
    table = Table(title=f"{report.get('task', 'evaluation')} ({report.get('num_prompts', '?')} prompts)")
    for i, col in enumerate(columns(report)):
        table.add_column(col, justify="left" if i == 0 else "right")
    for name, res in report["models"].items():
        table.add_row(*_row(name, res))
    return table


def _cell(text) -> str:
    # A raw '|' would split the cell and a newline would end the row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def results_markdown(report: dict) -> list[str]:
    """The per-model results table as markdown lines (report.md and the model cards)."""
    return md_table(columns(report), [_row(n, r) for n, r in report["models"].items()])


def lm_eval_rows(lm_eval: dict) -> tuple[list[str], list[list[str]]]:
    """The harness' scores as a header (model, then a column per task and metric) and a row per model."""
    scores = lm_eval["scores"]
    cols = list(dict.fromkeys((task, metric) for per_task in scores.values()
                              for task, metrics in per_task.items() for metric in metrics))

    def cell(name: str, task: str, metric: str) -> str:  # every model is scored on the same tasks
        found = scores[name][task][metric]
        return f"{found['value']:.4f}" + ("" if found["stderr"] is None else f" ± {found['stderr']:.4f}")

    return (["model"] + [f"{task} {metric}" for task, metric in cols],
            [[name] + [cell(name, task, metric) for task, metric in cols] for name in scores])


def lm_eval_markdown(lm_eval: dict) -> list[str]:
    """The harness' table as markdown lines, after a line saying what was scored (report.md and the cards)."""
    samples = ", ".join(f"{task} {n}" for task, n in lm_eval["samples"].items())
    limit = (f" (--lm-eval-limit {lm_eval['limit']}: the first documents of each task only, so not comparable with "
             "published scores)" if lm_eval.get("limit") else "")
    lines = [f"EleutherAI's lm-evaluation-harness {lm_eval['version']}; documents scored per task: {samples}{limit}. "
             "± is the harness' standard error.", ""]
    return lines + md_table(*lm_eval_rows(lm_eval))


def card_results(report: dict, name: str, dataset: str) -> list[dict]:
    """Model name's results as huggingface_hub EvalResult fields, for its card's model-index: its reward, KL and
    win rate on the held-out prompts (dataset: their file or hub id), then its lm-evaluation-harness scores."""
    from aligndistil_cli.eval.harness import card_results as harness_results

    res, ref = report["models"][name], report["reference"]
    held_out = {"task_type": "text-generation", "dataset_type": str(dataset),
                "dataset_name": f"held-out prompts ({Path(dataset).name})"}
    found = [{**held_out, "metric_type": "reward", "metric_name": report.get("reward_name", "gold reward"),
              "metric_value": res["reward"]["mean"]},
             {**held_out, "metric_type": "kl", "metric_name": f"KL to {ref} (nats)", "metric_value": res["kl"]["mean"]}]
    if res.get("win_rate"):
        found.append({**held_out, "metric_type": "win_rate", "metric_name": f"win rate against {ref}",
                      "metric_value": res["win_rate"]["mean"]})
    scores = (report.get("lm_eval") or {}).get("scores", {}).get(name)
    return found + (harness_results(scores) if scores else [])


def _plot_reward_vs_kl(plt, report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, res in report["models"].items():
        rw, kl = res["reward"], res["kl"]
        ax.errorbar(kl["mean"], rw["mean"], xerr=(kl["hi"] - kl["lo"]) / 2, yerr=(rw["hi"] - rw["lo"]) / 2,
                    fmt="o", capsize=4)
        ax.annotate(name, (kl["mean"], rw["mean"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel(f"KL to reference ({report['reference']}), nats")
    ax.set_ylabel(report.get("reward_name", "gold reward"))
    ax.set_title("Reward vs KL (95% CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lengths(plt, report: dict, path: Path) -> None:
    """Box plot when raw per-response lengths are supplied, else bars of the summary stats.

    The report schema carries only length_stats, so the bar chart is the usual
    case; an optional models[name]["lengths"] list upgrades it to a box plot.
    """
    models = report["models"]
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4.5))
    if all(models[n].get("lengths") for n in names):
        ax.boxplot([models[n]["lengths"] for n in names])
        ax.set_xticks(range(1, len(names) + 1), names)
    else:
        keys = ("mean", "median", "p90", "max")
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [models[n]["length"][key] for n in names], width, label=key)
        ax.set_xticks(range(len(names)), names)
        ax.legend(fontsize=8)
    ax.axhline(report["max_new_tokens"], color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("response length (tokens)")
    ax.set_title(f"Response lengths (dashed: cap = {report['max_new_tokens']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict, plots: list[str]) -> str:
    lines = ["# AlignDistil evaluation report", "",
             f"Task: {report['task']}. Each model answered the same {report['num_prompts']} prompts "
             f"(at most {report['max_new_tokens']} new tokens); rewards are from the "
             f"{report.get('reward_name', 'gold reward')}, KL and win rate are against the reference model "
             f"`{report['reference']}`, and intervals are 95% normal-approximation confidence intervals. A distilled "
             f"student whose final KL to its teacher is above {CONVERGED_KL} nats/token is marked unconverged: it "
             "shows where training stopped, not what its method reaches.", "", "## Results", ""]
    lines += results_markdown(report)
    acc = report.get("implicit_accuracy")
    if acc:
        lines += ["", "## Implicit-reward accuracy", "",
                  f"On {acc['num_pairs']} held-out preference pairs: DPO implicit reward {acc['dpo']:.3f}, "
                  f"contrastive implicit reward {acc['contrastive']:.3f}."]
    if report.get("lm_eval"):
        lines += ["", "## lm-evaluation-harness", ""] + lm_eval_markdown(report["lm_eval"])
    if report.get("teacher_health"):
        lines += ["", "## Teacher health", ""]
        for name, health in report["teacher_health"].items():
            lines += [f"- {name}: {health_line(health)}"] + ([f"  **{health['warning']}**"] if health["warning"] else [])
    if report.get("verdict"):
        lines += ["", "## Verdict", ""] + [f"- {s}" for s in report["verdict"]]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})\n" for p in plots]
    lines += ["## Example responses"]
    for name, res in report["models"].items():
        lines += ["", f"### {name}", ""]
        examples = res.get("examples") or []
        if not examples:
            lines.append("(no examples)")
            continue
        lines += md_table(["prompt", "response", "reward"],
                           [[e["prompt"], e["response"], f"{e['reward']:.3f}"] for e in examples])
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> list[str]:
    """Write report.md and its PNG plots into out_dir; return the file names written."""
    import matplotlib

    # Agg before pyplot: reports are written on headless machines with no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = ["reward_vs_kl.png", "lengths.png"]
    _plot_reward_vs_kl(plt, report, out_dir / plots[0])
    _plot_lengths(plt, report, out_dir / plots[1])
    plots += write_training_curves(plt, report.get("training") or {}, out_dir)
    (out_dir / "report.md").write_text(_markdown(report, plots), encoding="utf-8")
    return ["report.md"] + plots


def print_report(out: Path) -> None:
    """Print a finished evaluation's table (used by `aligndistil run`)."""
    report = json.loads((Path(out) / "report.json").read_text())
    console = Console()  # stdout: the table is the result
    console.print(results_table(report))
    if report.get("lm_eval"):
        header, rows = lm_eval_rows(report["lm_eval"])
        table = Table(title=f"lm-evaluation-harness {report['lm_eval']['version']}")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for name, health in (report.get("teacher_health") or {}).items():
        console.print(f"{name}: {health_line(health)}", highlight=False)
        if health["warning"]:
            console.print(f"[yellow]{name}: {health['warning']}[/yellow]", highlight=False)
    for line in report["verdict"]:
        console.print(f"- {line}", highlight=False)
