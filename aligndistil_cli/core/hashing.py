"""sha256 of files, remembered by (path, size, mtime, ctime, inode) so that an unchanged file is hashed once.

Checking inputs against their manifests on every stage would otherwise re-read
every model's weights each time. The remembered hashes live in one JSON file
under the user's cache directory ($ALIGNDISTIL_CACHE_DIR, else
$XDG_CACHE_HOME/aligndistil, else ~/.cache/aligndistil). Any write to a file
changes its ctime, which a user cannot set back, so an in-place overwrite of
the same size is noticed even if the mtime is restored.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_FILE = "file-hashes.json"
_PRUNE_AT = 20_000
_memory: dict[str, list] | None = None
_pending: dict[str, list] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("ALIGNDISTIL_CACHE_DIR"):
        return Path(os.environ["ALIGNDISTIL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligndistil"


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _load() -> dict[str, list]:
    global _memory
    if _memory is None:
        try:
            _memory = json.loads((cache_dir() / _FILE).read_text())
        except (OSError, ValueError):
            _memory = {}
    return _memory


def _remember(key: str, entry: list) -> None:
    """Remember a hash in memory; flush() writes what is new. Writing the file per hash would cost a read and a
    write of the whole memory (thousands of entries on a busy machine) for every file a stage hashes."""
    _load()[key] = entry
    _pending[key] = entry


def flush() -> None:
    """Write the hashes remembered since the last flush, merged with what other processes wrote meanwhile (a lost
    entry only costs a re-hash)."""
    if not _pending:
        return
    path = cache_dir() / _FILE
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, ValueError):
        on_disk = {}
    on_disk.update(_pending)
    _pending.clear()
    if len(on_disk) > _PRUNE_AT:  # forget files that are gone, so the memory does not grow forever
        on_disk = {k: v for k, v in on_disk.items() if os.path.exists(k)}
    _load().update(on_disk)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(on_disk, f)
        os.replace(tmp, path)
    except OSError:  # a read-only home only makes checks slower
        pass


def sha256_cached(path: Path) -> str:
    """sha256 of path, read from disk only when the file changed since it was last hashed. New hashes reach the
    file of remembered hashes at flush() (or at exit)."""
    key = os.path.realpath(path)
    stamp = _stamp(path)
    entry = _load().get(key)
    if entry and entry[0] == stamp:
        return entry[1]
    digest = sha256_file(path)
    if _stamp(path) == stamp:  # not written to while we read it
        _remember(key, [stamp, digest])
    return digest


atexit.register(flush)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_dict(config: Any) -> dict:
    """A dataclass config as plain JSON-able data (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
