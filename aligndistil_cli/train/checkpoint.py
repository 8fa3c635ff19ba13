"""Training checkpoints: safetensors for tensors, JSON for everything else.

OUT/checkpoints/step-00000050/          --checkpoint-format full (the default)
    model.safetensors       the trainable weights (shared tensors handled)
    optimizer.safetensors   every optimizer state tensor, as state.<param index>.<key>
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              format, step, optimizer param groups, scheduler, python RNG, config hash, and the
                            fingerprint of every input (data, models, teacher cache)
OUT/checkpoints/step-00000050/          --checkpoint-format sharded
    shards/rank-<rank>-of-<world size>.safetensors
                            each rank's shards of the weights (model.<name>) and of the optimizer's tensors
                            (optimizer.<name>.<key>); the header's metadata DCP_SHARDING_INFO (JSON) gives
                            each one's offsets in the whole tensor, as torch's HuggingFaceStorageWriter
                            writes it, and torch's HuggingFaceStorageReader reads them back
    rng.safetensors, state.json as above; state.json also holds the world size that wrote the shards
A checkpoint is written to a hidden temporary directory and renamed into
place, so a kill at any moment leaves either no checkpoint or a whole one;
state.json is written last inside it as a second guard.

Under torchrun the full format gathers the sharded model and optimizer to
full state dicts (fsdp.py) and rank 0 writes the same files as one process;
the sharded one has every rank write its own shards, so no host ever holds a
whole copy. Either resumes on any world size, and under either setting of
--checkpoint-format: a load reads the format that state.json names.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.rundir.artifacts import atomic_write_json, default_mode, writing

DIRNAME = "checkpoints"
STATE = "state.json"
SHARDS = "shards"


class _Full(torch.nn.Module):
    """A full state dict posing as a module, so safetensors' save_model stores tied tensors as it does for the model."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.full = state

    def state_dict(self, *args, **kwargs):
        return dict(self.full)


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"state.{idx}.{key}": value.detach().cpu().contiguous()
               for idx, state in sd["state"].items() for key, value in state.items() if torch.is_tensor(value)}
    scalars = {f"{idx}.{key}": value for idx, state in sd["state"].items() for key, value in state.items()
               if not torch.is_tensor(value)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


_saved: dict[str, Path] = {}


def last_saved() -> Path | None:
    """The newest checkpoint this process wrote (for the Ctrl-C message), or None."""
    return _saved.get("last")


def save(out: Path, step: int, model, optimizer, scheduler, config_hash: str, keep: int,
         inputs: dict[str, dict], sharded: bool = False) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (every rank calls; rank 0 writes, and
    with sharded every rank writes its shards too)."""
    root = Path(out) / DIRNAME
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if sharded:
            distributed.barrier()  # the directory exists before any rank writes into it
            opt_meta = _save_shards(tmp / SHARDS, model, optimizer)
        else:
            opt_meta = _save_full(tmp, model, optimizer)
        if distributed.is_main():
            _save_rest(tmp, step, scheduler, config_hash, inputs, opt_meta, sharded)
    except BaseException:
        # A full disk (or a kill) must not leave a half-written checkpoint taking the space.
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not distributed.is_main():
        distributed.barrier()
        return final
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _saved["last"] = final
    for old in complete(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _save_shards(path: Path, model, optimizer) -> dict:
    """This rank's file of a sharded checkpoint (fsdp.local_parts); the optimizer's JSON part.

    Written with save_file, which writes the tensors where they lie, not torch's HuggingFaceStorageWriter,
    which builds each file in memory first: twice the rank's bytes at its peak (measured in
    docs/distributed.md). Every rank learns whether all wrote their file, so all fail alike.
    """
    parts, rest = fsdp.local_parts(model, optimizer)
    tensors = {name: t.detach().cpu().contiguous() for name, (t, _) in parts.items()}
    # torch's HuggingFaceStorageReader reads each part's offsets from this header key.
    offsets = {name: {"saved_offsets": at} for name, (_, at) in parts.items()}
    file = path / f"rank-{distributed.rank():05d}-of-{distributed.world_size():05d}.safetensors"
    path.mkdir(parents=True, exist_ok=True)
    failed = None
    try:
        with writing(file):
            save_file(tensors, str(file), metadata={"DCP_SHARDING_INFO": json.dumps(offsets)})
    except Exception as e:
        failed = e
    if distributed.all_reduce_max(float(failed is not None)):
        raise failed or UserError(f"another rank could not write its part of checkpoint {path.parent}")
    return rest


def _save_full(tmp: Path, model, optimizer) -> dict:
    """model.safetensors and optimizer.safetensors, written by rank 0 (every rank gathers); the optimizer's JSON part."""
    sharded = fsdp.is_sharded(model)
    model_state = fsdp.full_model_state(model) if sharded else None
    optimizer_state = fsdp.full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    if not distributed.is_main():
        return {}
    with writing(tmp / "model.safetensors"):
        save_model(_Full(model_state) if sharded else model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
    with writing(tmp / "optimizer.safetensors"):
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    return opt_meta


def _save_rest(tmp: Path, step: int, scheduler, config_hash: str, inputs: dict[str, dict], opt_meta: dict,
               sharded: bool) -> None:
    """rng.safetensors, then state.json (last: it marks the checkpoint complete); rank 0 only."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with writing(tmp / "rng.safetensors"):
        save_file(rng, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    for written in tmp.rglob("*"):
        if written.is_file():  # every rank's shards too
            default_mode(written)
    layout = {"format": "sharded", "world_size": distributed.world_size()} if sharded else {"format": "full"}
    atomic_write_json(tmp / STATE, {**layout, "step": step, "optimizer": opt_meta, "scheduler": sched,
                                    "python_random": _jsonable(random.getstate()), "config_hash": config_hash,
                                    "inputs": inputs})


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


def _fingerprint(kind: str, path: str) -> str:
    from aligndistil_cli.rundir.artifacts import fingerprint_data, fingerprint_model

    if kind == "cache":
        try:  # the cache's key covers its teacher settings and its inputs' contents, which its shards may not
            return json.loads((Path(path) / "index.json").read_text())["settings_key"]
        except (OSError, ValueError, KeyError, TypeError):
            return fingerprint_data(path)
    try:
        return fingerprint_model(path) if kind == "model" else fingerprint_data(path)
    except UserError as e:  # a model directory that is unfinished or changed since its manifest
        return f"unusable: {e}"


def input_fingerprints(config) -> dict[str, dict]:
    """{field: {"path", "fingerprint"}} of every input of config: what a checkpoint records, and a resume
    must find again (as it must find the same config)."""
    from aligndistil_cli.config.files import config_inputs

    return {i.name: {"path": i.path, "fingerprint": _fingerprint(i.kind, i.path)} for i in config_inputs(config)}


def changed_inputs(path: Path, inputs: dict[str, dict]) -> list[str]:
    """The inputs (as named in inputs) whose fingerprint differs from the one checkpoint path recorded."""
    recorded = json.loads((Path(path) / STATE).read_text()).get("inputs") or {}
    return [name for name, now in inputs.items()
            if recorded.get(name, {}).get("fingerprint") != now["fingerprint"]]


def stale(config) -> tuple[Path | None, list[str]]:
    """The latest checkpoint of a training config's OUT (None if none), and the inputs changed since it was written."""
    found = latest(config.out)
    return found, changed_inputs(found, input_fingerprints(config)) if found else []


def step_of(path: Path) -> int:
    return int(Path(path).name.removeprefix("step-"))


def load(path: Path, model, optimizer, scheduler, config_hash: str, inputs: dict[str, dict]) -> int:
    """Restore everything saved at `path`; return its step. A changed config or input is refused."""
    state = json.loads((path / STATE).read_text())
    if state["config_hash"] != config_hash:
        raise UserError(f"checkpoint {path} was written with a different config; rerun with that config to resume "
                        "from it, or with --force to discard it and start over")
    changed = changed_inputs(path, inputs)
    if changed:
        raise UserError(f"checkpoint {path} was written with another version of input {changed[0]!r} "
                        f"({inputs[changed[0]]['path']}): its content changed since; restore it to resume from the "
                        "checkpoint, or rerun with --force to discard it and start over")
    if state.get("format") == "sharded":
        fsdp.load_sharded(path / SHARDS, model, optimizer, state["optimizer"])
    elif fsdp.is_sharded(model):
        _scatter_full(path, model, optimizer, state["optimizer"])
    else:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state["step"]


def _scatter_full(path: Path, model, optimizer, meta: dict) -> None:
    """A full checkpoint into a sharded model: rank 0 reads the full tensors and FSDP scatters them; the other
    ranks read nothing."""
    weights, optim = {}, {}
    if distributed.is_main():
        weights = load_file(str(path / "model.safetensors"))
        for name, alias in fsdp.tied_names(model).items():
            weights.setdefault(name, weights.get(alias))
            weights.setdefault(alias, weights[name])
        optim = _optimizer_state(load_file(str(path / "optimizer.safetensors")), meta)
    fsdp.load_full_model_state(model, weights)
    fsdp.load_full_optimizer_state(model, optimizer, optim)


def scratch(resume: bool) -> tuple[str, ...]:
    """What a training stage keeps of its earlier run in OUT: its checkpoints and metrics when resuming."""
    return (DIRNAME, "metrics.jsonl", "logs") if resume else ()


