"""`aligndistil sweep SPEC`: reward-vs-KL frontiers over seeds and knobs, summarised in summary.md.

A spec (pipelines/experiments.yaml) has root, seeds, base (pipeline-style stages shared by every
run of a seed, in ROOT/seed-S/NAME), defaults (`with` values per command; `evaluate` is required),
methods and summary (budgets, baseline, convergence). A method is

    dpo-beta: {knob: beta, chain: [{name: model, stage: train-dpo, with: {beta: "{knob}"}}],
               values: [0.05, 0.1]}     # or runs: [{value: 2, with: {CHAIN-STAGE-NAME: {...}}}]

and each of its runs is ROOT/seed-S/METHOD/KNOB-VALUE/: the chain's stages (the last one is the
model), an `eval` stage (the evaluate defaults with models: {model: ...}) and run.json, written
once all of them are complete; collect() reads it. "{NAME}" is a base or earlier chain stage's
directory, "{knob}" the run's value, "{seed_dir}" ROOT/seed-S; defaults < chain < run values.

Stages with the same command and resolved config (bar `out`) are one directory, the first one
planned: DPO at beta 0.1 is the teachers' DPO, and their evaluations are shared too. Each stage is
skipped when pipeline.is_up_to_date says it is complete, so a rerun only computes what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import atomic_write_json, config_dict
from .config import build_config, read_yaml
from .errors import ConfigError, UserError
from .pipeline import FIXED, for_rerun, is_up_to_date, substitute
from .report import md_table, read_metrics, format_ci, mean_ci
from .stages import STAGES

console = Console(stderr=True)
_SPEC_KEYS = {"root", "seeds", "base", "defaults", "methods", "summary"}
_BUILTINS = ("knob", "seed_dir")


@dataclass(frozen=True)
class Run:
    method: str
    knob: str
    value: Any
    order: tuple[int, int]          # (method, run) position in the spec: the order of tables and plots
    seed: int
    dir: Path
    stages: tuple                   # ((command, config), ...): the chain, then the evaluation
    model: str                      # the trained model's directory (the chain's last stage)


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


def _method_runs(name: str, method: dict) -> list[tuple[Any, dict]]:
    """(value, per-chain-stage overrides) for each run of a method; `values` is shorthand for runs."""
    if not isinstance(method, dict) or not method.get("knob") or not isinstance(method.get("chain"), list) \
            or not method["chain"]:
        raise ConfigError(f"sweep method {name!r}: expected knob, chain and values (or runs)")
    unknown = set(method) - {"knob", "chain", "values", "runs"}
    if unknown or ("values" in method) == ("runs" in method):
        raise ConfigError(f"sweep method {name!r}: give exactly one of values, runs (unknown keys: {sorted(unknown)})")
    runs = [{"value": v} for v in method["values"]] if "values" in method else method["runs"]
    if not runs or not all(isinstance(r, dict) and "value" in r for r in runs):
        raise ConfigError(f"sweep method {name!r}: every run needs a value")
    labels = [label(_norm(r["value"])) for r in runs]
    if len(set(labels)) < len(labels):  # one directory per value
        raise ConfigError(f"sweep method {name!r}: repeated value in {labels}")
    return [(_norm(r["value"]), dict(r.get("with") or {})) for r in runs]


class _Planner:
    """Resolves stage entries to configs for one seed, merging identical work into one directory."""

    def __init__(self, spec: dict, root: Path, seed: int):
        self.defaults = spec.get("defaults") or {}
        self.seed, self.seed_dir = seed, root / f"seed-{seed}"
        self.outs: dict[str, str] = {"seed_dir": str(self.seed_dir)}
        self.seen: dict[str, tuple[str, Any]] = {}

    def resolve(self, entry: dict, out: Path, outs: dict, where: str) -> tuple[str, Any]:
        if not isinstance(entry, dict) or set(entry) - {"name", "stage", "with"} or entry.get("stage") not in STAGES:
            raise ConfigError(f"{where}: expected name, stage (one of {', '.join(STAGES)}) and with")
        stage = entry["stage"]
        values = substitute({**(self.defaults.get(stage) or {}), **(entry.get("with") or {})}, outs, where)
        values.setdefault("seed", self.seed)
        values.update(out=str(out), **FIXED.get(stage, {}))
        config = build_config(STAGES[stage].config, values, where)
        key = stage + json.dumps({k: v for k, v in config_dict(config).items() if k != "out"}, sort_keys=True)
        return self.seen.setdefault(key, (stage, config))

    def chain(self, entries: list, parent: Path, outs: dict, where: str, overrides: dict | None = None) -> list:
        """Resolve entries in order; each one's directory is "{name}" to the entries after it."""
        stages = []
        for i, entry in enumerate(entries, start=1):
            name = str(entry.get("name", entry.get("stage"))) if isinstance(entry, dict) else f"#{i}"
            if name in outs or name in _BUILTINS:
                raise ConfigError(f"{where}: stage name {name!r} is already taken")
            if name in (overrides or {}):
                entry = {**entry, "with": {**(entry.get("with") or {}), **overrides[name]}}
            stages.append(self.resolve(entry, parent / name, outs, f"{where} ({name})"))
            outs[name] = stages[-1][1].out
        return stages

    def run(self, method: str, spec: dict, value: Any, overrides: dict, order: tuple[int, int]) -> Run:
        run_dir = self.seed_dir / method / f"{spec['knob']}-{label(value)}"
        outs = {**self.outs, "knob": label(value)}
        stages = self.chain(spec["chain"], run_dir, outs, f"sweep method {method!r}", overrides)
        model = stages[-1][1].out
        evaluation = {"stage": "evaluate", "with": {"models": {"model": model}}}
        stages.append(self.resolve(evaluation, run_dir / "eval", outs, f"sweep method {method!r} (eval)"))
        return Run(method, str(spec["knob"]), value, order, self.seed, run_dir, tuple(stages), model)


