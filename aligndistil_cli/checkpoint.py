"""Training checkpoints: safetensors for tensors, JSON for everything else.

OUT/checkpoints/step-00000050/
    model.safetensors       the trainable weights (shared tensors handled)
    optimizer.safetensors   every optimizer state tensor, as state.<param index>.<key>
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, optimizer param groups, scheduler, python RNG, config hash
A checkpoint is written to a hidden temporary directory and renamed into
place, so a kill at any moment leaves either no checkpoint or a whole one;
state.json is written last inside it as a second guard.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .artifacts import atomic_write_json
from .errors import UserError

DIRNAME = "checkpoints"
STATE = "state.json"


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {f"state.{idx}.{key}": value.detach().cpu().contiguous()
               for idx, state in sd["state"].items() for key, value in state.items() if torch.is_tensor(value)}
    scalars = {f"{idx}.{key}": value for idx, state in sd["state"].items() for key, value in state.items()
               if not torch.is_tensor(value)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(out: Path, step: int, model, optimizer, scheduler, config_hash: str, keep: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep`."""
    root = Path(out) / DIRNAME
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(tmp / STATE, {"step": step, "optimizer": opt_meta, "scheduler": sched,
                                    "python_random": _jsonable(random.getstate()), "config_hash": config_hash})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(state):
    return [list(x) if isinstance(x, tuple) else x for x in state]


def complete(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(out) / DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file())


def latest(out: Path) -> Path | None:
    found = complete(out)
    return found[-1] if found else None


def load(path: Path, model, optimizer, scheduler, config_hash: str) -> int:
    """Restore everything saved at `path`; return its step."""
    state = json.loads((path / STATE).read_text())
    if state["config_hash"] != config_hash:
        raise UserError(f"checkpoint {path} was written with a different config; rerun with that config to resume "
                        "from it, or with --force to discard it and start over")
    load_model(model, str(path / "model.safetensors"))
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state["step"]


def scratch(resume: bool) -> tuple[str, ...]:
    """What a training stage keeps of its earlier run in OUT: its checkpoints and metrics when resuming."""
    return (DIRNAME, "metrics.jsonl") if resume else ()


def remove_all(out: Path) -> None:
    shutil.rmtree(Path(out) / DIRNAME, ignore_errors=True)
