"""A pipeline's wall time, stage by stage, for two or more source trees side by side (README "Wall time").

    python -m bench.pipeline_time BASE_TREE NEW_TREE [--pipeline pipelines/tiny.yaml] [--runs 2]

Each tree is a checkout of some commit (`git worktree add /tmp/base 6ca8da8`, or `git archive ... | tar -x`).
Runs alternate between the trees (tree 1, tree 2, ..., then again), each in a fresh process with
PYTHONPATH at that tree and an empty root, running that tree's own pipeline file with every stage's
`run()` timed. Prints one row per run and each tree's ratio of sums against the first tree, and
writes the JSON to --out. Threads are whatever the environment gives (set OMP_NUM_THREADS to pin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_result

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = ("init_toy", "sft", "make_prefs", "dpo", "precompute", "distill", "evaluate")

# Runs inside the tree's own code: wraps each stage module's run() with a timer, then runs the pipeline.
CHILD = """
import importlib, json, sys, time
from pathlib import Path
from aligndistil_cli.pipeline import run_file
times = []
for name in {modules!r}:
    module = importlib.import_module("aligndistil_cli.stages." + name)
    def timed(config, _run=module.run, _name=name):
        start = time.perf_counter()
        try:
            return _run(config)
        finally:
            times.append([_name, time.perf_counter() - start])
    module.run = timed
start = time.perf_counter()
run_file(Path(sys.argv[1]), root=Path(sys.argv[2]), force=True)
print("STAGE_TIMES " + json.dumps({{"total": time.perf_counter() - start, "stages": times}}))
"""


def one_run(tree: Path, pipeline: str) -> dict:
    """Run tree's pipeline once in a fresh process: total and per-stage seconds, and wall time with start-up."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD.format(modules=STAGE_MODULES), str(tree / pipeline), root],
                              env=env, cwd=tree, capture_output=True, text=True)
        wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STAGE_TIMES ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{tree}: the pipeline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    stages: dict[str, float] = {}
    for name, seconds in result["stages"]:
        stages[name] = stages.get(name, 0.0) + seconds  # make-prefs and train-dpo run twice in tiny.yaml
    return {"total_s": result["total"], "wall_s": wall, "stages_s": stages, "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", type=Path, help="source trees; the first is the baseline")
    ap.add_argument("--pipeline", default="pipelines/tiny.yaml",
                    help="pipeline file, relative to each tree (an absolute path: the same file for every tree)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_time.json"))
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    runs: dict[str, list[dict]] = {str(t): [] for t in trees}
    for i in range(args.runs):
        for tree in trees:
            r = one_run(tree, args.pipeline)
            runs[str(tree)].append(r)
            stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages_s"].items())
            print(f"{tree} run {i + 1}: total {r['total_s']:.0f} s (wall {r['wall_s']:.0f} s, load "
                  f"{r['load_average']:.1f}): {stages}", flush=True)
    base = str(trees[0])
    ratios = {t: sum(r["total_s"] for r in rs) / sum(r["total_s"] for r in runs[base]) for t, rs in runs.items()}
    for tree, ratio in ratios.items():
        print(f"{tree} / {base}: {ratio:.3f} (ratio of sums of stage totals over {args.runs} runs)")
    write_result(args.out, {"pipeline": args.pipeline, "runs": runs, "ratio_to_first": ratios,
                            "threads_env": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
