"""`aligndistil sweep SPEC`: reward-vs-KL frontiers over seeds, knobs and training budgets, in summary.md.

A spec (pipelines/experiments.yaml) has root, seeds, base (pipeline-style stages shared by every
run of a seed, in ROOT/seed-S/NAME), an optional select {name: DIR, pairs: HELD-OUT PAIRS} (the
teachers of each seed: DPO and reverse DPO at every budget of the grid, the pair with the best
held-out implicit-reward accuracy linked as ROOT/seed-S/DIR/dpo and rev, which "{dpo}" and "{rev}"
name from then on; selection.py), defaults (`with` values per command; `evaluate` is required),
an optional grid {lr: [...], epochs: [...]}, methods and summary (budgets, length_budgets,
converged_kl; sweep_summary.py). A method is

    dpo-beta: {knob: beta, chain: [{name: model, stage: train-dpo, with: {beta: "{knob}"}}],
               values: [0.05, 0.1]}     # or runs: [{value: 2, with: {CHAIN-STAGE-NAME: {...}}}]

plus, optionally, `grid: CHAIN-STAGE-NAME` (every value at every (lr, epochs) of the grid, given to
that stage) and `eval: {...}` (overrides of its evaluation, e.g. a teacher: {models: {}, teacher:
"{teacher}"}). Each run is ROOT/seed-S/METHOD/KNOB-VALUE[_lr-LR_ep-EPOCHS]/: the chain's stages (the
last one is the model), an `eval` stage (the evaluate defaults with models: {model: ...}) and
run.json, written once all of them are complete; collect() reads it. "{NAME}" is a base or earlier
chain stage's directory, "{knob}" the run's value, "{seed_dir}" ROOT/seed-S; defaults < chain < run
values < the grid's.

Stages with the same command and resolved config (bar `out`) are one directory, the first one
planned: DPO at beta 0.1 is the teachers' DPO, and their evaluations are shared too. Each stage is
skipped when current.is_up_to_date says it is complete, so a rerun only computes what is missing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligndistil_cli.config.files import build_config, read_yaml
from aligndistil_cli.core.console import stderr as console
from aligndistil_cli.core.errors import ConfigError, UserError
from aligndistil_cli.core.hashing import config_dict
from aligndistil_cli.orchestrate.pipeline import FIXED, for_rerun, substitute
from aligndistil_cli.orchestrate.selection import Selection, choose_teachers
from aligndistil_cli.orchestrate.summary import _norm, label, summary_options, write_summary
from aligndistil_cli.rundir.artifacts import atomic_write_json
from aligndistil_cli.rundir.current import is_up_to_date
from aligndistil_cli.stages import STAGES

__all__ = ["load_spec", "plan", "run_sweep", "run_name", "write_summary"]

_SPEC_KEYS = {"root", "seeds", "shared", "base", "select", "defaults", "grid", "methods", "summary"}
_METHOD_KEYS = {"knob", "chain", "values", "runs", "grid", "eval"}
_BUILTINS = ("knob", "seed_dir")
SHARED_SEED = 0  # the seed of `shared` stages, unless their `with` gives one
SELECT = "select"  # a base list's (SELECT, selection.Selection) entry: the teachers are chosen there


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
    budget: tuple | None = None     # (lr, epochs) of the grid stage, for a method on the budget grid


def _method_runs(name: str, method: dict, grid: dict | None) -> list[tuple[Any, dict, tuple | None]]:
    """(value, per-chain-stage overrides, (lr, epochs) or None) for each run of a method.

    `values` is shorthand for runs; a method with `grid: STAGE` runs every value at every
    (lr, epochs) of the spec's grid, given to that chain stage.
    """
    if not isinstance(method, dict) or not method.get("knob") or not isinstance(method.get("chain"), list) \
            or not method["chain"]:
        raise ConfigError(f"sweep method {name!r}: expected knob, chain and values (or runs)")
    unknown = set(method) - _METHOD_KEYS
    if unknown or ("values" in method) == ("runs" in method):
        raise ConfigError(f"sweep method {name!r}: give exactly one of values, runs (unknown keys: {sorted(unknown)})")
    runs = [{"value": v} for v in method["values"]] if "values" in method else method["runs"]
    if not runs or not all(isinstance(r, dict) and "value" in r for r in runs):
        raise ConfigError(f"sweep method {name!r}: every run needs a value")
    labels = [label(_norm(r["value"])) for r in runs]
    if len(set(labels)) < len(labels):  # one directory per value
        raise ConfigError(f"sweep method {name!r}: repeated value in {labels}")
    stage = method.get("grid")
    if stage is not None and (not grid or stage not in {str(e.get("name")) for e in method["chain"]
                                                          if isinstance(e, dict)}):
        raise ConfigError(f"sweep method {name!r}: grid: {stage!r} needs the spec's grid (lr, epochs) and a chain "
                          "stage of that name")
    budgets = [(_norm(lr), int(ep)) for lr in grid["lr"] for ep in grid["epochs"]] if stage else [None]
    out = []
    for r in runs:
        for budget in budgets:
            overrides = dict(r.get("with") or {})
            if budget:
                overrides[stage] = {**overrides.get(stage, {}), "lr": budget[0], "epochs": budget[1]}
            out.append((_norm(r["value"]), overrides, budget))
    return out


def run_name(knob: str, value: Any, budget: tuple | None) -> str:
    """The run's directory under its method: KNOB-VALUE, plus _lr-LR_ep-EPOCHS on the budget grid."""
    return f"{knob}-{label(value)}" + (f"_lr-{label(budget[0])}_ep-{budget[1]}" if budget else "")


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

    def select(self, entry: dict, grid: dict | None, where: str = "sweep select") -> list:
        """The teacher candidates (DPO and reverse DPO at every budget of the grid) and their Selection
        (selection.py); "{dpo}" and "{rev}" name the chosen pair from then on."""
        if not isinstance(entry, dict) or set(entry) != {"name", "pairs"} or not grid:
            raise ConfigError(f"{where}: expected {{name: DIR, pairs: HELD-OUT PAIRS}} and the spec's grid (lr, epochs)")
        out = self.seed_dir / str(entry["name"])
        stages, candidates = [], []
        for lr in grid["lr"]:
            for epochs in grid["epochs"]:
                budget = (_norm(lr), int(epochs))
                pair = [self.resolve({"name": name, "stage": stage, "with": {"lr": budget[0], "epochs": budget[1]}},
                                     out / f"lr-{label(budget[0])}_ep-{budget[1]}" / name, self.outs, where)
                        for name, stage in (("dpo", "train-dpo"), ("rev", "train-reverse-dpo"))]
                stages += pair
                candidates.append((budget, pair[0][1], pair[1][1]))
        evaluation = substitute(self.defaults.get("evaluate") or {}, self.outs, where)
        selection = Selection(str(out), tuple(candidates), substitute({"p": entry["pairs"]}, self.outs, where)["p"],
                              (evaluation["prompts"], int(evaluation.get("num_prompts") or 0)))
        self.outs.update(dpo=str(out / "dpo"), rev=str(out / "rev"))
        return stages + [(SELECT, selection)]

    def run(self, method: str, spec: dict, value: Any, overrides: dict, order: tuple[int, int],
            budget: tuple | None = None) -> Run:
        run_dir = self.seed_dir / method / run_name(spec["knob"], value, budget)
        outs = {**self.outs, "knob": label(value)}
        stages = self.chain(spec["chain"], run_dir, outs, f"sweep method {method!r}", overrides)
        model = stages[-1][1].out
        # A method's `eval` overrides the evaluation (a teacher method: models {}, teacher "{teacher}").
        evaluation = {"stage": "evaluate", "with": {"models": {"model": model}, **(spec.get("eval") or {})}}
        stages.append(self.resolve(evaluation, run_dir / "eval", outs, f"sweep method {method!r} (eval)"))
        return Run(method, str(spec["knob"]), value, order, self.seed, run_dir, tuple(stages), model, budget)


