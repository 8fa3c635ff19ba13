"""The summary of a sweep: records from finished runs, Pareto frontiers, budget tables, summary.md.

A record is one finished run (method, knob value, optional (lr, epochs), seed) with its final
evaluation. A setting is the same run over seeds. A distillation run whose final KL to its teacher
(distill's final_kl_teacher) is above the converged_kl threshold did not converge: it is listed, but
never a point of its method. Frontiers are taken per method over all of its converged runs:

  pooled    over settings, from their mean over seeds (a setting counts when every seed converged);
  per seed  over that seed's runs; the table gives the mean ± 95% interval over seeds of each
            seed's best reward within the budget, and how many seeds had a run within it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from aligndistil_cli.eval.report import CONVERGED_KL, format_ci, md_table, mean_ci


def _norm(value: Any) -> Any:
    """YAML 1.1 reads 2e-4 as a string: make numeric knob values numbers so they sort and plot."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def label(value: Any) -> str:
    return format(value, "g") if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def summary_options(opts: dict) -> dict:
    """write_summary's keyword arguments from a spec's summary section."""
    return {"budgets": tuple(opts.get("budgets", (2, 5, 10))),
            "length_budgets": tuple(opts.get("length_budgets", ())),
            "converged_kl": float(opts.get("converged_kl", CONVERGED_KL)),
            "baseline": opts.get("baseline", "dpo")}


def _manifest_metrics(model_dir: Path) -> dict:
    path = model_dir / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")).get("metrics", {}) if path.is_file() else {}


def collect(root: Path) -> list[dict]:
    """One record per finished (method, knob value, budget, seed), from run.json and its eval report.json."""
    root = Path(root)
    records = []
    for path in root.glob("seed-*/*/*/run.json"):
        run = json.loads(path.read_text(encoding="utf-8"))
        report_path = root / run["eval"] / "report.json"
        if not report_path.is_file():
            continue  # not evaluated yet: the next run_sweep fills it in
        report = json.loads(report_path.read_text(encoding="utf-8"))
        ref = report["models"][report["reference"]]
        res = next(v for k, v in report["models"].items() if k != report["reference"])
        trained = _manifest_metrics(root / run["model"])
        records.append({
            "method": run["method"], "knob": run["knob"], "value": _norm(run["value"]),
            "order": tuple(run["order"]), "seed": run["seed"], "lr": _norm(run.get("lr")), "epochs": run.get("epochs"),
            "reward": res["reward"]["mean"], "kl": res["kl"]["mean"], "length": res["length"]["mean"],
            "cap_rate": res["length"]["cap_rate"], "win_rate": (res.get("win_rate") or {}).get("mean"),
            "ref_reward": ref["reward"]["mean"], "ref_length": ref["length"]["mean"],
            "teacher": "teacher_spec" in res, "diagnostics": report.get("teacher_diagnostics"),
            "final_kl_teacher": trained.get("final_kl_teacher"), "train_tokens": trained.get("train_tokens")})
    return sorted(records, key=lambda r: (r["order"], r["lr"] or 0, r["epochs"] or 0, r["seed"]))


def converged(record: dict, threshold: float = CONVERGED_KL) -> bool:
    """False only for a distilled student whose final KL to its teacher is above threshold."""
    kl = record.get("final_kl_teacher")
    return kl is None or kl <= threshold


def setting_key(r: dict) -> tuple:
    return r["method"], r["value"], r.get("lr"), r.get("epochs")


def setting_name(a: dict) -> str:
    """'20' or '20, lr 0.001, 5 ep': the knob value, and the budget on the grid."""
    budget = f", lr {label(a['lr'])}, {a['epochs']} ep" if a.get("lr") is not None else ""
    return label(a["value"]) + budget


