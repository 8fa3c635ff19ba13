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
import socket
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import config_dict, sha256_json

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


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's."""
    if not active():
        return
    for t in tensors:
        box = t.to(_collective_device())
        dist.broadcast(box, src=0)
        t.copy_(box)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":  # "cpu:gloo,cuda:nccl" takes CPU tensors
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


def check_same_inputs(fingerprints: dict[str, str]) -> None:
    """Refuse ranks that read different content under the same paths ({path: fingerprint} on each rank):
    node-local copies of the data or a model that differ. Names the first such rank and file."""
    ranks = gather_objects(fingerprints)
    for r, mine in enumerate(ranks[1:], start=1):
        path = next((p for p, digest in ranks[0].items() if mine.get(p) != digest), None)
        if path is not None:
            raise UserError(f"rank {r} reads different content than rank 0 under {path}; "
                            "every rank (every node) must see the same files")


def check_shared_dir(path, flag: str, probe_dir=None) -> None:
    """Refuse a directory that the ranks do not share (on several nodes, each with its own disk).

    Every rank writes a probe file into path; rank 0 looks for all of them.
    probe_dir stands for path as this rank sees it (a test's node-local copy).
    """
    if not active():
        return
    token = broadcast_object(os.urandom(8).hex())
    probe = Path(probe_dir or path) / f".probe-{token}-rank{rank()}"
    probe.write_text("")
    barrier()
    missing = [r for r in range(world_size()) if not (Path(path) / f".probe-{token}-rank{r}").is_file()] \
        if is_main() else None
    missing = broadcast_object(missing)
    probe.unlink()
    if missing:
        raise UserError(f"{flag} {path} is not shared between the ranks: rank 0 cannot see the files of "
                        f"rank(s) {', '.join(map(str, missing))}; ranks on several nodes need a shared filesystem")


def _alive(pid: int) -> bool:
    """A process on this host that still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, in rank order, while a session runs
_sessions = [0]  # sessions this process joined: each one's refusal has its own key in the store
PRINT_GRACE_S = 2.0


def dead_peer() -> int | None:
    """The first rank on this host whose process has exited, if any (a peer's death is why a collective failed)."""
    host = socket.gethostname()
    return next((r for r, (h, pid) in enumerate(_peers) if h == host and r != rank() and not _alive(pid)), None)


def _said_by_rank0(message: str, wait_s: float = 5.0) -> bool:
    """Rank 0 (which calls this first) posts its refusal; another rank learns whether rank 0 refuses alike.

    A refusal that every rank reaches is then printed once, by rank 0; one that
    only another rank reaches is printed by that rank. Waits wait_s at most for
    rank 0, which may be blocked in a collective that this rank will never join.
    """
    from torch.distributed.distributed_c10d import _get_default_store

    store, key = _get_default_store(), f"aligndistil/refusal/{_sessions[0]}"
    if is_main():
        store.set(key, message)
        return False
    try:
        store.wait([key], timedelta(seconds=wait_s))
    except RuntimeError:  # rank 0 did not refuse in time (torch raises its DistStoreError, a RuntimeError)
        return False
    same = store.get(key).decode() == message
    if same:  # torchrun stops every rank when the first exits: give rank 0 the moment it needs to print
        time.sleep(PRINT_GRACE_S)
    return same


def backend(cuda: bool, cpu_offload: bool) -> str:
    """gloo on CPU, NCCL on CUDA; with CPU offload on CUDA, gloo for CPU tensors beside NCCL: clipping
    reduces the CPU-resident gradients, which NCCL cannot (pytorch#148532)."""
    if not cuda:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"


@contextmanager
def session(config, inputs: Callable[[], dict[str, str]] | None = None):
    """Join the torchrun process group for one stage, check that all ranks agree, and leave it after.

    Without torchrun this does nothing. Under torchrun it joins a group of
    backend()'s (a group that already exists is used and left open); a batch
    the world cannot split, ranks with different configs and ranks that read
    different data or models under the same paths (inputs(): {path: fingerprint},
    train.checkpoint.input_fingerprints) are refused before any model loads.
    A refusal every rank reaches is marked (UserError.said_elsewhere) on
    all but rank 0, which alone prints it; an error caused by a peer's death
    becomes "rank N exited; stopping".
    """
    if not launched():
        yield
        return
    owner = not active()
    if owner:
        cuda = torch.cuda.is_available() and getattr(config, "device", "auto") != "cpu"
        if cuda:  # NCCL's collectives (the config check below) run on this rank's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend(cuda, getattr(config, "fsdp_cpu_offload", False)), timeout=TIMEOUT)
    _peers[:] = gather_objects((socket.gethostname(), os.getpid()))
    _sessions[0] += 1
    try:
        check_same_config(sha256_json(config_dict(config)))
        if inputs is not None:
            check_same_inputs(inputs())
        if hasattr(config, "grad_accum"):
            check_batch(config.batch_size, config.grad_accum, world_size())
        if getattr(config, "lora_r", 0):
            raise UserError("--lora-r is not supported under torchrun: train LoRA in one process")
        yield
        barrier()
    except UserError as e:
        e.said_elsewhere = _said_by_rank0(str(e))
        raise
    except Exception as e:
        peer = dead_peer()
        if peer is None:
            raise
        raise UserError(f"rank {peer} exited; stopping") from e
    finally:
        _peers.clear()
        if owner:
            dist.destroy_process_group()


def micro_batches(batch: list, n: int) -> list[list]:
    """Split a step's batch into at most n non-empty micro-batches of near-equal size."""
    size = -(-len(batch) // n)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def rank_micro_batches(batch: list, n: int, index: int | None = None, size: int | None = None) -> list[tuple[list, bool]]:
    """Rank index's micro-batches (this rank's by default) of a step's global batch over size ranks, as
    (micro-batch, live) pairs.

    Each rank takes its contiguous share of the batch and splits it into at
    most n micro-batches. Under several ranks every rank runs exactly n, since
    the collectives of FSDP's forward and backward must pair up across ranks:
    a rank short of data (an epoch's last, smaller batch, of which it may get
    no row at all) runs the batch's first item at weight 0 instead (live False).
    """
    size = world_size() if size is None else size
    mine = share(batch, index, size)
    micros = [(m, True) for m in micro_batches(mine, n)] if mine else []
    if size > 1:
        micros += [(batch[:1], False)] * (n - len(micros))
    return micros
