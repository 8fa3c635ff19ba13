"""One smoke-profile pipeline run shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligndistil_cli.orchestrate.pipeline import run_file

SMOKE = Path(__file__).resolve().parents[2] / "pipelines" / "smoke.yaml"


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smoke")
    run_file(SMOKE, root=root)
    return root
