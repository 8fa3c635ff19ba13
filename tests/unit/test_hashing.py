"""Remembered file hashes: right digests, one write per flush, and a changed file hashed anew."""

import hashlib
import json
import os

import pytest

from aligndistil_cli.core import hashing


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNDISTIL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_memory", None)
    monkeypatch.setattr(hashing, "_pending", {})
    yield tmp_path / "cache" / "file-hashes.json"
    hashing._pending.clear()


def test_many_hashes_are_written_once_at_flush(tmp_path, cache, monkeypatch):
    files = []
    for i in range(20):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * (1000 + i))
        files.append(f)
    writes = []
    real_replace = os.replace
    monkeypatch.setattr(hashing.os, "replace", lambda a, b: (writes.append(b), real_replace(a, b)))
    digests = [hashing.sha256_cached(f) for f in files]
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert writes == [] and not cache.exists()
    hashing.flush()
    hashing.flush()  # nothing new: no second write
    assert len(writes) == 1
    on_disk = json.loads(cache.read_text())
    assert {on_disk[os.path.realpath(f)][1] for f in files} == set(digests)


def test_a_new_process_reads_the_hashes_and_notices_a_change(tmp_path, cache, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    hashing.sha256_cached(f)
    hashing.flush()
    monkeypatch.setattr(hashing, "_memory", None)  # as a new process would start
    read = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: (read.append(p), real(p))[1])
    assert hashing.sha256_cached(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert read == []  # remembered, not read again
    stat = f.stat()
    f.write_bytes(b"b" * 4096)  # same size, mtime put back: the ctime still moves
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashing.sha256_cached(f) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert read == [f]


def test_flush_merges_what_another_process_wrote(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"/elsewhere/x": [[1, 2, 3, 4, 5], "feed"]}))
    f = tmp_path / "m.bin"
    f.write_bytes(b"m")
    hashing.sha256_cached(f)
    hashing.flush()
    on_disk = json.loads(cache.read_text())
    assert on_disk["/elsewhere/x"][1] == "feed" and os.path.realpath(f) in on_disk
