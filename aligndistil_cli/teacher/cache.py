"""The teacher cache: safetensors shards plus a JSON index.

Layout of a cache directory:
    index.json                  format, widths, teacher settings, settings key, the shard list
    heads.safetensors           format "hidden" only: each teacher's output head, once
    shard-00000.safetensors     one contiguous range of data rows
    manifest.json               written last (artifacts.py)

Each shard holds, for its rows' response positions in row-major order, the
format's per-position tensors (teacher.py: teacher_logprobs, or hidden_<model>,
or topk_logprobs/topk_ids/log_tail), coef/alpha/tvd [n] float32, and
row_offsets [rows + 1] int64: the positions of row i are offsets[i]:offsets[i+1].
Shard boundaries are planned from the tokenised data before any model runs,
so a rerun with the same settings recognises finished shards by name and by
the settings key in their metadata, and skips them, but only when a shard's
bytes still have the sha256 recorded when it was written (in the last manifest,
or in checkpoints/shards.json while precompute runs): a corrupted shard is
recomputed, never re-blessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import sha256_cached, sha256_file
from aligndistil_cli.rundir.artifacts import MANIFEST, atomic_write_json, read_manifest, verify_outputs
from aligndistil_cli.teacher.compose import FORMATS, TeacherSpec

INDEX = "index.json"
RECORD_DIR = Path("checkpoints")
SHARD_META = "aligndistil_shard"
HEADS = "heads.safetensors"
FORMAT_VERSION = 1
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ShardPlan:
    index: int
    row_start: int
    row_end: int
    positions: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.safetensors"


def plan_shards(positions_per_row: list[int], bytes_per_position: int, max_bytes: int) -> list[ShardPlan]:
    """Split rows into contiguous shards of at most max_bytes (at least one row each)."""
    plans: list[ShardPlan] = []
    start, count = 0, 0
    for row, n in enumerate(positions_per_row):
        if count and (count + n) * bytes_per_position > max_bytes:
            plans.append(ShardPlan(len(plans), start, row, count))
            start, count = row, 0
        count += n
    if start < len(positions_per_row):
        plans.append(ShardPlan(len(plans), start, len(positions_per_row), count))
    return plans


class ShardRecord:
    """Shard name -> sha256 recorded when the shard was written, kept in checkpoints/shards-RANK.json
    while precompute runs (finalize then drops it: the manifest holds the same hashes). One file per
    rank, because under torchrun each rank writes its own shards."""

    def __init__(self, out: Path, hashes: dict[str, str]):
        from aligndistil_cli.parallel import distributed

        self.path, self.hashes = Path(out) / RECORD_DIR / f"shards-{distributed.rank()}.json", dict(hashes)
        self.save()

    @staticmethod
    def read(out: Path) -> dict[str, str]:
        """The hashes recorded in out: from its last manifest, then from an interrupted run's record."""
        recorded: dict[str, str] = {}
        sources = [(out / MANIFEST, lambda m: {k: v["sha256"] for k, v in m.get("outputs", {}).items()})]
        sources += [(path, lambda m: m) for path in sorted((out / RECORD_DIR).glob("shards-*.json"))]
        for path, pick in sources:
            try:
                recorded.update({k: v for k, v in pick(json.loads(path.read_text())).items() if k.startswith("shard-")})
            except (OSError, ValueError, AttributeError, KeyError, TypeError):
                continue
        return recorded

    def save(self) -> None:
        atomic_write_json(self.path, self.hashes)


def shard_is_done(path: Path, plan: ShardPlan, settings_key: str, sha256: str | None) -> bool:
    """Finished for these settings and rows, and byte for byte what was written (sha256 as recorded)."""
    if not path.is_file() or sha256 is None:
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(SHARD_META, "{}"))
    except Exception:  # a torn or foreign file is simply recomputed
        return False
    return meta == _shard_meta(plan, settings_key) and sha256_cached(path) == sha256


def _shard_meta(plan: ShardPlan, settings_key: str) -> dict:
    return {"settings_key": settings_key, "row_start": plan.row_start, "row_end": plan.row_end}