def load_spec(path: Path) -> dict:
    spec = read_yaml(path)
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_SPEC_KEYS))}")
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers >= 0")
    if not isinstance(spec.get("shared", []), list):
        raise ConfigError(f"{path}: 'shared' must be a list of stages")
    if not isinstance(spec.get("base"), list) or not isinstance(spec.get("methods"), dict) or not spec["methods"]:
        raise ConfigError(f"{path}: 'base' must be a list of stages and 'methods' a non-empty mapping")
    if "evaluate" not in (spec.get("defaults") or {}):
        raise ConfigError(f"{path}: defaults.evaluate (ref, prompts, ...) is required to evaluate every run")
    grid = spec.get("grid")
    if grid is not None and not (isinstance(grid, dict) and set(grid) == {"lr", "epochs"}
                                 and all(isinstance(v, list) and v for v in grid.values())):
        raise ConfigError(f"{path}: 'grid' must be {{lr: [...], epochs: [...]}}, the budgets of methods with grid: STAGE")
    return spec


def plan(spec: dict, root: Path) -> tuple[dict[int, list], list[Run]]:
    """Every config of the sweep, validated before anything runs: (base stages per seed, runs).

    `shared` stages run once, in ROOT/shared with seed SHARED_SEED (whatever seeds the spec lists, so
    that a spec run seed by seed plans the same shared stages), for every seed: each seed's base list
    starts with them (a rerun of the same directory is skipped), and "{NAME}" reaches them.
    """
    base, runs = {}, []
    sharer = _Planner(spec, root, SHARED_SEED)
    sharer.seed_dir = root / "shared"
    sharer.outs["seed_dir"] = str(sharer.seed_dir)
    shared = sharer.chain(spec.get("shared") or [], sharer.seed_dir, sharer.outs, "sweep shared")
    for seed in spec["seeds"]:
        planner = _Planner(spec, root, seed)
        planner.outs.update({k: v for k, v in sharer.outs.items() if k != "seed_dir"})
        base[seed] = shared + planner.chain(spec["base"], planner.seed_dir, planner.outs, "sweep base")
        if spec.get("select") is not None:
            base[seed] += planner.select(spec["select"], spec.get("grid"))
        for i, (method, mspec) in enumerate(spec["methods"].items()):
            for j, (value, overrides, budget) in enumerate(_method_runs(method, mspec, spec.get("grid"))):
                runs.append(planner.run(method, mspec, value, overrides, (i, j), budget))
    return base, runs


