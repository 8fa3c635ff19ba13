"""--report-to: mirror metrics.jsonl to experiment trackers (TensorBoard, W&B, trackio, MLflow).

metrics.jsonl stays the source of truth. Trackers get exactly the records it
gets, as MetricsWriter writes them, plus evaluate's final table. A resumed run
continues without duplicates: TensorBoard purges the steps after the
checkpoint (SummaryWriter's purge_step) and logs them again; the others cannot
rewind, so they keep what the interrupted run sent and get only the steps past
it (the same values: resume reproduces an uninterrupted run). Only rank 0
logs under torchrun. Each backend uses its library's own API and is an
optional extra; tracker files go to OUT/logs/, which the manifest does not
list (they are logs, not results).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path

from aligndistil_cli.config.groups import Tracking
from aligndistil_cli.config.trackers import MODULES, parse_report_to
from aligndistil_cli.core.errors import UserError

LOG_DIR = "logs"
def require(value: str | None) -> None:
    """One line naming the extra when a tracker's package is missing, before any work starts."""
    for name in parse_report_to(value):
        if importlib.util.find_spec(MODULES[name]) is None:
            raise UserError(f"--report-to {name} needs the {MODULES[name]} package: "
                            f"pip install 'aligndistil[{name}]'")


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all (torchrun sets RANK for every worker)."""
    return int(os.environ.get("RANK", "0")) == 0


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, without the step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_id_file(out: Path, backend: str) -> Path:
    return Path(out) / LOG_DIR / f"{backend}-run-id"


def _run_id(out: Path, backend: str, resuming: bool, new_id) -> str:
    """The interrupted run's id when resuming, else a fresh one; kept in OUT/logs for the next resume."""
    path = _run_id_file(out, backend)
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = new_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def wait_for_a_new_second(logdir: Path) -> None:
    """TensorBoard reads a run's event files in name order, whose first key is the creation second
    (then host and PID). A writer that continues a file created in this same second could sort
    before it, and the older file's events would then replace the newer ones: wait out the second."""
    created = [p.name.split(".")[3] for p in logdir.glob("events.out.tfevents.*")]
    if any(c.isdigit() and int(c) >= int(time.time()) for c in created):
        time.sleep(1.0 - time.time() % 1.0 + 0.01)


class TensorBoard:
    """torch.utils.tensorboard.SummaryWriter into OUT/logs/tensorboard."""

    rewinds = True

    def __init__(self, out: Path, run_name: str, project: str, config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides every earlier event at or after it, so a resume replaces the steps after its
        # checkpoint and a fresh run (evaluate logs at step 0) replaces everything: never a duplicate.
        logdir = Path(out) / LOG_DIR / "tensorboard"
        wait_for_a_new_second(logdir)
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=first_step + 1 if first_step else 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        from aligndistil_cli.eval.report import md_table

        self.writer.add_text(name, "\n".join(md_table(columns, [[str(c) for c in r] for r in rows])), 0)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """wandb.init/log; offline with WANDB_MODE=offline. Runs land in OUT/logs/wandb."""

    rewinds = False

    def __init__(self, out: Path, run_name: str, project: str, config: dict, first_step: int):
        import wandb

        run_id = _run_id(out, "wandb", first_step > 0, lambda: uuid.uuid4().hex[:12])
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=config,
                              dir=str(Path(out) / LOG_DIR))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)})

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """trackio.init/log (local by default; TRACKIO_DIR chooses where)."""

    rewinds = False

    def __init__(self, out: Path, run_name: str, project: str, config: dict, first_step: int):
        import trackio

        self.trackio = trackio
        # trackio prints its banner on stdout, which carries only the output path.
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=project, name=run_name, config=config, embed=False,
                                    resume="allow" if first_step else "never", auto_log_cpu=False,
                                    auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import pandas as pd

        self.run.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))})

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


class Mlflow:
    """mlflow's client: the store is $MLFLOW_TRACKING_URI (mlflow's own default otherwise), the
    experiment is the project."""

    rewinds = False

    def __init__(self, out: Path, run_name: str, project: str, config: dict, first_step: int):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)

        def new_id() -> str:
            from mlflow.entities import Param

            run = self.client.create_run(experiment_id, run_name=run_name)
            # mlflow caps a parameter's value at 6,000 characters; the config's are far shorter but for paths.
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in config.items()])
            return run.info.run_id

        self.run_id = _run_id(out, "mlflow", first_step > 0, new_id)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.client.log_table(self.run_id, {c: [r[i] for r in rows] for i, c in enumerate(columns)},
                              artifact_file=f"{name}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio, "mlflow": Mlflow}


class Trackers:
    """Every --report-to backend of one run, fed like metrics.jsonl is.

    logged_through: the last step the interrupted run (if any) already sent;
    backends that cannot rewind skip up to it.
    """

    def __init__(self, backends: list, logged_through: int = 0):
        self.backends = backends
        self.logged_through = logged_through

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for backend in self.backends:
            if backend.rewinds or step > self.logged_through:
                backend.log(scalars(record), step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        for backend in self.backends:
            backend.log_table(name, columns, rows)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def start(cfg: Tracking, out: Path, config: dict, first_step: int = 0, logged_through: int = 0) -> Trackers:
    """The trackers cfg.report_to names (none off rank 0)."""
    names = parse_report_to(cfg.report_to)
    if not names or not is_main_process():
        return Trackers([])
    require(cfg.report_to)
    run_name = cfg.run_name or Path(out).resolve().name
    project = cfg.project or os.environ.get("WANDB_PROJECT") or "aligndistil"
    trackers = Trackers([], logged_through)
    for name in names:
        try:
            trackers.backends.append(BACKENDS[name](Path(out), run_name, project, config, first_step))
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start is one line, before any step
            trackers.close()
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--report-to {name}: cannot start the run: {reason}") from None
    return trackers
