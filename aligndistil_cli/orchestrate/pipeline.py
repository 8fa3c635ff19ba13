"""`aligndistil run PIPELINE.yaml`: run stages in order, skipping finished ones.

A pipeline file:

    root: runs/tiny          # every stage writes ROOT/NAME
    seed: 0                  # default seed of every stage
    nproc_per_node: 8        # optional: run each stage on 8 processes (torchrun)
    stages:
      - name: sft            # unique; "{sft}" in later values means ROOT/sft
        stage: sft           # a command name (aligndistil --help lists them)
        with: {model: "{toy}/model", lr: 3e-3}

A stage is skipped when its directory has a complete manifest recording the
same resolved config (paths under the root compared relative to it, so a moved
root is still up to date), its files still match their manifest, and its
model/data inputs still have the recorded fingerprints. A training stage that
left a checkpoint behind (a killed run) resumes from it, unless one of its
inputs changed since (then it starts over); --force reruns everything from
scratch, discarding such checkpoints.

With nproc_per_node > 1 (or --nproc-per-node) each stage that can use several
processes is launched through torch.distributed.run, as `tune run` does, with
its resolved config in a YAML file.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import yaml

from aligndistil_cli.config.files import build_config, read_yaml
from aligndistil_cli.core.console import say_last
from aligndistil_cli.core.console import stderr as console
from aligndistil_cli.core.errors import ConfigError, UserError, shown
from aligndistil_cli.core.hashing import config_dict
from aligndistil_cli.eval.harness import require as require_harness
from aligndistil_cli.orchestrate.plan import check_stage_names, did_you_mean, make_plan, parse_sets, select
from aligndistil_cli.rundir.artifacts import is_complete
from aligndistil_cli.rundir.current import is_up_to_date
from aligndistil_cli.stages import STAGES
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.tracking import require

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
# A stage's name is its directory under the root: no separators, and not "." or "..".
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FIXED = {"train-reverse-dpo": {"reverse": True}}


def substitute(value, outs: dict[str, str], where: str):
    if isinstance(value, str):
        def repl(m):
            if m.group(1) not in outs:
                raise ConfigError(f"{where}: unknown stage {{{m.group(1)}}} (stages must be defined before use)")
            return outs[m.group(1)]
        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute(v, outs, where) for k, v in value.items()}
    return value


def _with_sets(values: dict, sets: dict) -> dict:
    """A stage's `with` values, overridden by --set (one level deeper for NAME=PATH fields)."""
    merged = dict(values)
    for key, value in sets.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_pipeline(path: Path, root: Path | None = None, sets: dict | None = None) -> list[tuple[str, str, object]]:
    """(name, stage, resolved config) for each stage of a pipeline file, validated up front.

    sets: --set overrides, {stage name: {key: value}} (plan.parse_sets).
    """
    spec = read_yaml(path)
    unknown = set(spec) - {"root", "seed", "stages", "nproc_per_node"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key(s) {', '.join(sorted(unknown))}; "
                          "expected root, seed, stages, nproc_per_node")
    if not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    root = Path(root or spec.get("root", "runs/pipeline"))
    sets = sets or {}
    names = [str(e.get("name", e.get("stage"))) for e in spec["stages"] if isinstance(e, dict)]
    check_stage_names(list(sets), names, "--set")
    outs: dict[str, str] = {}
    resolved = []
    for i, entry in enumerate(spec["stages"], start=1):
        where = f"{path}: stage {i}"
        if not isinstance(entry, dict) or set(entry) - {"name", "stage", "with"} or "stage" not in entry:
            raise ConfigError(f"{where}: expected keys name, stage, with")
        stage = entry["stage"]
        if stage not in STAGES:
            raise ConfigError(f"{where}: unknown stage {shown(stage)}{did_you_mean(str(stage), list(STAGES))} "
                              f"(choose one of {', '.join(STAGES)})")
        name = str(entry.get("name", stage))
        if not STAGE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: stage name {shown(name)} must be a plain identifier (letters, digits, '_', '-', "
                              "'.'; no path): it names the stage's directory under the root")
        if name in outs:
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        values = substitute(_with_sets(dict(entry.get("with") or {}), sets.get(name, {})), outs, f"{where} ({name})")
        values.setdefault("seed", spec.get("seed", 0))
        values["out"] = str(root / name)
        values.update(FIXED.get(stage, {}))
        resolved.append((name, stage, build_config(STAGES[stage].config, values, f"{where} ({name})")))
        outs[name] = values["out"]
    return resolved