def load_spec(path: Path) -> dict:
    spec = read_yaml(path)
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_SPEC_KEYS))}")
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers >= 0")
    if not isinstance(spec.get("base"), list) or not isinstance(spec.get("methods"), dict) or not spec["methods"]:
        raise ConfigError(f"{path}: 'base' must be a list of stages and 'methods' a non-empty mapping")
    if "evaluate" not in (spec.get("defaults") or {}):
        raise ConfigError(f"{path}: defaults.evaluate (ref, prompts, ...) is required to evaluate every run")
    return spec


def plan(spec: dict, root: Path) -> tuple[dict[int, list], list[Run]]:
    """Every config of the sweep, validated before anything runs: (base stages per seed, runs)."""
    base, runs = {}, []
    for seed in spec["seeds"]:
        planner = _Planner(spec, root, seed)
        base[seed] = planner.chain(spec["base"], planner.seed_dir, planner.outs, "sweep base")
        for i, (method, mspec) in enumerate(spec["methods"].items()):
            for j, (value, overrides) in enumerate(_method_runs(method, mspec)):
                runs.append(planner.run(method, mspec, value, overrides, (i, j)))
    return base, runs


def _run_stage(stage: str, config, force: bool, done: set[str], root: Path) -> None:
    if config.out in done:  # shared with an earlier run of this sweep: already run or checked
        return
    if not force and is_up_to_date(config, root):
        console.print(f"[dim]skip[/dim] {stage}: {config.out} is complete and up to date")
    else:
        config = for_rerun(config, force)
        console.print(f"[bold]run[/bold] {stage} -> {config.out}")
        STAGES[stage].run(config)
    done.add(config.out)


def _run_chain(stages: list, force: bool, done: set[str], root: Path) -> None:
    for stage, config in stages:
        _run_stage(stage, config, force, done, root)


def _write_run_json(root: Path, run: Run) -> None:
    # Paths relative to root, so a moved or copied root still reads.
    model, evaluation = (str(Path(p).relative_to(root)) for p in (run.model, run.stages[-1][1].out))
    atomic_write_json(run.dir / "run.json", {"method": run.method, "knob": run.knob, "value": run.value,
                                             "order": list(run.order), "seed": run.seed, "model": model,
                                             "eval": evaluation})


