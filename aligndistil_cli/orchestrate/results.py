"""`aligndistil results`: the published numbers, written from a finished sweep and the default run.

  docs/results/summary.json  the sweep's summary_data (sweep_summary.py) and the default run's table
  docs/RESULTS.md            its tables, between the lines BEGIN and END
  README.md                  the headline, between the same lines
  docs/frontier.png          the frontier plot

Every block names the commit and the command that measured it. tests/unit/test_results_docs.py
renders summary.json again and compares it with the docs, so a hand-edited number fails the tests.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.eval.report import format_ci, md_table, unconverged
from aligndistil_cli.orchestrate.summary import (
    converged,
    label,
    paired_table,
    plot_frontiers,
    records_of,
    render_summary,
    setting_key,
    summary_data,
    summary_options,
)
from aligndistil_cli.orchestrate.sweep import git

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _manifest(path: Path) -> dict:
    file = Path(path) / "manifest.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def default_run(eval_dir: Path) -> dict:
    """The default run's results (its evaluate report) and the r of its distilled student."""
    path = Path(eval_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"{path}: no report of the default run; run `make full-pipeline` first")
    report = json.loads(path.read_text(encoding="utf-8"))
    rows = {name: {k: res.get(k) for k in ("reward", "kl", "length", "final_kl_teacher")}
            for name, res in report["models"].items()}
    students = [res["path"] for res in report["models"].values() if res.get("final_kl_teacher") is not None]
    config = _manifest(students[0]).get("config", {}) if students else {}
    cache = _manifest(config["cache"]).get("config", {}) if config.get("cache") else {}
    r = config.get("alpha_scale") if config.get("alpha_scale") is not None else cache.get("alpha_scale")
    return {"pipeline": "pipelines/tiny.yaml", "reward_name": report.get("reward_name"), "reference": report["reference"],
            "num_prompts": report["num_prompts"], "models": rows, "student_r": r}


# A 1-minute load average at or above this, before the sweep's own jobs started, means other work shared the cores.
SHARED_LOAD = 1.0


def _provenance(data: dict) -> str:
    sweep = data.get("sweep") or {}
    seeds = sorted({r["seed"] for r in data["records"]})
    load = "; ".join(", ".join(f"{x:.1f}" for x in sweep.get(f"load_average_at_{when}", [])) for when in ("start", "end"))
    return (f"Written by `aligndistil results` from `{sweep.get('command', '?')}` at commit {sweep.get('commit', '?')}"
            + (" (with uncommitted changes)" if sweep.get("uncommitted_changes") else "")
            + f", {len(seeds)} whole-pipeline seeds, started {sweep.get('started', '?')}: "
            f"{sweep.get('wall_s', 0) / 60:.0f} min of wall time on {sweep.get('cpus', '?')} cores, "
            f"OMP_NUM_THREADS={sweep.get('omp_num_threads')}, load average {load} (1, 5, 15 min; at the start; at "
            f"the end){_machine(sweep)}.")


def _machine(sweep: dict) -> str:
    """Whether the wall time is an idle machine's: the load of the minute before the sweep started (its own jobs
    only count after that)."""
    start = sweep.get("load_average_at_start") or []
    if not start:
        return ""
    return ": the machine was shared" if start[0] >= SHARED_LOAD else ": the machine was idle when it started"


def render_results(data: dict) -> list[str]:
    """docs/RESULTS.md's block."""
    return [_provenance(data), ""] + render_summary(data)