def aggregate(records: list[dict], threshold: float = CONVERGED_KL) -> list[dict]:
    """Per setting: mean and 95% interval over seeds of reward, KL, length and cap rate; convergence."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(setting_key(r), []).append(r)
    out = []
    for (method, value, lr, epochs), rs in groups.items():
        final = [r["final_kl_teacher"] for r in rs if r.get("final_kl_teacher") is not None]
        tokens = [r["train_tokens"] for r in rs if r.get("train_tokens") is not None]
        out.append({"method": method, "knob": rs[0]["knob"], "value": value, "lr": lr, "epochs": epochs,
                    "order": rs[0].get("order", (0, 0)), "n": len(rs), "seeds": [r["seed"] for r in rs],
                    "teacher": bool(rs[0].get("teacher")),
                    **{k: mean_ci([r[k] for r in rs]) for k in ("reward", "kl", "length", "cap_rate")},
                    "final_kl_teacher": final or None, "train_tokens": sum(tokens) / len(tokens) if tokens else None,
                    "converged": all(converged(r, threshold) for r in rs)})
    return out


def frontier(points: list[tuple]) -> list[tuple]:
    """Upper-left Pareto frontier of (kl, reward, ...) points: the best reward for KL <= k, by KL."""
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:  # nothing at lower or equal KL does as well
            out.append(p)
            best = p[1]
    return out


def best_within_budget(aggregated: list[dict], budgets=(2, 5, 10), x: str = "kl") -> dict:
    """method -> budget -> (best mean reward, setting name) over entries with mean x <= budget, or None.

    The best reward within a budget is read off the method's frontier in (x, reward).
    """
    best: dict[str, dict] = {}
    for a in aggregated:
        per = best.setdefault(a["method"], {b: None for b in budgets})
        for b in budgets:
            if a[x]["mean"] <= b and (per[b] is None or a["reward"]["mean"] > per[b][0]):
                per[b] = (a["reward"]["mean"], setting_name(a))
    return best


def per_seed_within_budget(records: list[dict], budgets) -> dict:
    """method -> budget -> (best rewards of the seeds that have a run within the budget, number of seeds)."""
    by_method: dict[str, dict[int, list[dict]]] = {}
    for r in records:
        by_method.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    out = {}
    for method, seeds in by_method.items():
        out[method] = {}
        for b in budgets:
            bests = [max((r["reward"] for r in rs if r["kl"] <= b), default=None) for rs in seeds.values()]
            out[method][b] = ([v for v in bests if v is not None], len(seeds))
    return out


def tokens_at_matched_kl(aggregated: list[dict], budgets) -> list[dict]:
    """Per method and epochs on the grid: mean training tokens and the best reward within each KL budget."""
    groups: dict[tuple, list[dict]] = {}
    for a in aggregated:
        if a.get("epochs") is not None:
            groups.setdefault((a["method"], a["epochs"]), []).append(a)
    rows = []
    for (method, epochs), entries in sorted(groups.items(), key=lambda kv: (kv[1][0]["order"], kv[0][1])):
        tokens = [a["train_tokens"] for a in entries if a["train_tokens"] is not None]
        best = best_within_budget(entries, budgets)[method]
        rows.append({"method": method, "epochs": epochs, "tokens": statistics.mean(tokens) if tokens else None,
                     "best": best})
    return rows


def diagnostics_table(records: list[dict]) -> list[str]:
    """p(EOS) at the ends of chosen responses and the mirror cosine, per teacher setting (mean over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("diagnostics"):
            groups.setdefault(setting_key(r), []).append(r)
    if not groups:
        return ["No teacher evaluation with diagnostics (evaluate --teacher with --pairs)."]

    def mean_of(rs, *path) -> str:
        vals = []
        for r in rs:
            v = r["diagnostics"]
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if v is not None:
                vals.append(v)
        return format_ci(mean_ci(vals)) if vals else "—"

    rows = [[rs[0]["method"], setting_name(rs[0]), str(len(rs))]
            + [mean_of(rs, "p_eos_at_end", k) for k in ("ref", "dpo", "rev", "teacher")]
            + [mean_of(rs, "alpha", "p50"), mean_of(rs, "alpha", "max"), mean_of(rs, "tvd", "p50"),
               mean_of(rs, "mirror_cosine_median")] for rs in groups.values()]
    return md_table(["teacher", "setting", "seeds", "p(EOS) SFT", "p(EOS) DPO", "p(EOS) reverse DPO", "p(EOS) teacher",
                     "α_t median", "α_t max", "TVD median", "mirror cosine (median)"], rows)


def _plot_frontiers(plt, agg: list[dict], records: list[dict], threshold: float, path: Path) -> None:
    """Each method's pooled frontier over its settings converged in every seed (steps; teachers dashed), and every
    converged run of every seed (faint points)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in dict.fromkeys(a["method"] for a in agg):
        runs = [(r["kl"], r["reward"]) for r in records if r["method"] == method and converged(r, threshold)]
        if not runs:
            continue
        teacher = next(a["teacher"] for a in agg if a["method"] == method)
        edge = frontier([(a["kl"]["mean"], a["reward"]["mean"]) for a in agg if a["method"] == method and a["converged"]])
        line, = ax.plot([p[0] for p in edge], [p[1] for p in edge], "--" if teacher else "-", drawstyle="steps-post",
                        marker="s" if teacher else "o", markersize=4, label=method + (" (teacher)" if teacher else ""))
        ax.scatter([p[0] for p in runs], [p[1] for p in runs], s=8, color=line.get_color(), alpha=0.35)
    ref = mean_ci([r["ref_reward"] for r in records])["mean"]
    ax.plot([0], [ref], "k*", markersize=12, label="reference (SFT)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL to the SFT reference, nats (symlog)")
    ax.set_ylabel("reward")
    ax.set_title("Frontiers: settings converged in every seed (lines), converged runs of each seed (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # a sweep draws many figures in one process


def _budget_table(agg: list[dict], budgets: tuple, x: str = "kl", unit: str = "KL") -> list[str]:
    knobs = {a["method"]: a["knob"] for a in agg}
    by_name = {(a["method"], setting_name(a)): a for a in agg}
    rows = [[method, knobs[method]] + ["—" if per[b] is None else
                                       f"{format_ci(by_name[(method, per[b][1])]['reward'])} ({per[b][1]})"
                                       for b in budgets]
            for method, per in best_within_budget(agg, budgets, x).items()]
    return md_table(["method", "knob"] + [f"{unit} ≤ {label(b)}" for b in budgets], rows)


def _per_seed_table(records: list[dict], budgets: tuple, seeds: int) -> list[str]:
    """records: the converged runs; seeds: how many the sweep ran (a seed with no converged run counts too)."""
    rows = [[method] + [f"{format_ci(mean_ci(vals))} ({len(vals)}/{seeds})" if vals else f"— (0/{seeds})"
                        for vals, _ in (per[b] for b in budgets)]
            for method, per in per_seed_within_budget(records, budgets).items()]
    return md_table(["method"] + [f"KL ≤ {label(b)}" for b in budgets], rows)


def _tokens_table(agg: list[dict], budgets: tuple) -> list[str]:
    rows = [[r["method"], str(r["epochs"]), "—" if r["tokens"] is None else f"{r['tokens']:,.0f}"]
            + ["—" if r["best"][b] is None else f"{r['best'][b][0]:.3f} ({r['best'][b][1]})" for b in budgets]
            for r in tokens_at_matched_kl(agg, budgets)]
    if not rows:
        return ["No method on the budget grid."]
    return md_table(["method", "epochs", "training tokens"] + [f"KL ≤ {label(b)}" for b in budgets], rows)


def _convergence_table(agg: list[dict], threshold: float) -> list[str]:
    rows = [[a["method"], setting_name(a), f"{statistics.mean(a['final_kl_teacher']):.3f}",
             f"{min(a['final_kl_teacher']):.3f}–{max(a['final_kl_teacher']):.3f}",
             f"{sum(k <= threshold for k in a['final_kl_teacher'])}/{len(a['final_kl_teacher'])}"]
            for a in agg if a["final_kl_teacher"]]
    if not rows:
        return ["No distillation run recorded its final KL to the teacher."]
    return md_table(["method", "setting", "final KL to teacher (mean)", "min–max", f"seeds ≤ {label(threshold)}"], rows)


# Two-sided 95% Student-t quantiles by degrees of freedom: paired differences over a handful of seeds.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_ci(values: list[float]) -> dict:
    """Mean with a Student-t 95% interval over len(values) seeds (half-width 0 for one value)."""
    n = len(values)
    m = math.fsum(values) / n
    h = _T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n >= 2 else 0.0
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n}


def paired_differences(records: list[dict], budgets, baseline: str) -> dict:
    """method -> budget -> t_ci over seeds of (the method's best reward within the budget minus the baseline's, in
    the same seed: same SFT model, pairs and teachers), over the seeds where both have a run within it; or None."""
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r["method"], r["seed"]), []).append(r)
    seeds = sorted({r["seed"] for r in records})

    def best(method, seed, b):
        return max((r["reward"] for r in runs.get((method, seed), []) if r["kl"] <= b), default=None)

    out = {}
    for method in dict.fromkeys(r["method"] for r in records):
        if method == baseline:
            continue
        out[method] = {}
        for b in budgets:
            diffs = [x - y for x, y in ((best(method, s, b), best(baseline, s, b)) for s in seeds)
                     if x is not None and y is not None]
            out[method][b] = t_ci(diffs) if diffs else None
    return out


def verdict(d: dict | None) -> str:
    """wins / loses / ties from a paired interval; — without two seeds to measure it on."""
    if d is None or d["n"] < 2:
        return "—"
    return "wins" if d["lo"] > 0 else "loses" if d["hi"] < 0 else "ties"


def _paired_cell(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["n"] < 2:
        return f"{d['mean']:+.3f} (1 seed: no interval)"
    return f"{d['mean']:+.3f} ± {(d['hi'] - d['lo']) / 2:.3f} ({d['n']}): {verdict(d)}"


def paired_table(records: list[dict], budgets: tuple, baseline: str) -> list[str]:
    diffs = paired_differences(records, budgets, baseline)
    if not diffs:
        return [f"No method besides the baseline {baseline}."]
    rows = [[method] + [_paired_cell(per[b]) for b in budgets] for method, per in diffs.items()]
    return md_table([f"method − {baseline}"] + [f"KL ≤ {label(b)}" for b in budgets], rows)


def _method_tables(agg: list[dict]) -> list[str]:
    """One table per method: every setting with the seeds that back it and whether they converged."""
    lines = []
    for method in dict.fromkeys(a["method"] for a in agg):
        rows = [[f"{a['knob']} = {setting_name(a)}", f"{a['n']} ({', '.join(map(str, a['seeds']))})",
                 format_ci(a["reward"]), format_ci(a["kl"], 2), format_ci(a["length"], 1),
                 f"{100 * a['cap_rate']['mean']:.1f}%",
                 "—" if a["train_tokens"] is None else f"{a['train_tokens']:,.0f}",
                 "yes" if a["converged"] else "**no**"] for a in agg if a["method"] == method]
        lines += ["", f"### {method}", ""] + md_table(
            ["setting", "seeds", "reward", "KL to SFT", "mean length", "cap rate", "training tokens", "converged"], rows)
    return lines


def _selection_table(selection: list[dict]) -> list[str]:
    if not selection:
        return ["The teachers were not selected (no `select` in the spec)."]
    rows = [[str(s["seed"]), f"lr {label(s['chosen']['lr'])}, {s['chosen']['epochs']} ep", str(s["held_out_pairs"])]
            + [f"{c['dpo']['accuracy']:.3f} / {c['rev']['accuracy']:.3f}" for c in s["candidates"]] for s in selection]
    budgets = [f"lr {label(c['lr'])}, {c['epochs']} ep: DPO / reverse acc." for c in selection[0]["candidates"]]
    return md_table(["seed", "chosen teachers", "held-out pairs"] + budgets, rows)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def summary_data(root: Path, budgets: tuple = (2, 5, 10), length_budgets: tuple = (),
                 converged_kl: float = CONVERGED_KL, baseline: str = "dpo") -> dict:
    """Everything the summary's tables are rendered from (render_summary), JSON-ready: the options, the sweep's
    record (commit, command, time and load), each seed's teacher selection and one record per finished run."""
    root = Path(root)
    selection = [{"seed": int(p.parent.parent.name.split("-", 1)[1]), **json.loads(p.read_text(encoding="utf-8"))}
                 for p in sorted(root.glob("seed-*/*/selection.json"))]
    for s in selection:
        for c in s["candidates"]:  # absolute paths of one machine: not part of the result
            c.pop("dpo_dir", None)
            c.pop("rev_dir", None)
    return {"options": {"budgets": list(budgets), "length_budgets": list(length_budgets),
                        "converged_kl": converged_kl, "baseline": baseline},
            "sweep": _read_json(root / "sweep.json"), "selection": selection, "records": collect(root)}


def records_of(data: dict) -> list[dict]:
    """The records of summary_data, with the tuples JSON turned into lists back."""
    return [{**r, "order": tuple(r["order"])} for r in data["records"]]


_INTRO = ("Every value is the mean over seeds ± the half-width of a normal-approximation 95% interval over seeds "
          "(1.96·s/√n; with few seeds it is narrower than a t interval would be), with the number of seeds that back "
          "it. Rewards and KL come from each run's final evaluation on held-out prompts; KL is to the SFT model, in "
          "nats per response. Seeds are whole-pipeline seeds where the spec says so (docs/RESULTS.md).")


def render_summary(data: dict) -> list[str]:
    """The summary's markdown (without a title) from summary_data."""
    records = records_of(data)
    opts = data["options"]
    budgets, converged_kl = tuple(opts["budgets"]), opts["converged_kl"]
    if not records:
        return ["No finished runs yet."]
    agg = aggregate(records, converged_kl)
    kept = [r for r in records if converged(r, converged_kl)]
    kept_agg = [a for a in agg if a["converged"]]
    seeds = sorted({r["seed"] for r in records})
    lines = [f"{len(agg)} settings over seeds {', '.join(map(str, seeds))} ({len(records)} runs). " + _INTRO, "",
             f"**Converged runs only.** {len(records) - len(kept)} of {len(records)} runs are distilled students "
             f"whose final KL to their teacher is above {label(converged_kl)} nats/token: they are listed under "
             "'Every setting' and 'Distillation convergence', and are no point of any frontier or table.", "",
             "![frontier](frontier.png)", ""]
    lines += ["## Paired differences against the baseline", "",
              f"Per seed, each method's best reward within the KL budget minus {opts['baseline']}'s best within it "
              "(the same seed: the same SFT model, pairs and teachers); mean ± half-width of a Student-t 95% interval "
              "over the seeds where both have a converged run within the budget (their number in parentheses). "
              "wins / loses: the interval is above / below 0; ties: it holds 0.", ""]
    lines += paired_table(kept, budgets, opts["baseline"])
    lines += ["", "## Best reward within a KL budget, pooled", "",
              "From each method's frontier over its settings' means over seeds (setting in parentheses; "
              "— : none within it).", ""] + _budget_table(kept_agg, budgets)
    lines += ["", "## Best reward within a KL budget, per seed", "",
              "Each seed's frontier read at the budget, then the mean over the seeds that have a run within it "
              "(k of the n seeds the sweep ran).", ""] + _per_seed_table(kept, budgets, len(seeds))
    if opts["length_budgets"]:
        lines += ["", "## Best reward at a matched mean length", "",
                  f"Longer answers score differently on this task; the reference's mean length is "
                  f"{statistics.mean(r['ref_length'] for r in records):.1f} tokens.", ""]
        lines += _budget_table(kept_agg, tuple(opts["length_budgets"]), "length", "mean length")
    lines += ["", "## Reward against training tokens at matched KL", "",
              "Per method and number of epochs: the tokens trained on (DPO: chosen and rejected; distillation: "
              "the responses distilled) and the best reward within each KL budget over its learning rates and "
              "knob values.", ""] + _tokens_table(kept_agg, budgets)
    lines += ["", "## The teachers each seed chose", "",
              "Held-out implicit-reward accuracy of DPO (chosen over rejected) and of reverse DPO (rejected over "
              "chosen) at every budget of the grid; the seed's teachers are the least-trained pair (smallest "
              "lr × epochs) whose mean is within one standard error of the best (selection.py).", ""]
    lines += _selection_table(data["selection"])
    lines += ["", "## Teacher health: p(EOS) where chosen responses end, α_t, TVD and the mirror effect", "",
              "From `evaluate --teacher --pairs`: the mean probability of EOS where chosen responses end, the "
              "medians of α_t and TVD_t over response positions, and the median of "
              "cos(log π_dpo − log π_sft, −(log π_rev − log π_sft)).", ""]
    lines += diagnostics_table(records)
    lines += ["", "## Distillation convergence", ""] + _convergence_table(agg, converged_kl)
    lines += ["", "## Every setting, per method", ""] + _method_tables(agg)
    return lines


def write_summary(root: Path, out_md: Path, budgets: tuple = (2, 5, 10), length_budgets: tuple = (),
                  converged_kl: float = CONVERGED_KL, baseline: str = "dpo") -> Path:
    """summary.md, with summary.json (its data) and frontier.png next to it, from every finished run under root."""
    root, out_md = Path(root), Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    data = summary_data(root, budgets, length_budgets, converged_kl, baseline)
    (out_md.parent / "summary.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    if data["records"]:
        plot_frontiers(data, out_md.parent / "frontier.png")
    lines = ["# AlignDistil sweep: reward against KL", ""] + render_summary(data)
    out_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_md


def plot_frontiers(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: sweeps run on headless machines
    import matplotlib.pyplot as plt

    records = records_of(data)
    threshold = data["options"]["converged_kl"]
    _plot_frontiers(plt, aggregate(records, threshold), records, threshold, path)