def run_sweep(spec_path: Path, root: Path | None = None, force: bool = False) -> Path:
    """Run (or skip) every stage of the sweep, then write ROOT/summary.md; returns its path.

    A failing run (UserError) does not stop the others: the summary is written from what
    finished, and the failures are raised together at the end.
    """
    spec = load_spec(Path(spec_path))
    root = Path(root or spec.get("root", "runs/experiments"))
    base, runs = plan(spec, root)
    done: set[str] = set()
    failed: list[str] = []
    for seed, stages in base.items():
        seed_runs = [r for r in runs if r.seed == seed]
        for run in seed_runs:  # run.json marks a finished run: written back only once all its stages are
            (run.dir / "run.json").unlink(missing_ok=True)
        try:
            _run_chain(stages, force, done, root)
        except UserError as e:
            failed.append(f"seed {seed}, shared stages (its runs were skipped): {e}")
            continue
        for run in seed_runs:
            try:
                _run_chain(run.stages, force, done, root)
            except UserError as e:
                failed.append(f"{run.dir}: {e}")
                continue
            _write_run_json(root, run)
    opts = spec.get("summary") or {}
    out = write_summary(root, root / "summary.md", budgets=tuple(opts.get("budgets", (2, 5, 10))),
                        baseline=_pick(opts.get("baseline")),
                        convergence=[_pick(e) for e in opts["convergence"]] if opts.get("convergence") else None)
    if failed:
        raise UserError(f"sweep: {len(failed)} failure(s), {out} covers the rest: " + "; ".join(failed))
    return out


def _pick(entry: dict | None) -> tuple[str, Any] | None:
    """A summary option's {method, value} as the (method, value) key records are grouped by."""
    return (entry["method"], _norm(entry["value"])) if entry else None


def collect(root: Path) -> list[dict]:
    """One record per finished (method, knob value, seed), from run.json and its eval report.json."""
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
        records.append({
            "method": run["method"], "knob": run["knob"], "value": _norm(run["value"]),
            "order": tuple(run["order"]), "seed": run["seed"],
            "reward": res["reward"]["mean"], "kl": res["kl"]["mean"], "length": res["length"]["mean"],
            "cap_rate": res["length"]["cap_rate"], "win_rate": (res.get("win_rate") or {}).get("mean"),
            "ref_reward": ref["reward"]["mean"], "metrics": str(root / run["model"] / "metrics.jsonl")})
    return sorted(records, key=lambda r: (r["order"], r["seed"]))


def aggregate(records: list[dict]) -> list[dict]:
    """Per (method, knob value): mean and 95% interval over seeds of reward, KL, length and cap rate."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["value"]), []).append(r)
    return [{"method": method, "knob": rs[0]["knob"], "value": value, "order": rs[0].get("order", (0, 0)),
             "n": len(rs), "seeds": [r["seed"] for r in rs],
             **{k: mean_ci([r[k] for r in rs]) for k in ("reward", "kl", "length", "cap_rate")}}
            for (method, value), rs in groups.items()]


def frontier(points: list[tuple]) -> list[tuple]:
    """Upper-left Pareto frontier of (kl, reward, ...) points: the best reward for KL <= k, by KL."""
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:  # nothing at lower or equal KL does as well
            out.append(p)
            best = p[1]
    return out


def best_within_budget(aggregated: list[dict], budgets=(2, 5, 10)) -> dict:
    """method -> budget -> (best mean reward, knob value) over points with mean KL <= budget, or None."""
    best: dict[str, dict] = {}
    for a in aggregated:
        per = best.setdefault(a["method"], {b: None for b in budgets})
        for b in budgets:
            if a["kl"]["mean"] <= b and (per[b] is None or a["reward"]["mean"] > per[b][0]):
                per[b] = (a["reward"]["mean"], a["value"])
    return best


def steps_to_match(curve: list[tuple], target_reward: float, max_kl: float) -> int | None:
    """First step of a (step, eval_reward, eval_kl) curve with reward >= target and KL <= max_kl."""
    for step, reward, kl in sorted(curve):
        if reward >= target_reward and kl <= max_kl:
            return int(step)
    return None


def read_curve(metrics: Path) -> list[tuple[int, float, float]]:
    """(step, eval_reward, eval_kl) from a training run's metrics.jsonl; [] without --eval-every."""
    rows = read_metrics(Path(metrics)) if Path(metrics).is_file() else []
    return [(r["step"], r["eval_reward"], r["eval_kl"]) for r in rows
            if all(isinstance(r.get(k), (int, float)) for k in ("step", "eval_reward", "eval_kl"))]


