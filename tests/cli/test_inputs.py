"""Inputs that must fail at once, in one line, before any data or model loads (issue 12, items 5 and 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aligndistil_cli.cli import main
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.model import loading as modeling


def cli(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the Hub fails the test: these cases must be decided without the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(modeling, "hub_reachable", refuse, raising=False)
    monkeypatch.setattr("huggingface_hub.file_download._get_metadata_or_catch_error", refuse, raising=False)


@pytest.mark.parametrize("name", ["runs/dpoo", "./dpoo", "runs/a/b", "~/no-such-model-dir"])
def test_a_mistyped_local_path_fails_at_once(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for load in (modeling.load_tokenizer, lambda p: modeling.load_model(p, "cpu")):
        with pytest.raises(UserError) as e:
            load(name)
        assert str(e.value) == f"no such directory {name} (and not reachable as a Hub id)"


def test_hub_offline_is_honoured(monkeypatch, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^no such directory org/model \(and not reachable as a Hub id\)$"):
        modeling.load_tokenizer("org/model")


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(modeling, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match=r"^no such directory org/model \(and not reachable as a Hub id\)$"):
        modeling.load_model("org/model", "cpu")


def test_a_hub_id_goes_to_the_hub_when_it_answers(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(modeling, "hub_reachable", lambda: True)
    assert modeling.model_source("org/model") == {}


def test_cli_mistyped_model_is_one_line_before_the_data_loads(capsys, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, err = cli(capsys, "train-dpo", "--model", "runs/dpoo", "--data", "missing.jsonl", "--out", "runs/x")
    assert (code, err) == (1, "error: no such directory runs/dpoo (and not reachable as a Hub id)\n")


def test_out_naming_an_existing_file_fails_first(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("taken").write_text("not a directory")
    code, err = cli(capsys, "sft", "--model", "runs/missing-model", "--data", "missing.jsonl", "--out", "taken")
    assert (code, err) == (1, "error: output taken exists and is not a directory\n")
    code, err = cli(capsys, "sft", "--model", "runs/missing-model", "--data", "missing.jsonl", "--out", "taken/sub")
    assert (code, err) == (1, "error: cannot create output directory taken/sub: taken is a file\n")


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        place = tmp_path / "ro"
        place.mkdir()
        place.chmod(0o500)
        return place
    try:  # root writes through permission bits; /sys refuses even root
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only directory available")


def test_out_in_a_read_only_place_fails_first(capsys, tmp_path, monkeypatch):
    place = _read_only_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "sft", "--model", "runs/missing-model", "--data", "missing.jsonl", "--out", place / "out")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write to output directory {place / 'out'}: {place} is not writable")


def test_an_offline_hub_data_set_that_is_not_cached_is_one_plain_line(tmp_path):
    """Issue 22, 12: datasets' own words end "is not cached in None"; `datasets` reads the variables at import."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c"),
           "OMP_NUM_THREADS": "1"}
    (tmp_path / "model").mkdir()
    done = subprocess.run([sys.executable, "-m", "aligndistil_cli", "make-prefs", "--model", str(tmp_path / "model"),
                           "--data", "someone/some-dataset", "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr == ("error: someone/some-dataset (split train): not in the local datasets cache, and the Hub may "
                           "not be asked (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); load it once online, or give a "
                           "local file\n")