def _run_stage(stage: str, config, force: bool, done: set[str], root: Path) -> bool:
    """Run the stage unless it is done or up to date; whether it ran."""
    if config.out in done:  # shared with an earlier run of this sweep: already run or checked
        return False
    ran = force or not is_up_to_date(config, root)
    if ran:
        config = for_rerun(config, force)
        console.print(f"[bold]run[/bold] {stage} -> {config.out}")
        STAGES[stage].run(config)
    else:
        console.print(f"[dim]skip[/dim] {stage}: {config.out} is complete and up to date")
    done.add(config.out)
    return ran


def _run_chain(stages: list, force: bool, done: set[str], root: Path) -> int:
    """Run (or skip) the stages in order; the number that ran."""
    ran = 0
    for stage, config in stages:
        if stage == SELECT:  # cheap, and its choice depends on the candidates: made again on every run
            choose_teachers(config)
        else:
            ran += _run_stage(stage, config, force, done, root)
    return ran


def _write_run_json(root: Path, run: Run) -> None:
    # Paths relative to root, so a moved or copied root still reads.
    model, evaluation = (str(Path(p).relative_to(root)) for p in (run.model, run.stages[-1][1].out))
    lr, epochs = run.budget or (None, None)
    atomic_write_json(run.dir / "run.json", {"method": run.method, "knob": run.knob, "value": run.value,
                                             "order": list(run.order), "seed": run.seed, "model": model,
                                             "eval": evaluation, "lr": lr, "epochs": epochs})


def _run_seed(spec_path: Path, root: Path, seed: int, force: bool) -> tuple[list[str], int]:
    """Run (or skip) one seed's base stages and runs: the failures (UserError, one line each) and the stages run."""
    base, runs = plan(load_spec(Path(spec_path)), root)
    seed_runs = [r for r in runs if r.seed == seed]
    for run in seed_runs:  # run.json marks a finished run: written back only once all its stages are
        (run.dir / "run.json").unlink(missing_ok=True)
    done: set[str] = set()
    try:
        ran = _run_chain(base[seed], force, done, root)
    except UserError as e:
        return [f"seed {seed}, base stages (its runs were skipped): {e}"], 0
    failed = []
    for run in seed_runs:
        try:
            ran += _run_chain(run.stages, force, done, root)
        except UserError as e:
            failed.append(f"{run.dir}: {e}")
            continue
        _write_run_json(root, run)
    return failed, ran


def git(*args: str) -> str:
    """git's output in the working directory, or '' outside a repository."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def sweep_start(spec_path: Path, jobs: int) -> dict:
    """Where the sweep's numbers come from, taken when it starts: the commit, the command, the machine's load."""
    return {"command": f"aligndistil sweep {spec_path}" + (f" --jobs {jobs}" if jobs > 1 else ""),
            "commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "start": time.time(),
            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": list(os.getloadavg())}


def sweep_end(start: dict, ran: int) -> dict:
    """The start record with the wall time, the stages run and the load at the end."""
    record = {k: v for k, v in start.items() if k != "start"}
    return {**record, "wall_s": round(time.time() - start["start"]), "stages_run": ran,
            "load_average_at_end": list(os.getloadavg())}


def run_sweep(spec_path: Path, root: Path | None = None, force: bool = False, jobs: int = 1) -> Path:
    """Run (or skip) every stage of the sweep, then write ROOT/summary.md; returns its path.

    Every config is planned (and checked) before anything runs. Seeds run one after another, or
    `jobs` at a time in processes of their own, after the shared stages. A failing run (UserError)
    does not stop the others: the summary is written from what finished, and the failures are
    raised together at the end.
    """
    start = sweep_start(spec_path, jobs)
    spec = load_spec(Path(spec_path))
    root = Path(root or spec.get("root", "runs/experiments"))
    base, _ = plan(spec, root)
    shared = base[spec["seeds"][0]][: len(spec.get("shared") or [])]
    ran = _run_chain(shared, force, set(), root)
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_seed, *zip(*[(spec_path, root, seed, force) for seed in base])))
    else:
        results = [_run_seed(spec_path, root, seed, force) for seed in base]
    failed = [line for lines, _ in results for line in lines]
    ran += sum(n for _, n in results)
    if ran:  # a rerun that computed nothing leaves the record of the run that did
        atomic_write_json(root / "sweep.json", sweep_end(start, ran))
    out = write_summary(root, root / "summary.md", **summary_options(spec.get("summary") or {}))
    if failed:
        raise UserError(f"sweep: {len(failed)} failure(s), {out} covers the rest: " + "; ".join(failed))
    return out
