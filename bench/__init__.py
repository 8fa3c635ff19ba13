"""Benchmarks for aligndistil (run with `python -m bench.run`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path, result: dict) -> None:
    """Write a bench's result as indented JSON, making its folder first (bench/results/ by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