def _curve(record: dict) -> tuple[list[tuple], str]:
    """The record's eval curve, or else its final evaluation as a one-point curve at its last step."""
    curve = read_curve(Path(record["metrics"]))
    if curve:
        return curve, "eval curve"
    path = Path(record["metrics"])
    last = max((r["step"] for r in read_metrics(path) if isinstance(r.get("step"), int)), default=None) \
        if path.is_file() else None
    return ([] if last is None else [(last, record["reward"], record["kl"])]), "final evaluation"


_INTRO = ("Every value is the mean over seeds ± the half-width of a normal-approximation 95% interval over seeds "
          "(1.96·s/√n; with few seeds it is narrower than a t interval would be). Rewards and KL come from each "
          "run's final evaluation on held-out prompts; KL is to the SFT model.")
_STEPS_NOTE = ("Per seed, against that seed's baseline run; from the eval curves when logged, else from the final "
               "evaluation only (then a run either reaches it at its last step or not at all).")


def _plot_frontier(plt, agg: list[dict], records: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = dict.fromkeys(a["method"] for a in agg)
    for method in methods:
        pts = [a for a in agg if a["method"] == method]
        numeric = all(isinstance(a["value"], (int, float)) for a in pts)
        if numeric:  # a knob with an order is one curve; named variants are separate points
            pts.sort(key=lambda a: a["value"])
        xs, ys = [a["kl"]["mean"] for a in pts], [a["reward"]["mean"] for a in pts]
        ax.errorbar(xs, ys, xerr=[(a["kl"]["hi"] - a["kl"]["lo"]) / 2 for a in pts],
                    yerr=[(a["reward"]["hi"] - a["reward"]["lo"]) / 2 for a in pts],
                    fmt="o-" if numeric else "s", capsize=3, label=f"{method} ({pts[0]['knob']})")
        for a in pts:
            ax.annotate(label(a["value"]), (a["kl"]["mean"], a["reward"]["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    edge = frontier([(a["kl"]["mean"], a["reward"]["mean"]) for a in agg])
    ax.plot([p[0] for p in edge], [p[1] for p in edge], "k--", linewidth=1, alpha=0.5, label="Pareto frontier")
    ref = mean_ci([r["ref_reward"] for r in records])["mean"]
    ax.plot([0], [ref], "k*", markersize=12, label="reference (SFT)")
    ax.set_xlabel("KL to the SFT reference, nats")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold reward vs KL (mean over seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # a sweep draws many figures in one process


def _plot_convergence(plt, curves: dict, path: Path) -> None:
    """eval_reward and eval_kl against step: the mean over seeds, shaded from min to max."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (method, value), per_seed in curves.items():
        by_step: dict[int, list[tuple]] = {}
        for curve in per_seed:
            for step, reward, kl in curve:
                by_step.setdefault(step, []).append((reward, kl))
        steps = sorted(by_step)
        for ax, i in zip(axes, (0, 1)):
            vals = [[p[i] for p in by_step[s]] for s in steps]
            line, = ax.plot(steps, [sum(v) / len(v) for v in vals], "o-", markersize=3, label=f"{method} {label(value)}")
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
    for ax, name in zip(axes, ("eval gold reward", "eval KL to the initial model, nats")):
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Convergence (mean over seeds; band: min to max)")
    _save(plt, fig, path)


def _budget_table(agg: list[dict], budgets: tuple) -> list[str]:
    by_key = {(a["method"], a["value"]): a for a in agg}
    knobs = {a["method"]: a["knob"] for a in agg}
    rows = [[method, knobs[method]] + ["—" if per[b] is None else
                                       f"{format_ci(by_key[(method, per[b][1])]['reward'])} ({label(per[b][1])})"
                                       for b in budgets]
            for method, per in best_within_budget(agg, budgets).items()]
    return md_table(["method", "knob"] + [f"KL ≤ {label(b)}" for b in budgets], rows)


def _steps_table(records: list[dict], baseline: tuple) -> list[str]:
    """Per (method, value): steps to reach the baseline's final reward at <= its KL, seed by seed."""
    curves = [(r, *_curve(r)) for r in records]
    # Per seed, the baseline's last point: same prompts and estimator as the other runs' curves.
    target = {r["seed"]: max(c)[1:] for r, c, _ in curves if (r["method"], r["value"]) == baseline and c}
    if not target:
        return [f"No finished run of the baseline {baseline[0]} {label(baseline[1])}."]
    groups: dict[tuple, list] = {}
    for r, curve, source in curves:
        if r["seed"] in target:
            groups.setdefault((r["method"], r["value"]), []).append((r["seed"], curve, source))
    rows = []
    for (method, value), runs in groups.items():
        hits = [steps_to_match(curve, *target[seed]) for seed, curve, _ in runs]
        reached = [h for h in hits if h is not None]
        trained = max((max(curve)[0] for _, curve, _ in runs if curve), default=None)
        rows.append([method, label(value), format_ci(mean_ci(reached), 1) if reached else "not reached",
                     f"{len(reached)}/{len(hits)}", "—" if trained is None else label(trained),
                     ", ".join(sorted({source for _, _, source in runs}))])
    return md_table(["method", "knob value", "steps (mean ± 95% CI over seeds that reached it)", "seeds reached",
                      "steps trained", "measured on"], rows)


def _runs_table(agg: list[dict]) -> list[str]:
    rows = [[a["method"], f"{a['knob']} = {label(a['value'])}", str(a["n"]), format_ci(a["reward"]),
             format_ci(a["kl"]), format_ci(a["length"], 1), f"{100 * a['cap_rate']['mean']:.1f}%"] for a in agg]
    return md_table(["method", "knob", "seeds", "gold reward", "KL to SFT", "mean length", "cap rate"], rows)


def write_summary(root: Path, out_md: Path, budgets: tuple = (2, 5, 10), baseline: tuple | None = None,
                  convergence: list[tuple] | None = None) -> Path:
    """summary.md with frontier.png (and convergence.png when runs logged eval_*) next to it.

    baseline (method, value) is the run whose final reward and KL the steps table targets;
    convergence lists the (method, value) curves to plot (None: every run that logged eval_*).
    """
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: sweeps run on headless machines
    import matplotlib.pyplot as plt

    root, out_md = Path(root), Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    records = collect(root)
    agg = aggregate(records)
    lines = ["# AlignDistil sweep: gold reward against KL", ""]
    if not records:
        out_md.write_text("\n".join(lines + ["No finished runs under " + str(root) + " yet."]) + "\n", encoding="utf-8")
        return out_md
    seeds = sorted({r["seed"] for r in records})
    lines += [f"{len(agg)} settings over seeds {', '.join(map(str, seeds))} ({len(records)} runs). " + _INTRO, "",
              "![frontier](frontier.png)", ""]
    _plot_frontier(plt, agg, records, out_md.parent / "frontier.png")
    curves: dict[tuple, list] = {}
    for r in records:
        curve = read_curve(Path(r["metrics"]))
        if curve and (convergence is None or (r["method"], r["value"]) in convergence):
            curves.setdefault((r["method"], r["value"]), []).append(curve)
    if curves:
        _plot_convergence(plt, curves, out_md.parent / "convergence.png")
        lines += ["![convergence](convergence.png)", ""]
    else:
        # A plot left by an earlier sweep must not pass for this one's.
        (out_md.parent / "convergence.png").unlink(missing_ok=True)
        lines += ["No run logged eval_reward/eval_kl (train with --eval-every): no convergence plot.", ""]
    lines += ["## Best gold reward within a KL budget", "", "(knob value in parentheses; — : no setting within it)", ""]
    lines += _budget_table(agg, budgets)
    if baseline:
        lines += ["", f"## Steps to reach {baseline[0]} {label(baseline[1])}'s final reward at no more than its KL", "",
                  _STEPS_NOTE, ""]
        lines += _steps_table(records, baseline)
    lines += ["", "## Every setting", ""] + _runs_table(agg)
    out_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_md
