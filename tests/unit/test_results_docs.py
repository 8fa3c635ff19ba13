"""The published numbers are what the summary committed beside them renders: a hand edit fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.orchestrate.results import BEGIN, END, block, fill_block, render_headline, render_results

REPO = Path(__file__).resolve().parents[2]


def test_the_docs_tables_are_what_the_committed_summary_renders():
    data = json.loads((REPO / "docs" / "results" / "summary.json").read_text(encoding="utf-8"))
    assert block(REPO / "docs" / "RESULTS.md") == "\n".join(render_results(data)) + "\n", \
        "docs/RESULTS.md's results block differs from docs/results/summary.json: run `make results`, never edit it"
    assert block(REPO / "README.md") == "\n".join(render_headline(data)) + "\n", \
        "README.md's results block differs from docs/results/summary.json: run `make results`, never edit it"


def test_fill_block_replaces_only_the_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{BEGIN}\nold | 0.433\n{END}\noutro\n")
    fill_block(doc, ["| a | 0.300 |"])
    assert doc.read_text() == f"intro\n{BEGIN}\n| a | 0.300 |\n{END}\noutro\n" and block(doc) == "| a | 0.300 |\n"
    doc.write_text("no block here\n")
    with pytest.raises(UserError, match="no block between"):
        fill_block(doc, ["x"])


def test_the_provenance_says_whether_the_machine_was_idle_when_the_sweep_started():
    data = json.loads((REPO / "docs" / "results" / "summary.json").read_text(encoding="utf-8"))
    data["sweep"] = {**data["sweep"], "load_average_at_start": [2.9, 3.8, 4.0], "wall_s": 5231}
    shared = render_results(data)[0]
    assert "87 min of wall time" in shared and "load average 2.9, 3.8, 4.0" in shared
    assert shared.endswith(": the machine was shared.")
    data["sweep"]["load_average_at_start"] = [0.35, 0.42, 0.9]
    assert render_results(data)[0].endswith(": the machine was idle when it started.")