def for_rerun(config, force: bool):
    """config as `run` executes it: --force starts over (checkpoints discarded); otherwise a
    training stage that left a checkpoint behind resumes from it, unless one of its inputs changed
    since (an upstream stage reran): then it starts over, and its checkpoints are discarded. A
    complete output that is not current (its config changed) is trained again: checkpoints a kill
    between its manifest and their removal left are not resumed from."""
    if force:
        return dataclasses.replace(config, force=True, **({"resume": False} if hasattr(config, "resume") else {}))
    if not hasattr(config, "resume") or is_complete(Path(config.out)):
        return config
    found, changed = checkpoint.stale(config)
    if found is None:
        return config
    if changed:
        console.print(f"{config.out}: input {', '.join(changed)} changed since its checkpoint at step "
                      f"{checkpoint.step_of(found)}; starting over", highlight=False)
    return dataclasses.replace(config, resume=not changed)


def nproc_per_node(path: Path, given: int | None = None) -> int:
    """Processes per stage: the flag, else the file's nproc_per_node key, else 1."""
    value = given if given is not None else read_yaml(path).get("nproc_per_node", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: nproc_per_node must be a positive integer; got {shown(value)}")
    return value


def launch(stage: str, config, nproc: int) -> None:
    """Run one stage on nproc local processes through torch.distributed.run; a failed rank fails the stage.

    The launcher runs in this process, so that a failed stage ends in the ranks' own one-line errors,
    without the traceback torchrun's command line adds; the ranks' stdout (each prints its output
    directory) goes to a log directory, not to this command's stdout.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    values = config_dict(config)
    with tempfile.TemporaryDirectory(prefix="aligndistil-") as tmp:
        cfg = Path(tmp) / f"{stage}.yaml"
        cfg.write_text(yaml.safe_dump(values), encoding="utf-8")
        try:
            run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "--redirects", "1", "--log-dir",
                            str(Path(tmp) / "logs"), "-m", "aligndistil_cli", stage, "--config", str(cfg)]))
        except ChildFailedError as e:
            raise UserError(f"stage {stage} ({config.out}) failed on {nproc} processes (exit "
                            f"{e.get_first_failure()[1].exitcode}); its error is printed above") from None


def run_file(path: Path, force: bool = False, root: Path | None = None, nproc: int | None = None,
             dry_run: bool = False, only: list[str] | None = None, start: str | None = None,
             until: str | None = None, sets: list[str] | None = None) -> None:
    """Run (or skip) every selected stage; a skipped evaluation still prints its table, and the path of every
    selected stage's report (evaluate's report.md) is the last thing printed.

    nproc (default: the file's nproc_per_node, else 1) > 1 runs each stage that can use several processes
    under torch.distributed.run. dry_run prints the plan (each stage: run or skip, and why) and runs nothing.
    """
    from aligndistil_cli.eval.report import print_report

    nproc = nproc_per_node(Path(path), nproc)
    resolved = load_pipeline(Path(path), root, parse_sets(sets or []))
    selected = select([name for name, _, _ in resolved], only, start, until)
    for name, _, config in resolved:  # a missing tracker or harness package stops the pipeline before its first stage
        if name in selected:
            require(getattr(config, "report_to", None))
            require_harness(getattr(config, "lm_eval", None))
    if dry_run:
        for step in make_plan(resolved, selected, force, is_up_to_date):
            word = "[bold]run[/bold] " if step.run else "[dim]skip[/dim]"
            console.print(f"{word} {step.name} ({step.stage}): {step.reason}", highlight=False)
        return
    reports = []
    for name, stage, config in resolved:
        if name not in selected:
            console.print(f"[dim]skip[/dim] {name} ({stage}): not selected")
            continue
        if STAGES[stage].report:
            reports.append(Path(config.out) / STAGES[stage].report)
        if not force and is_up_to_date(config):
            console.print(f"[dim]skip[/dim] {name} ({stage}): {config.out} is complete and up to date")
            if stage == "evaluate":
                print_report(Path(config.out))
            continue
        config = for_rerun(config, force)
        console.print(f"[bold]run[/bold] {name} ({stage}) -> {config.out}")
        if nproc > 1 and STAGES[stage].distributed:
            launch(stage, config, nproc)
            if stage == "evaluate":
                print_report(Path(config.out))
        else:
            STAGES[stage].run(config)
    for report in reports:
        say_last(f"report: {report}")
