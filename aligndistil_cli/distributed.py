"""Rank, world size and the few collectives the stages need; the one module that imports torch.distributed.

A stage launched by torchrun (RANK and WORLD_SIZE in the environment) joins
the process group in `session`; everything else here then works across ranks.
Without torchrun there is no process group and every function degenerates to
the one-process answer (rank 0 of 1, reductions are the identity, rank 0
writes), so a plain run behaves exactly as before.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

# A rank that dies leaves the others waiting in a collective; torchrun ends them when it sees the
# death, and this bounds the wait when it cannot (a hung, not dead, peer).
TIMEOUT = timedelta(minutes=int(os.environ.get("ALIGNDISTIL_DIST_TIMEOUT_MIN", "30")))


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """True inside a process group: collectives are real and models are sharded."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def device(name: str) -> torch.device:
    """This rank's device under torchrun: its own GPU (cuda:LOCAL_RANK) on CUDA, else the CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def launch_command() -> str:
    """How this process was started, for manifests: the torchrun command line where torchrun set it."""
    program = os.path.basename(sys.argv[0])
    # `python -m aligndistil_cli` (what torchrun and `aligndistil run` start) is the console script.
    program = "aligndistil" if program == "__main__.py" else program
    args = shlex.join([program, *sys.argv[1:]])
    if not launched():
        return args
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    return f"torchrun --nnodes {nodes} --nproc-per-node {per_node} {args}"


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy on the collective's device; the input is untouched)."""
    if not active():
        return values
    out = values.detach().clone().to(_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_reduce_max(value: float) -> float:
    if not active():
        return value
    out = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank (picklable objects in memory only; never on disk)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share(items: list, index: int | None = None, size: int | None = None) -> list:
    """This rank's contiguous part of items: near-equal parts in rank order, the first ranks one longer."""
    index, size = (rank() if index is None else index), (world_size() if size is None else size)
    base, extra = divmod(len(items), size)
    start = index * base + min(index, extra)
    return items[start : start + base + (index < extra)]


def split_map(fn, items: list) -> list:
    """fn(list) -> list applied to this rank's share of items; every rank gets all results, in item order."""
    if not active():
        return fn(items)
    return [x for part in gather_objects(fn(share(items))) for x in part]


def check_batch(batch_size: int, grad_accum: int, world: int) -> None:
    """Refuse, before any model loads, a global batch the ranks cannot split evenly into micro-batches."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the world size {world}; "
                        f"use a multiple of {world}")
    if batch_size // world // grad_accum == 0:
        raise UserError(f"--batch-size {batch_size} over {world} ranks gives {batch_size // world} sequences per rank, "
                        f"fewer than --grad-accum {grad_accum}: a micro-batch would be empty")


def check_same_config(digest: str) -> None:
    """Refuse ranks whose resolved configs differ (their hashes differ from rank 0's)."""
    digests = gather_objects(digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise UserError(f"rank(s) {', '.join(map(str, odd))} resolved a different config than rank 0; "
                        "every rank must be given the same flags and files")


@contextmanager
def session(config):
    """Join the torchrun process group for one stage, check that all ranks agree, and leave it after.

    Without torchrun this does nothing. Under torchrun: gloo on CPU, nccl on
    CUDA (a group that already exists is used and left open); a batch the
    world cannot split and ranks with different configs are refused before
    any model loads.
    """
    if not launched():
        yield
        return
    from .artifacts import config_dict, sha256_json

    owner = not active()
    if owner:
        cuda = torch.cuda.is_available() and getattr(config, "device", "auto") != "cpu"
        if cuda:  # NCCL's collectives (the config check below) run on this rank's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        check_same_config(sha256_json(config_dict(config)))
        if hasattr(config, "grad_accum"):
            check_batch(config.batch_size, config.grad_accum, world_size())
        if getattr(config, "lora_r", 0):
            raise UserError("--lora-r is not supported under torchrun: train LoRA in one process")
        yield
        barrier()
    finally:
        if owner:
            dist.destroy_process_group()