def write_shard(path: Path, plan: ShardPlan, settings_key: str, tensors: dict[str, torch.Tensor],
                record: ShardRecord) -> None:
    """Write one shard atomically: a crash leaves either the old state or the whole shard, recorded.

    Its sha256 is recorded before it takes its name, so a shard on disk always has a hash to be checked against.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    # One metadata entry, and the header's keys sorted (canonical_header): safetensors writes them in
    # no fixed order, and a recomputed shard must be byte for byte the one it replaces, on any rank.
    meta = {SHARD_META: json.dumps(_shard_meta(plan, settings_key), sort_keys=True)}
    tmp.write_bytes(canonical_header(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)))
    record.hashes[path.name] = sha256_file(tmp)
    record.save()
    tmp.replace(path)


def canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted.

    The writer emits metadata in hash order, which changes from process to
    process; sorted, the same tensors give the same bytes on every run and rank.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:  # never expected: the same keys and values, reordered
        return data
    return data[:8] + header.ljust(size) + data[8 + size :]


def write_index(out: Path, index: dict) -> None:
    atomic_write_json(out / INDEX, {**index, "format_version": FORMAT_VERSION})


class TeacherCache:
    """Read side: memory-mapped shards, fetched per batch of rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "precompute", role="teacher cache")
        # Every file but the shards is small or read at once: check them now (shards: when first opened).
        verify_outputs(self.path, self.manifest, "teacher cache",
                       [INDEX] + [n for n in self.manifest["outputs"] if not n.startswith("shard-")])
        self.index = json.loads((self.path / INDEX).read_text())
        if self.index.get("format") not in FORMATS:
            raise UserError(f"teacher cache {path} has format {self.index.get('format')!r}; "
                            f"this version reads {', '.join(FORMATS)}")
        self.format = self.index["format"]
        # Caches written before a spec field existed lack it: it takes its default (the paper's teacher).
        self.spec = TeacherSpec(**{k: v for k, v in self.index["settings"].items() if k in TeacherSpec.__dataclass_fields__})
        self.shards = self.index["shards"]
        self._handles: dict[str, object] = {}
        self._offsets: dict[str, torch.Tensor] = {}

    @property
    def num_rows(self) -> int:
        return self.index["rows"]

    def _shard_for(self, row: int) -> dict:
        for shard in self.shards:
            if shard["row_start"] <= row < shard["row_end"]:
                return shard
        raise UserError(f"teacher cache {self.path} has no row {row}")

    def _open(self, shard: dict):
        name = shard["file"]
        if name not in self._handles:
            # A shard is hashed once, when first opened, so a flipped byte is never read as data.
            expected = self.manifest["outputs"].get(name, {}).get("sha256")
            if expected != sha256_cached(self.path / name):
                raise UserError(f"teacher cache shard {self.path / name} is corrupted (sha256 differs from the "
                                "manifest); rerun precompute, which recomputes only the broken shards")
            try:
                handle = safe_open(str(self.path / name), framework="pt")
                self._offsets[name] = handle.get_tensor("row_offsets")
            except Exception as e:
                raise UserError(f"teacher cache shard {self.path / name} is unreadable ({e})") from None
            self._handles[name] = handle
        return self._handles[name], self._offsets[name]

    def heads(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """name -> (weight, bias) of each teacher's output head (format "hidden")."""
        if self.format != "hidden":
            return {}
        with safe_open(str(self.path / HEADS), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            return {name: (f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None)
                    for name in sorted({k.split(".")[0] for k in keys})}

    def fetch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Concatenated per-position tensors of `rows`, in the given order (read through mmap slices)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            shard = self._shard_for(row)
            handle, offsets = self._open(shard)
            local = row - shard["row_start"]
            a, b = int(offsets[local]), int(offsets[local + 1])
            for key in handle.keys():
                if key != "row_offsets":
                    parts.setdefault(key, []).append(handle.get_slice(key)[a:b])
        return {k: torch.cat(v) for k, v in parts.items()}
