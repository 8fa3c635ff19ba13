"""Issue 12's input cases end to end: a stage run through the CLI on a file with undecodable lines,
a byte-order mark, a lone surrogate and special-token text; the manifest counts what was dropped."""

from __future__ import annotations

import json
import time

import pytest

from aligndistil_cli.cli import main
from aligndistil_cli.config.stages import InitToyConfig
from aligndistil_cli.stages import init_toy

LINES = [
    b'\xef\xbb\xbf{"prompt": "i liked it", "response": "good"}',  # BOM on line 1
    b'{"prompt": "x", "chosen": }',                                  # invalid JSON
    b"\xff\xfe",                                                     # invalid UTF-8
    b"",
    b'{"prompt": "i hated it", "response": "bad \\ud800"}',          # lone surrogate escape
    b'{"prompt": "i liked it <eos> also", "response": "good"}',     # special-token text
    b'{"prompt": "i hated it", "response": "bad"}',
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return init_toy.run(InitToyConfig(out=str(tmp_path_factory.mktemp("toy") / "toy"), num_sft=8))


def run(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def test_bad_lines_stop_the_stage_or_are_dropped_and_counted_in_the_manifest(toy, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_bytes(b"\n".join(LINES) + b"\n")
    common = ["sft", "--model", toy / "model", "--data", data, "--max-steps", "1", "--batch-size", "2"]
    code, err = run(capsys, *common, "--out", tmp_path / "stopped")
    assert (code, err) == (1, f"error: {data}, row 2: invalid JSON (Expecting value)\n")
    assert not (tmp_path / "stopped" / "manifest.json").exists()

    code, err = run(capsys, *common, "--out", tmp_path / "s", "--skip-bad-rows")
    assert code == 0
    assert f"{data}, row 6, field 'prompt': message 1 contains the special token '<eos>'" in err
    metrics = json.loads((tmp_path / "s" / "manifest.json").read_text())["metrics"]
    assert metrics["data"] == {"source": str(data), "format": "sft", "read": 6, "kept": 3, "chat_template_used": False,
                               "chat_template_mode": "auto", "templated_rows": 0, "special_token_rows": 1,
                               "dropped": {"invalid_json": 1, "invalid_unicode": 1, "invalid_utf8": 1}}
    assert metrics["examples"] == 3

    code, err = run(capsys, *common, "--out", tmp_path / "refused", "--skip-bad-rows", "--refuse-special-tokens")
    assert code == 0
    metrics = json.loads((tmp_path / "refused" / "manifest.json").read_text())["metrics"]
    assert metrics["data"]["dropped"] == {"invalid_json": 1, "invalid_unicode": 1, "invalid_utf8": 1, "special_token": 1}
    assert metrics["data"]["kept"] == metrics["examples"] == 2


def test_a_10_mb_row_is_refused_or_skipped_before_it_is_tokenised(toy, tmp_path, capsys):
    """Issue 22, 11: tokenised whole, a 10 MB row cost minutes and over a gigabyte; it is decided on its length."""
    data = tmp_path / "sft.jsonl"
    huge = " ".join(["the service was good ."] * 460_000)
    assert len(huge) >= 10 * 2**20
    data.write_text(json.dumps({"prompt": "i liked it", "response": "good"}) + "\n"
                    + json.dumps({"prompt": "i hated it", "response": huge}) + "\n")
    common = ["sft", "--model", toy / "model", "--data", data, "--max-steps", "1", "--batch-size", "2"]
    started = time.perf_counter()
    code, err = run(capsys, *common, "--out", tmp_path / "stopped")
    assert code == 1 and err.endswith(f"\nerror: {data}, row 2, field 'response': too long: {len(huge):,} characters, "
                                      "far beyond what --max-length 128 tokens can hold (8,192 characters at most)\n")
    code, err = run(capsys, *common, "--out", tmp_path / "s", "--skip-bad-rows")
    assert code == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["metrics"]["data"]["dropped"] == {"too_long": 1}
    assert time.perf_counter() - started < 60
