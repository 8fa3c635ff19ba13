"""Finishing an output directory: its model card, then its manifest, written last and atomically."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from aligndistil_cli import __version__
from aligndistil_cli.core.hashing import config_dict, flush, sha256_cached
from aligndistil_cli.rundir import outdir
from aligndistil_cli.rundir.artifacts import (
    CONFIG_FILE,
    MANIFEST,
    MANIFEST_VERSION,
    atomic_write_json,
    default_mode,
    output_files,
    with_relpath,
)
from aligndistil_cli.rundir.card import is_model_dir, write_card


def finalize(out: Path, stage: str, config: Any, inputs: dict[str, Any], metrics: dict[str, Any] | None = None) -> dict:
    """Write stage_config.json, then the manifest: the directory is now complete. Then drop the checkpoints.

    The manifest comes before the checkpoints go, so a kill in between leaves a
    complete directory with some scratch, never a finished one with neither.
    Under torchrun only rank 0 writes (the others return {}), after every rank has written its part.
    """
    from aligndistil_cli.parallel import distributed

    distributed.barrier()
    if not distributed.is_main():
        return {}
    out = Path(out)
    atomic_write_json(out / CONFIG_FILE, config_dict(config))
    if is_model_dir(out):
        write_card(out, stage, config_dict(config), metrics or {})
    files = output_files(out)
    for p in files:
        default_mode(p)
    outputs = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_cached(p)} for p in files}
    flush()  # now, not at exit: a sweep's other jobs read these outputs next
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "complete": True,
        "stage": stage,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_dict(config),
        "inputs": {name: with_relpath(rec, out) for name, rec in inputs.items()},
        "outputs": outputs,
        "metrics": metrics or {},
        "launch": {"world_size": distributed.world_size(), "command": distributed.launch_command()},
    }
    atomic_write_json(out / MANIFEST, manifest)
    # Training checkpoints (and precompute's shard record) are scratch for a rerun; a finished stage needs none.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    outdir.release(out)
    return manifest
