"""--report-to: each tracker, read back with its own library, holds what metrics.jsonl holds.

Offline and without mocks: TensorBoard's event reader, a W&B offline run's
transaction log, an MLflow file store, trackio's local database. A backend
whose package is not installed is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.test_resume import (
    has_checkpoint,
    run_in_process,
    stage_values,
    start_and_kill,
)

BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")
INSTALLED = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
STEPS = 5


def needs(backend: str):
    return pytest.mark.skipif(backend not in INSTALLED, reason=f"{backend} is not installed")


def tracker_env(tmp: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp / "trackio"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aligndistil_cli", *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)


@pytest.fixture(scope="module")
def tracked(runs, tmp_path_factory):
    """One sft run logging to every installed tracker, through the CLI, as a user runs it."""
    if not INSTALLED:
        pytest.skip("no tracker package is installed")
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "sft"
    values = stage_values(runs, "sft", out, max_steps=STEPS, batch_size=8, log_every=1)
    (tmp / "sft.yaml").write_text(yaml.safe_dump(values))
    proc = cli(["sft", "--config", str(tmp / "sft.yaml"), "--report-to", ",".join(INSTALLED),
                "--run-name", "tracked-sft", "--project", "aligndistil-test"], tracker_env(tmp))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return tmp, out, records


def expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def tensorboard_scalars(logdir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


@needs("tensorboard")
def test_tensorboard_events_equal_metrics_jsonl(tracked):
    _, out, records = tracked
    for key in ("loss", "lr", "grad_norm", "response_tokens_mean"):
        got = tensorboard_scalars(out / "logs" / "tensorboard", key)
        want = expected(records, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # events store float32
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any(rel.startswith("logs/") for rel in manifest["outputs"]), "tracker logs are not results"


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of a W&B offline run's transaction log (a LevelDB-style log of protobufs)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"step": record.history.step.num,
                             **{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item}})
    return rows


@needs("wandb")
def test_wandb_offline_history_equals_metrics_jsonl(tracked):
    _, out, records = tracked
    run_files = list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = wandb_history(run_files[0])
    for key in ("loss", "lr", "grad_norm"):
        got = [(h["step"], h[key]) for h in history if key in h]
        assert got == expected(records, key)


@needs("mlflow")
def test_mlflow_local_store_equals_metrics_jsonl(tracked):
    from mlflow import MlflowClient

    tmp, out, records = tracked
    client = MlflowClient(tracking_uri=tracker_env(tmp)["MLFLOW_TRACKING_URI"])
    run_id = (out / "logs" / "mlflow-run-id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.run_name == "tracked-sft"
    assert run.data.params["lr"] == str(json.loads((out / "stage_config.json").read_text())["lr"])
    for key in ("loss", "lr"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == expected(records, key)


@needs("trackio")
def test_trackio_local_logs_equal_metrics_jsonl(tracked):
    tmp, _, records = tracked
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('aligndistil-test', 'tracked-sft'), default=str))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tracker_env(tmp),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("loss", "grad_norm"):
        assert [(r["step"], r[key]) for r in logs if key in r] == expected(records, key)


@needs("tensorboard")
def test_resumed_run_logs_each_step_once(runs, tmp_path, monkeypatch):
    """Kill a run after a checkpoint, resume it: the events hold every step once, with the final values."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sft"
    values = stage_values(runs, "sft", out, max_steps=12, batch_size=8, save_every=3, log_every=1,
                          report_to="tensorboard")
    start_and_kill("sft", values, tmp_path, has_checkpoint)
    run_in_process("sft", values | {"resume": True})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = tensorboard_scalars(out / "logs" / "tensorboard", "loss")
    assert [s for s, _ in got] == list(range(1, 13))
    assert [v for _, v in got] == pytest.approx([v for _, v in expected(records, "loss")], rel=1e-6)


def test_missing_tracker_package_is_one_line_before_training(runs, tmp_path):
    """sys.modules[name] = None is Python's own way to make a package absent."""
    out = tmp_path / "sft"
    code = ("import sys; sys.modules['wandb'] = None; from aligndistil_cli.cli import main; "
            f"main(['sft', '--model', {str(runs / 'sft')!r}, '--data', {str(runs / 'toy' / 'sft.jsonl')!r}, "
            f"'--out', {str(out)!r}, '--report-to', 'tensorboard,wandb'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --report-to wandb needs the wandb package: pip install 'aligndistil[wandb]'"
    assert not out.exists()
