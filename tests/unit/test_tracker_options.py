"""tracking.py without training: parsing --report-to, rank 0 only, and resume without duplicates."""

from __future__ import annotations

import importlib.util

import pytest

from aligndistil_cli.config.groups import Tracking
from aligndistil_cli.config.trackers import parse_report_to
from aligndistil_cli.core.errors import ConfigError
from aligndistil_cli.train import tracking


def test_parse_report_to():
    assert parse_report_to("none") == []
    assert parse_report_to(None) == []
    assert parse_report_to(" tensorboard, wandb ,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        parse_report_to("tensorbord")


def test_scalars_keep_numbers_only():
    record = {"step": 3, "loss": 0.5, "steps_done": 7, "flag": True, "name": "x"}
    assert tracking.scalars(record) == {"loss": 0.5, "steps_done": 7.0}


def test_only_rank_zero_starts_trackers(tmp_path, monkeypatch):
    cfg = Tracking(report_to="tensorboard", run_name=None, project=None)
    monkeypatch.setenv("RANK", "1")
    assert tracking.start(cfg, tmp_path, {}).backends == []
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_a_resumed_run_sends_each_step_once_to_a_tracker_that_cannot_rewind(tmp_path, monkeypatch):
    """The interrupted run sent steps 1-5 and checkpointed at 3; the resumed run recomputes 4-8."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = Tracking(report_to="mlflow", run_name="r", project="p")
    first = tracking.start(cfg, tmp_path, {"lr": 0.1})
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = tracking.start(cfg, tmp_path, {"lr": 0.1}, first_step=3, logged_through=5)
    for step in range(4, 9):
        resumed.log({"step": step, "loss": float(step)})
    resumed.close()
    run_id = (tmp_path / "logs" / "mlflow-run-id").read_text().strip()
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 9)]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_a_rerun_replaces_tensorboard_events_instead_of_adding_to_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = Tracking(report_to="tensorboard", run_name=None, project=None)
    for value in (1.0, 2.0):  # evaluate logs its table at step 0; a training run starts at step 1
        trackers = tracking.start(cfg, tmp_path, {})
        trackers.log({"step": 0, "table_value": value})
        trackers.log({"step": 1, "loss": value})
        trackers.close()
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("table_value")] == [(0, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0)]


def test_a_resumed_tensorboard_writer_never_shares_the_second_of_the_file_it_continues(tmp_path):
    """TensorBoard orders event files by name (creation second first): a continuation created in the
    same second as the interrupted run's file could be read before it and be overwritten by it."""
    import time

    from aligndistil_cli.train.tracking import wait_for_a_new_second

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    wait_for_a_new_second(tmp_path)
    assert int(time.time()) > now
