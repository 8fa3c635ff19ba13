"""Shared fixtures for the unit and CLI tests."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Remembered file hashes (core/hashing.py) go to a directory of this test session, not the user's cache;
# subprocesses started by the tests inherit it.
if "ALIGNDISTIL_CACHE_DIR" not in os.environ:
    os.environ["ALIGNDISTIL_CACHE_DIR"] = tempfile.mkdtemp(prefix="aligndistil-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ALIGNDISTIL_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def toy_tokenizer():
    from aligndistil_cli.data.toy import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(lines, name) -> path; each line is a dict (dumped as JSON) or a raw str/bytes line."""

    def write(lines, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        chunks = []
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode("utf-8")
            chunks.append(line + b"\n")
        path.write_bytes(b"".join(chunks))
        return path

    return write
