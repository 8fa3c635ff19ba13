"""`aligndistil run PIPELINE.yaml`: run stages in order, skipping finished ones.

A pipeline file:

    root: runs/tiny          # every stage writes ROOT/NAME
    seed: 0                  # default seed of every stage
    stages:
      - name: sft            # unique; "{sft}" in later values means ROOT/sft
        stage: sft           # a command name (aligndistil --help lists them)
        with: {model: "{toy}/model", lr: 3e-3}

A stage is skipped when its directory has a complete manifest recording the
same resolved config (paths under the root compared relative to it, so a moved
root is still up to date), its files still match their manifest, and its
model/data inputs still have the recorded fingerprints. A training stage that
left a checkpoint behind (a killed run) resumes from it; --force reruns
everything from scratch, discarding such checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rich.console import Console

from . import checkpoint
from .artifacts import MANIFEST, config_dict, portable_config, read_manifest, stale_inputs, verify_outputs
from .config import ConfigError, build_config, read_yaml
from .errors import UserError
from .stages import STAGES

console = Console(stderr=True)
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
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


def load_pipeline(path: Path, root: Path | None = None) -> list[tuple[str, str, object]]:
    """(name, stage, resolved config) for each stage of a pipeline file, validated up front."""
    spec = read_yaml(path)
    unknown = set(spec) - {"root", "seed", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key(s) {', '.join(sorted(unknown))}; expected root, seed, stages")
    if not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    root = Path(root or spec.get("root", "runs/pipeline"))
    outs: dict[str, str] = {}
    resolved = []
    for i, entry in enumerate(spec["stages"], start=1):
        where = f"{path}: stage {i}"
        if not isinstance(entry, dict) or set(entry) - {"name", "stage", "with"} or "stage" not in entry:
            raise ConfigError(f"{where}: expected keys name, stage, with")
        stage = entry["stage"]
        if stage not in STAGES:
            raise ConfigError(f"{where}: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        name = str(entry.get("name", stage))
        if name in outs:
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        values = substitute(dict(entry.get("with") or {}), outs, f"{where} ({name})")
        values.setdefault("seed", spec.get("seed", 0))
        values["out"] = str(root / name)
        values.update(FIXED.get(stage, {}))
        resolved.append((name, stage, build_config(STAGES[stage].config, values, f"{where} ({name})")))
        outs[name] = values["out"]
    return resolved


# Config fields that say how to run a stage, not what it computes.
RUN_FREE = ("resume", "force")


def _old_root(recorded_out: str, out: Path, root: Path) -> Path | None:
    """Where root was when the manifest was written: recorded_out minus out's path below root."""
    try:
        depth = len(out.relative_to(root).parts)
    except ValueError:
        return None
    recorded = Path(recorded_out)
    if recorded.parts[len(recorded.parts) - depth:] != out.parts[len(out.parts) - depth:]:
        return None
    return recorded.parents[depth - 1] if depth else recorded


def is_up_to_date(config, root: Path | None = None) -> bool:
    """Complete, same config (relative to root: default OUT's parent), intact files, unchanged inputs."""
    out = Path(config.out)
    root = Path(root) if root is not None else out.parent
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
        verify_outputs(out, manifest)
    except UserError:
        return False
    old_root = _old_root(str(manifest["config"].get("out", "")), out, root) or root
    recorded = portable_config({k: v for k, v in manifest["config"].items() if k not in RUN_FREE}, old_root)
    current = portable_config({k: v for k, v in config_dict(config).items() if k not in RUN_FREE}, root)
    return recorded == current and not stale_inputs(manifest, out)


def for_rerun(config, force: bool):
    """config as `run` executes it: --force starts over (checkpoints discarded); otherwise a
    training stage that left a checkpoint behind resumes from it."""
    if force:
        return dataclasses.replace(config, force=True, **({"resume": False} if hasattr(config, "resume") else {}))
    if hasattr(config, "resume") and checkpoint.latest(config.out) is not None:
        return dataclasses.replace(config, resume=True)
    return config


def run_file(path: Path, force: bool = False, root: Path | None = None) -> None:
    """Run (or skip) every stage; a skipped evaluation still prints its table."""
    from .stages.evaluate import print_report

    for name, stage, config in load_pipeline(Path(path), root):
        if not force and is_up_to_date(config):
            console.print(f"[dim]skip[/dim] {name} ({stage}): {config.out} is complete and up to date")
            if stage == "evaluate":
                print_report(Path(config.out))
            continue
        config = for_rerun(config, force)
        console.print(f"[bold]run[/bold] {name} ({stage}) -> {config.out}")
        STAGES[stage].run(config)
