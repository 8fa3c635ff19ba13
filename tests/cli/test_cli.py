"""CLI tests: help, version, exit codes, one-line errors, verify.

Most run in-process through aligndistil_cli.cli.main(argv); a few run the
installed console script in a subprocess to prove the entry point itself works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligndistil_cli import __version__
from aligndistil_cli.cli import main
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.rundir.artifacts import MANIFEST, is_complete, prepare_output, read_manifest
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.stages import STAGES

SCRIPT = Path(sys.executable).parent / "aligndistil"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run main(argv) in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = e.value.code
    return (0 if code is None else code), out, err


def script(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"console script {SCRIPT} is not installed")
    return subprocess.run([str(SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def assert_one_line_error(err: str) -> str:
    """stderr is exactly one line starting with 'error:' and carries no traceback."""
    assert err.startswith("error:"), err
    assert err.rstrip("\n").count("\n") == 0, err
    assert "Traceback" not in err
    assert "internal error" not in err, err
    return err


# --------------------------------------------------------------------------- help and version


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_help(capsys, name):
    code, out, err = cli(capsys, name, "--help")
    assert code == 0
    assert "Example" in out
    example = out.split("Example:")[1].split("\n\n")[0]
    assert " ".join(example.replace("\\\n", " ").split()) == STAGES[name].example  # shell lines joined by "\\"
    assert " ".join(STAGES[name].summary.split()) in " ".join(out.split())  # may be re-wrapped
    assert "--config" in out
    # every config field has its flag (train-reverse-dpo fixes `reverse`)
    config = STAGES[name].config
    for f in dataclasses.fields(config):
        if name == "train-reverse-dpo" and f.name == "reverse":
            continue
        flag = f.metadata.get("flag") or f.name.replace("_", "-")
        assert f"--{flag}" in out, f"--{flag} missing from `{name} --help`"


def test_reverse_flag_only_on_train_dpo(capsys):
    _, dpo_help, _ = cli(capsys, "train-dpo", "--help")
    _, rev_help, _ = cli(capsys, "train-reverse-dpo", "--help")
    # the summary of train-reverse-dpo mentions "--reverse"; only the option has "--no-reverse"
    assert "--no-reverse" in dpo_help
    assert "--no-reverse" not in rev_help


@pytest.mark.parametrize("name", ["run", "verify"])
def test_builtin_command_help(capsys, name):
    code, out, _ = cli(capsys, name, "--help")
    assert code == 0
    assert "Example" in out
    assert f"aligndistil {name} " in out


def test_root_help_lists_every_command(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for name in [*STAGES, "run", "verify"]:
        assert name in out


def test_help_via_console_script():
    proc = script("sft", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout
    assert "--data" in proc.stdout


def test_version_in_process(capsys):
    code, out, err = cli(capsys, "--version")
    assert code == 0, err
    assert out.strip() == __version__ == "0.1.0"


def test_version_via_console_script():
    proc = script("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.1.0"


@pytest.mark.parametrize("words,expected", [
    ("aligndistil tr", ["train-dpo", "train-reverse-dpo"]),
    ("aligndistil run pipelines/tiny.yaml --dr", ["--dry-run"]),
    ("aligndistil sft --report", ["--report-to"]),
])
def test_shell_completion_completes_commands_and_flags(capsys, monkeypatch, words, expected):
    monkeypatch.setenv("_ALIGNDISTIL_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - 1))
    code, out, err = cli(capsys, *words.split()[1:])
    assert code == 0, err
    assert out.split() == expected


def test_show_completion_prints_a_bash_script(capsys):
    code, out, err = cli(capsys, "--show-completion", "bash")
    assert code == 0, err
    assert "_aligndistil_completion()" in out and "complete -o default -F _aligndistil_completion aligndistil" in out


# --------------------------------------------------------------------------- usage errors: exit 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sft", "--bogus"], "--bogus"),
        (["sft", "--batch-size", "abc"], "--batch-size"),
        (["no-such-command"], "no-such-command"),
        (["verify"], "directory"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, words):
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(err)
    assert code == 2
    assert words.lower() in err.lower()


def test_unknown_flag_via_console_script():
    proc = script("sft", "--bogus")
    assert_one_line_error(proc.stderr)
    assert proc.returncode == 2


def test_no_arguments_shows_usage(capsys):
    code, out, err = cli(capsys)
    assert code == 2
    assert "Usage" in out + err
    assert "Traceback" not in err and "internal error" not in err


def test_bad_named_path_flag(capsys, tmp_path):
    code, _, err = cli(capsys, "evaluate", "--ref", "r", "--prompts", "p.jsonl", "--out", tmp_path / "o",
                       "--model", "no-equals-sign")
    assert_one_line_error(err)
    assert code == 2
    assert "--model" in err and "NAME=PATH" in err


# --------------------------------------------------------------------------- config errors: exit 2


def _sft_args(tmp_path) -> list:
    return ["--model", ".", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o"]


def test_config_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lrr: 0.1\n")
    code, _, err = cli(capsys, "sft", "--config", cfg, *_sft_args(tmp_path))
    assert_one_line_error(err)
    assert code == 2
    assert "did you mean 'lr'" in err
    assert str(cfg) in err


def test_config_invalid_yaml(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.1\nbatch_size: 4\n\tseed: 3\n")
    code, _, err = cli(capsys, "sft", "--config", cfg, *_sft_args(tmp_path))
    assert_one_line_error(err)
    assert code == 2
    assert "line 3" in err


def test_config_bad_value_flag(capsys, tmp_path):
    code, _, err = cli(capsys, "train-dpo", *_sft_args(tmp_path), "--beta", "-1")
    assert_one_line_error(err)
    assert code == 2
    assert "'beta'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, rule", [("--lr", "inf", "a finite number"), ("--lr", "1e30", "<= 1"),
                                              ("--min-lr-ratio", "2", "<= 1"), ("--adam-beta2", "1", "< 1"),
                                              ("--weight-decay", "-inf", "a finite number")])
def test_float_options_must_be_finite_and_in_their_range(capsys, tmp_path, flag, value, rule):
    code, _, err = cli(capsys, "sft", *_sft_args(tmp_path), flag, value)
    assert_one_line_error(err)
    assert code == 2
    assert f"config field {flag[2:].replace('-', '_')!r} must be {rule}" in err
    assert not (tmp_path / "o").exists()


def test_config_bad_value_yaml(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 0\n")
    code, _, err = cli(capsys, "sft", "--config", cfg, *_sft_args(tmp_path))
    assert_one_line_error(err)
    assert code == 2
    assert "'batch_size'" in err


def test_chat_template_is_a_mode_or_a_file_and_yaml_booleans_keep_their_meaning(capsys, tmp_path):
    from aligndistil_cli.config.files import load_config
    from aligndistil_cli.config.stages import SftConfig
    from aligndistil_cli.data.chat import mode_of

    code, _, err = cli(capsys, "sft", *_sft_args(tmp_path), "--chat-template", "alway")
    assert_one_line_error(err)
    assert code == 2
    assert "config field 'chat_template' must be auto, always, never or an existing Jinja template file" in err
    assert not (tmp_path / "o").exists()
    cfg = tmp_path / "c.yaml"
    for value, mode in (("true", "auto"), ("false", "never"), ("always", "always")):
        cfg.write_text(f"chat_template: {value}\n")
        assert mode_of(load_config(SftConfig, cfg, {"model": "m", "data": "d", "out": "o"}).chat_template) == mode
    code, out, _ = cli(capsys, "sft", "--help")
    assert "--chat-template" in out and "--no-chat-template" not in out


def test_missing_required_flag(capsys, tmp_path):
    code, _, err = cli(capsys, "sft", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o")
    assert_one_line_error(err)
    assert code == 2
    assert "'model'" in err and "--model" in err


# --------------------------------------------------------------------------- data errors: exit 1


def test_missing_data_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m").mkdir()  # a model directory apart from --out, which may not be inside an input
    code, _, err = cli(capsys, "sft", "--model", "m", "--data", "nope.jsonl", "--out", "o")
    assert_one_line_error(err)
    assert code == 1
    assert "nope.jsonl" in err
    assert not (tmp_path / "o").exists()  # nothing is written before inputs are checked


def test_missing_data_file_debug_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m").mkdir()
    with pytest.raises(UserError, match="nope.jsonl"):
        main(["--debug", "sft", "--model", "m", "--data", "nope.jsonl", "--out", "o"])


def test_missing_data_file_via_console_script(tmp_path):
    (tmp_path / "m").mkdir()
    proc = script("sft", "--model", "m", "--data", "nope.jsonl", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr)
    assert "nope.jsonl" in proc.stderr
    assert proc.stdout == ""


def test_debug_shows_traceback_via_console_script(tmp_path):
    (tmp_path / "m").mkdir()
    proc = script("--debug", "sft", "--model", "m", "--data", "nope.jsonl", "--out", "o", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "nope.jsonl" in proc.stderr


def test_malformed_jsonl_row(capsys, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    code, _, err = cli(capsys, "sft", "--model", ".", "--data", data, "--out", tmp_path / "o")
    assert_one_line_error(err)
    assert code == 1
    assert str(data) in err
    assert "row 3" in err
    assert "'response'" in err


def test_identical_pair_row(capsys, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    code, _, err = cli(capsys, "train-dpo", "--model", ".", "--data", data, "--out", tmp_path / "o")
    assert_one_line_error(err)
    assert code == 1
    assert str(data) in err and "row 1" in err and "'rejected'" in err


def test_unknown_layout_lists_the_columns_found_and_the_layouts_known(capsys, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "a", "good": "b", "bad": "c"}) + "\n")
    code, _, err = cli(capsys, "train-dpo", "--model", ".", "--data", data, "--out", tmp_path / "o")
    assert_one_line_error(err)
    assert code == 1
    assert f"{data}, row 1: cannot tell the pairs data format from the columns 'question', 'good', 'bad';" in err
    assert "standard (prompt, chosen, rejected strings)" in err and "conversational (" in err and "hh (" in err
    assert "--prompt-key/--chosen-key/--rejected-key/--messages-key" in err and "--data-format" in err


def test_unknown_layout_caps_the_columns_it_names(capsys, tmp_path):
    data = tmp_path / "wide.jsonl"
    data.write_text(json.dumps({f"c{i}": "x" for i in range(25)}) + "\n")
    code, _, err = cli(capsys, "sft", "--model", ".", "--data", data, "--out", tmp_path / "o")
    assert_one_line_error(err)
    assert code == 1
    assert "'c0', 'c1'" in err and "'c19' and 5 more;" in err and "'c20'" not in err
    assert "sft (prompt, response)" in err and "messages (messages)" in err


# --------------------------------------------------------------------------- verify and manifests


@dataclasses.dataclass
class TinyConfig:
    out: str = "somewhere"
    lr: float = 0.5


def make_output(path: Path) -> Path:
    out = prepare_output(path, "toy")
    (out / "weights.bin").write_bytes(bytes(range(16)))
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("hello\n")
    finalize(out, "toy", TinyConfig(), {"data": {"kind": "data", "path": "x", "fingerprint": "0"}})
    return out


def test_finalize_manifest_contents(tmp_path):
    out = make_output(tmp_path / "art")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert manifest["stage"] == "toy"
    assert manifest["config"] == {"out": "somewhere", "lr": 0.5}
    # sha256 of bytes 0..15, computed independently
    assert manifest["outputs"]["weights.bin"] == {
        "bytes": 16, "sha256": "be45cb2605bf36bebde684841a28f0fd43c69850a3dce5fedba69928ee3a8991"}
    assert manifest["outputs"]["sub/notes.txt"]["bytes"] == 6
    assert MANIFEST not in manifest["outputs"]
    assert read_manifest(out, "toy")["stage"] == "toy"


def test_verify_untouched(capsys, tmp_path):
    out = make_output(tmp_path / "art")
    code, stdout, err = cli(capsys, "verify", out)
    assert code == 0, err
    assert stdout == f"{out}: ok\n"


def test_verify_changed_bytes_same_size(capsys, tmp_path):
    out = make_output(tmp_path / "art")
    data = bytearray((out / "weights.bin").read_bytes())
    data[5] ^= 0xFF
    (out / "weights.bin").write_bytes(bytes(data))
    code, stdout, err = cli(capsys, "verify", out)
    assert_one_line_error(err)
    assert code == 1
    assert "weights.bin" in err and "sha256" in err
    assert "notes.txt" not in err  # only the changed file is reported
    assert stdout == ""


def test_verify_changed_size(capsys, tmp_path):
    out = make_output(tmp_path / "art")
    (out / "sub" / "notes.txt").write_text("hello, world\n")
    code, _, err = cli(capsys, "verify", out)
    assert_one_line_error(err)
    assert code == 1
    assert "notes.txt" in err


def test_verify_missing_file(capsys, tmp_path):
    out = make_output(tmp_path / "art")
    (out / "weights.bin").unlink()
    code, _, err = cli(capsys, "verify", out)
    assert_one_line_error(err)
    assert code == 1
    assert "weights.bin" in err and "missing" in err


def test_verify_nonexistent_directory(capsys, tmp_path):
    code, _, err = cli(capsys, "verify", tmp_path / "nothing-here")
    assert_one_line_error(err)
    assert code == 1
    assert "nothing-here" in err


def test_unfinished_output_refused(capsys, tmp_path):
    out = prepare_output(tmp_path / "half", "toy")
    (out / "weights.bin").write_bytes(b"partial")
    with pytest.raises(UserError, match="unfinished"):
        read_manifest(out)
    assert not is_complete(out)
    code, _, err = cli(capsys, "verify", out)
    assert_one_line_error(err)
    assert code == 1
    assert "unfinished" in err


def test_prepare_output_invalidates_previous_manifest(tmp_path):
    out = make_output(tmp_path / "art")
    assert is_complete(out)
    prepare_output(out, "toy")
    assert not (out / MANIFEST).exists()
    assert not is_complete(out)
    with pytest.raises(UserError, match="unfinished"):
        read_manifest(out)


def test_manifest_not_complete_or_wrong_stage(tmp_path):
    out = make_output(tmp_path / "art")
    with pytest.raises(UserError, match="expected sft"):
        read_manifest(out, "sft")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="incomplete"):
        read_manifest(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(out)


def test_verify_path_with_brackets_printed_verbatim(capsys, tmp_path):
    # stdout carries results (paths) that scripts read: it must not be treated as rich markup
    out = make_output(tmp_path / "[run1]")
    code, stdout, err = cli(capsys, "verify", out)
    assert code == 0, err
    assert stdout == f"{out}: ok\n"


def test_verify_long_path_not_wrapped_via_console_script(tmp_path):
    # stdout must stay one line per result even when a path is longer than the terminal width
    out = make_output(tmp_path / ("d" * 100) / "art")
    proc = script("verify", out, env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}: ok\n"


def test_help_and_completion_import_no_torch():
    """`aligndistil --help` (and every TAB of shell completion, which builds the same app) loads neither torch nor
    transformers: they cost seconds, and nothing in the help needs them."""
    code = ("import sys\nfrom aligndistil_cli import cli\n"
            "print(sorted(m for m in ('torch', 'transformers', 'yaml', 'rich.progress') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
