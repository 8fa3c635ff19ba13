"""Whether a complete output directory is what a config asks for now.

`aligndistil run` skips a stage whose output is current, and a training stage given --resume
on a complete output has nothing left to train (stages.already_complete). Current means: a
complete manifest recording the same resolved config (paths under the root compared relative
to it, so a moved root is still current; a field this version added is no change at its
default), model/data inputs with the recorded fingerprints, and files that still match the
manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import config_dict
from aligndistil_cli.rundir.artifacts import MANIFEST, portable_config, read_manifest, stale_inputs, verify_outputs

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


def difference(config, root: Path | None = None, free: tuple[str, ...] = RUN_FREE) -> str | None:
    """None when config.out is current for config (relative to root: default OUT's parent); else why not, in a
    few words ("config changed: lr", "input changed: data"). Fields in free may differ."""
    out = Path(config.out)
    root = Path(root) if root is not None else out.parent
    if not (out / MANIFEST).is_file():
        return "unfinished (no manifest)"
    try:
        manifest = read_manifest(out, role="output")
    except UserError:  # a listed file missing or of another size (or a manifest that is not one)
        return "output differs from its manifest"
    old_root = _old_root(str(manifest["config"].get("out", "")), out, root) or root
    recorded = portable_config({k: v for k, v in manifest["config"].items() if k not in free}, old_root)
    current = portable_config({k: v for k, v in config_dict(config).items() if k not in free}, root)
    # A field added to the config since the output was made, and left at its default, changes nothing.
    added = {f.name: f.default for f in dataclasses.fields(config) if f.name not in recorded
             and f.default is not dataclasses.MISSING and current.get(f.name) == f.default}
    changed = sorted(k for k in set(recorded) | set(current) if k not in added and recorded.get(k) != current.get(k))
    if changed:
        return f"config changed: {', '.join(changed)}"
    stale = stale_inputs(manifest, out)
    if stale:
        return f"input changed: {', '.join(stale)}"
    try:
        verify_outputs(out, manifest, role="output")
    except UserError:
        return "output differs from its manifest"
    return None


def is_up_to_date(config, root: Path | None = None) -> bool:
    """Complete, same config (relative to root: default OUT's parent), unchanged inputs, intact files."""
    return difference(config, root) is None
