"""What `aligndistil run` will do: --set overrides, --only/--from/--until, and --dry-run's reasons.

A stage runs when its output is missing or unfinished, when its resolved
config differs from the one its manifest records, when one of its inputs
changed (or an upstream stage will run first), or with --force.
rundir.current stays the one test of "complete"; this module only explains it.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligndistil_cli.core.errors import ConfigError, UsageError
from aligndistil_cli.core.hashing import config_dict
from aligndistil_cli.core.yamlio import parse_yaml
from aligndistil_cli.rundir.artifacts import MANIFEST
from aligndistil_cli.rundir.current import difference
from aligndistil_cli.train import checkpoint

_PLACEHOLDER = re.compile(r"\{[A-Za-z0-9_-]+\}")


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_sets(values: list[str]) -> dict[str, dict[str, Any]]:
    """['sft.lr=1e-3', 'eval.models.x={sft}'] -> {'sft': {'lr': 0.001}, 'eval': {'models': {'x': '{sft}'}}}.

    VALUE is read as YAML (numbers, booleans, lists), except a "{stage}" placeholder, kept as text.
    """
    sets: dict[str, dict[str, Any]] = {}
    for item in values:
        target, sep, raw = item.partition("=")
        stage, dot, key = target.partition(".")
        if not sep or not dot or not stage or not key:
            raise UsageError(f"--set expects STAGE.KEY=VALUE, got {item!r}")
        value = raw if _PLACEHOLDER.search(raw) else parse_yaml(raw, f"--set {target}") if raw else ""
        node = sets.setdefault(stage, {})
        *parents, last = key.split(".")
        for part in parents:  # STAGE.FIELD.NAME=VALUE sets one entry of a NAME=PATH field (evaluate's models)
            node = node.setdefault(part, {})
        node[last] = value
    return sets


def check_stage_names(given: list[str], names: list[str], flag: str) -> None:
    for name in given:
        if name not in names:
            raise ConfigError(f"{flag}: unknown stage {name!r}{did_you_mean(name, names)} "
                              f"(stages: {', '.join(names)})")


def select(names: list[str], only: list[str] | None, start: str | None, until: str | None) -> set[str]:
    """The stages to consider: --only NAME (repeatable), or the range --from NAME .. --until NAME."""
    check_stage_names(list(only or []), names, "--only")
    check_stage_names([start] if start else [], names, "--from")
    check_stage_names([until] if until else [], names, "--until")
    if only and (start or until):
        raise UsageError("--only cannot be combined with --from/--until")
    if only:
        return set(only)
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise UsageError(f"--from {start} comes after --until {until} in the pipeline")
    return set(names[first : last + 1])


def why_not_up_to_date(config, upstream: list[str]) -> str:
    """The reason a stage whose output is not up to date must run (upstream: the stages it reads that run first)."""
    out = Path(config.out)
    if not out.exists():
        return "no output yet"
    if not (out / MANIFEST).is_file():
        return "unfinished (no manifest)" + _checkpoint_note(config, upstream)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    if not manifest.get("complete"):
        return "incomplete manifest"
    return difference(config) or "complete"


def _checkpoint_note(config, upstream: list[str]) -> str:
    """What a rerun of an unfinished training stage does with the checkpoint it left (for_rerun)."""
    if not hasattr(config, "resume"):
        return ""
    found, changed = checkpoint.stale(config)
    if found is None:
        return ""
    at = f"its checkpoint at step {checkpoint.step_of(found)}"
    if changed:
        return f"; input {', '.join(changed)} changed since {at}: starts over"
    if upstream:
        return f"; resumes from {at}, or starts over if {', '.join(upstream)} changes its inputs"
    return f"; resumes from {at}"


def _depends_on(config, out: str) -> bool:
    values = [v for v in config_dict(config).values()]
    values += [x for v in values if isinstance(v, dict) for x in v.values()]
    return any(isinstance(v, str) and (v == out or v.startswith(out.rstrip("/") + "/")) for v in values)


@dataclass
class Step:
    name: str
    stage: str
    config: Any
    run: bool
    reason: str


def make_plan(resolved: list, selected: set[str], force: bool, is_up_to_date) -> list[Step]:
    """Run or skip, and why, for each stage; a stage downstream of one that runs runs too.

    Its own reason comes first; "X runs first" only explains a stage that is otherwise complete.
    """
    steps: list[Step] = []
    for name, stage, config in resolved:
        if name not in selected:
            steps.append(Step(name, stage, config, False, "not selected"))
            continue
        upstream = [s.name for s in steps if s.run and _depends_on(config, str(s.config.out)) and s.name != name]
        if force:
            steps.append(Step(name, stage, config, True, "--force"))
        elif not is_up_to_date(config):
            steps.append(Step(name, stage, config, True, why_not_up_to_date(config, upstream)))
        elif upstream:
            steps.append(Step(name, stage, config, True, f"input changed: {', '.join(upstream)} runs first"))
        else:
            steps.append(Step(name, stage, config, False, "complete"))
    return steps
