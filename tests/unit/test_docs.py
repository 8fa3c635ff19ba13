"""The README stays a front door: short, and every file it links to exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_readme_is_at_most_400_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 400


def test_readme_links_and_named_files_exist():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    named = re.findall(r"`((?:pipelines|docs|bench)/[\w./-]+\.(?:yaml|md|json|py))`", text)
    missing = [p for p in links + named if not p.startswith("http") and not (ROOT / p).exists()]
    assert links and named
    assert missing == []