def _spread(data: dict, method: str, value) -> str:
    """How far a rerun may land: the standard deviation over seeds of the default's own setting in the sweep,
    and the range of it over every converged setting with two seeds or more."""
    groups: dict[tuple, list[dict]] = {}
    for r in records_of(data):
        if converged(r, data["options"]["converged_kl"]):
            groups.setdefault(setting_key(r), []).append(r)
    sds = {key: statistics.stdev(r["reward"] for r in rs) for key, rs in groups.items() if len(rs) >= 2}
    if not sds:
        return "The sweep has no setting with two converged seeds: no spread to give."
    own = next((sd for key, sd in sds.items() if key[:2] == (method, value) and key[2] is None), None)
    text = (f"Across the sweep's whole-pipeline seeds, the standard deviation of a setting's reward ranges from "
            f"{min(sds.values()):.3f} to {max(sds.values()):.3f} (median {statistics.median(sds.values()):.3f}) over "
            f"its {len(sds)} converged settings")
    text += (f"; for the default's own setting ({method}, r = {label(value)}) it is {own:.3f}" if own is not None
             else f"; the default's own setting ({method}, r = {label(value)}) has fewer than two converged seeds")
    return text + (". A run of the default with another seed, or on a machine that rounds differently (another "
                   "thread count: `OMP_NUM_THREADS=1 make full-pipeline`), may land about that far from the table "
                   "above.")


def render_headline(data: dict) -> list[str]:
    """README.md's block: the default run's table, its spread over seeds, and the sweep's paired differences."""
    d = data["default"]
    rows = [[name + (" (unconverged)" if unconverged(res) else ""), format_ci(res["reward"]), format_ci(res["kl"], 2),
             f"{res['length']['mean']:.1f}", f"{100 * res['length']['cap_rate']:.1f}%",
             "—" if res["final_kl_teacher"] is None else f"{res['final_kl_teacher']:.3f}"]
            for name, res in d["models"].items()]
    opts = data["options"]
    return ([f"`make full-pipeline` ({d['pipeline']}, seed 0, {d['num_prompts']} held-out prompts; the student "
             f"distilled at r = {label(d['student_r'])}), as runs/tiny/eval held it when `aligndistil results` ran "
             f"at commit {d['written_at']}:", ""]
            + md_table(["model", d["reward_name"], f"KL to {d['reference']}", "mean length", "cap rate",
                        "final KL to teacher"], rows)
            + ["", _spread(data, "aligndistil", d["student_r"]), "",
               f"`make experiments` (docs/RESULTS.md), each method's best reward within a KL budget minus "
               f"{opts['baseline']}'s, paired by seed (Student-t 95% interval; seeds in parentheses):", ""]
            + paired_table([r for r in records_of(data) if converged(r, opts["converged_kl"])], tuple(opts["budgets"]),
                            opts["baseline"])
            + ["", _provenance(data)])


def fill_block(path: Path, lines: list[str]) -> None:
    """Replace what lies between BEGIN and END in path with lines."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise UserError(f"{path}: no block between the lines {BEGIN} and {END} to write the results into")
    path.write_text(text[: start + len(BEGIN)] + "\n" + "\n".join(lines) + "\n" + text[end:], encoding="utf-8")


def block(path: Path) -> str:
    """What lies between BEGIN and END in path (what fill_block wrote)."""
    text = path.read_text(encoding="utf-8")
    return text[text.index(BEGIN) + len(BEGIN) + 1 : text.index(END)]


def publish(root: Path, spec_path: Path, default_eval: Path, docs: Path, readme: Path) -> Path:
    """Write docs/results/summary.json, docs/frontier.png and the blocks of docs/RESULTS.md and README.md."""
    from aligndistil_cli.config.files import read_yaml

    data = summary_data(Path(root), **summary_options(read_yaml(Path(spec_path)).get("summary") or {}))
    if not data["records"]:
        raise UserError(f"{root}: no finished sweep runs; run `make experiments` first")
    data["default"] = {**default_run(default_eval), "written_at": git("rev-parse", "--short", "HEAD") or None}
    out = Path(docs) / "results" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    plot_frontiers(data, Path(docs) / "frontier.png")
    fill_block(Path(docs) / "RESULTS.md", render_results(data))
    fill_block(Path(readme), render_headline(data))
    return out
