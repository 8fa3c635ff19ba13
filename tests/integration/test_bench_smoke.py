"""Every entry point bench/gpu_check.sh calls runs on CPU at tiny sizes, so a broken bench fails here,
not on a GPU machine lent for minutes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
# module: (arguments of a tiny CPU run, the JSON file it writes under the test's folder or None)
SMOKE = {
    "bench.run": (["-m", "bench.run", "--device", "cpu", "--preset", "smoke", "--out", "{out}/run.json"], "run.json"),
    "bench.fsdp_step": ([*TORCHRUN, "-m", "bench.fsdp_step", "--preset", "smoke", "--out", "{out}/fsdp.json"],
                        "fsdp.json"),
    "bench.kv_cache": (["-m", "bench.kv_cache", "--device", "cpu", "--shapes", "smoke", "--reps", "1",
                        "--out", "{out}/kv.json"], "kv.json"),
    "bench.teacher_precision": (["-m", "bench.teacher_precision", "--device", "cpu", "--positions", "16",
                                 "--hidden", "16", "--vocab", "64"], None),
    "bench.baselines": (["-m", "bench.baselines", "--device", "cpu", "--preset", "smoke", "--out", "{out}/base.json"],
                        "base.json"),
}


def gpu_check_modules() -> set[str]:
    """The python modules gpu_check.sh's steps run (pytest aside: the tests are the suite itself)."""
    steps = re.findall(r"^step \w+ \d+ (.*(?:\\\n.*)*)", (ROOT / "bench" / "gpu_check.sh").read_text(), re.M)
    return {m for step in steps for m in re.findall(r"-m ([\w.]+)", step)} - {"pytest", "torch.distributed.run"}


def test_every_gpu_check_entry_point_has_a_smoke_run():
    assert gpu_check_modules() == set(SMOKE)
    assert "torchrun" not in re.sub(r"torch\.distributed\.run", "", (ROOT / "bench" / "gpu_check.sh").read_text()
                                    .split("\nstep() {")[1]), "launch through python3 -m torch.distributed.run"


@pytest.mark.parametrize("module", sorted(SMOKE))
def test_gpu_check_entry_point_runs_on_cpu(module, tmp_path):
    args, written = SMOKE[module]
    done = subprocess.run([sys.executable, *(a.format(out=tmp_path) for a in args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    if written:
        assert json.loads((tmp_path / written).read_text())
