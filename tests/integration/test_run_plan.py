"""`aligndistil run`: --dry-run's reasons, --only/--from/--until, --set, did-you-mean."""

from __future__ import annotations

import pytest
import yaml

from aligndistil_cli.cli import main
from aligndistil_cli.core.errors import ConfigError, UsageError
from aligndistil_cli.orchestrate.pipeline import run_file
from aligndistil_cli.orchestrate.plan import parse_sets, select

PIPELINE = {
    "seed": 0,
    "stages": [
        {"name": "toy", "stage": "init-toy",
         "with": {"num_sft": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        {"name": "sft", "stage": "sft",
         "with": {"model": "{toy}/model", "data": "{toy}/sft.jsonl", "max_steps": 1, "batch_size": 8,
                  "max_length": 64, "max_prompt_length": 32}},
    ],
}


@pytest.fixture
def pipeline(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PIPELINE | {"root": str(tmp_path / "runs")}))
    return path


def plan_lines(capsys, path, *args) -> dict[str, str]:
    """{stage name: 'run: reason' or 'skip: reason'} printed by --dry-run."""
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--dry-run", *args])
    assert exit_.value.code == 0
    lines = {}
    for line in capsys.readouterr().err.splitlines():
        word, name, rest = line.split(None, 2)
        lines[name] = f"{word}: {rest.split(': ', 1)[1]}"
    return lines


def test_dry_run_explains_each_stage(pipeline, tmp_path, capsys):
    assert plan_lines(capsys, pipeline) == {"toy": "run: no output yet", "sft": "run: no output yet"}
    run_file(pipeline)
    capsys.readouterr()
    assert plan_lines(capsys, pipeline) == {"toy": "skip: complete", "sft": "skip: complete"}
    assert plan_lines(capsys, pipeline, "--set", "sft.lr=0.002") == {"toy": "skip: complete",
                                                                     "sft": "run: config changed: lr"}
    assert plan_lines(capsys, pipeline, "--set", "toy.num_sft=65") == {
        "toy": "run: config changed: num_sft", "sft": "run: input changed: toy runs first"}
    assert plan_lines(capsys, pipeline, "--set", "toy.num_sft=65", "--only", "sft") == {
        "toy": "skip: not selected", "sft": "skip: complete"}
    with open(tmp_path / "runs" / "toy" / "sft.jsonl", "a") as f:
        f.write('{"prompt": "x", "response": "y"}\n')
    assert plan_lines(capsys, pipeline)["sft"] == "run: input changed: data"
    (tmp_path / "runs" / "sft" / "manifest.json").unlink()
    assert plan_lines(capsys, pipeline)["sft"] == "run: unfinished (no manifest)"
    assert plan_lines(capsys, pipeline, "--force", "--until", "toy") == {"toy": "run: --force",
                                                                         "sft": "skip: not selected"}


def test_only_runs_the_named_stage(pipeline, tmp_path, capsys):
    run_file(pipeline, until="toy")
    assert not (tmp_path / "runs" / "sft").exists()
    run_file(pipeline, only=["sft"], sets=["sft.lr=0.002"])
    err = capsys.readouterr().err
    assert "skip toy (init-toy): not selected" in err
    assert yaml.safe_load((tmp_path / "runs" / "sft" / "stage_config.json").read_text())["lr"] == 0.002


def test_typos_get_did_you_mean(pipeline, capsys):
    for args, message in ((["--only", "stf"], "error: --only: unknown stage 'stf'; did you mean 'sft'?"),
                          (["--from", "tyo"], "error: --from: unknown stage 'tyo'; did you mean 'toy'?"),
                          (["--set", "sft.lrr=1"], "unknown config key 'lrr'; did you mean 'lr'?"),
                          (["--set", "sfy.lr=1"], "error: --set: unknown stage 'sfy'; did you mean 'sft'?")):
        with pytest.raises(SystemExit) as exit_:
            main(["run", str(pipeline), "--dry-run", *args])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_parse_sets_reads_yaml_values_and_keeps_placeholders():
    assert parse_sets(["sft.lr=0.001", "sft.epochs=2", "sft.chat_template=false", "eval.models.x={sft}/m",
                       "dpo.data={prefs}/pairs.jsonl"]) == {
        "sft": {"lr": 0.001, "epochs": 2, "chat_template": False},
        "eval": {"models": {"x": "{sft}/m"}}, "dpo": {"data": "{prefs}/pairs.jsonl"}}
    for bad in ("sft.lr", "lr=1", "=1", ".lr=1"):
        with pytest.raises(UsageError, match="STAGE.KEY=VALUE"):
            parse_sets([bad])


def test_select_ranges():
    names = ["a", "b", "c", "d"]
    assert select(names, None, "b", "c") == {"b", "c"}
    assert select(names, ["d", "a"], None, None) == {"a", "d"}
    assert select(names, None, None, None) == set(names)
    with pytest.raises(UsageError, match="comes after"):
        select(names, None, "c", "b")
    with pytest.raises(ConfigError, match="did you mean 'c'"):
        select(names, None, None, "cc")
