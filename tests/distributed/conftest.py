"""The 2-rank world that tests/distributed's modules share: one torchrun launch of every stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_torchrun import build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory)
