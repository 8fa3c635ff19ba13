"""The whole pipeline in its smoke profile: files written, skipping, round trips, cache exactness."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import DistillConfig, PrecomputeConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import PAIR_FIELDS, collate, encode, load_rows
from aligndistil_cli.model.loading import load_model, load_tokenizer, response_logits
from aligndistil_cli.orchestrate.pipeline import load_pipeline, run_file
from aligndistil_cli.rundir.artifacts import read_manifest, verify_full
from aligndistil_cli.teacher.cache import TeacherCache
from bench.reference import compose_teacher

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "pipelines" / "smoke.yaml"
MARKER = ".aligndistil"  # the owner marker and lock of every stage directory (outdir.py)
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "manifest.json", "stage_config.json", MARKER}
CARD = {"README.md"}
def evaluated(name: str) -> set[str]:
    """The card of a model evaluate measured: the comparison plots and its own training curves."""
    return CARD | {"evaluation/reward_vs_kl.png", "evaluation/lengths.png", f"evaluation/training_curves_{name}.png"}


EXPECTED = {
    "toy": {MARKER, "manifest.json", "stage_config.json", "sft.jsonl", "prompts.jsonl", "heldout_prompts.jsonl",
            "model/config.json", "model/generation_config.json", "model/model.safetensors", "model/tokenizer.json",
            "model/tokenizer_config.json"},
    "sft": MODEL_FILES | {"metrics.jsonl"} | evaluated("sft"),
    "prefs": {MARKER, "manifest.json", "stage_config.json", "pairs.jsonl"},
    "dpo": MODEL_FILES | {"metrics.jsonl"} | evaluated("dpo"),
    "rev": MODEL_FILES | {"metrics.jsonl"} | CARD,
    "student": MODEL_FILES | {"metrics.jsonl"} | evaluated("student"),
    "student-on-policy": MODEL_FILES | {"metrics.jsonl"} | CARD,
    "eval": {MARKER, "manifest.json", "stage_config.json", "report.json", "report.md", "reward_vs_kl.png", "lengths.png",
             "training_curves_sft.png", "training_curves_dpo.png", "training_curves_student.png"},
}


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def test_each_stage_writes_exactly_its_files(runs):
    for stage, expected in EXPECTED.items():
        assert files(runs / stage) == expected, stage
    teacher = files(runs / "teacher")
    shards = {f for f in teacher if f.startswith("shard-")}
    assert teacher - shards == {"index.json", "manifest.json", "stage_config.json", MARKER}
    assert len(shards) > 1, "shard_mb in smoke.yaml is small enough to force several shards"
    assert len(list((runs / "ref-cache").glob("ref-logps-*.safetensors"))) == 1, "reverse DPO reuses the cache"


def test_manifests_are_complete_and_verify(runs):
    for stage in [*EXPECTED, "teacher"]:
        manifest = read_manifest(runs / stage)
        assert manifest["complete"] is True
        assert set(manifest["outputs"]) == files(runs / stage) - {"manifest.json", MARKER}
        assert verify_full(runs / stage) == []


def test_second_run_skips_every_stage(runs, capsys):
    before = {s: (runs / s / "manifest.json").stat().st_mtime_ns for s in EXPECTED}
    run_file(SMOKE, root=runs)
    err = capsys.readouterr().err
    assert err.count("skip") == len(load_pipeline(SMOKE, runs))
    assert "run " not in err
    assert err.splitlines()[-1] == f"report: {runs / 'eval' / 'report.md'}"
    assert before == {s: (runs / s / "manifest.json").stat().st_mtime_ns for s in EXPECTED}


def _script(*argv, merged: bool) -> subprocess.CompletedProcess:
    """The console script, with stderr in stdout's pipe (as a terminal shows both) or apart."""
    return subprocess.run([str(Path(sys.executable).parent / "aligndistil"), *map(str, argv)], text=True, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_evaluate_and_run_name_the_report_last_and_evaluate_prints_its_dir_on_stdout(runs, tmp_path):
    for model in ("sft", "dpo"):  # copies: evaluate writes its table into the cards of the models it measures
        shutil.copytree(runs / model, tmp_path / model)
    out = tmp_path / "eval"
    argv = ["evaluate", "--ref", tmp_path / "sft", "--model", f"dpo={tmp_path / 'dpo'}", "--prompts",
            runs / "toy" / "heldout_prompts.jsonl", "--num-prompts", "4", "--max-new-tokens", "4", "--out", out]
    shown = _script(*argv, merged=True)
    assert shown.returncode == 0 and shown.stdout.splitlines()[-1] == f"report: {out / 'report.md'}"
    apart = _script(*argv, "--force", merged=False)
    assert apart.stdout.splitlines()[-1] == str(out)  # $(aligndistil evaluate ...) is the directory
    assert apart.stderr.splitlines()[-1] == f"report: {out / 'report.md'}"
    shown = _script("run", SMOKE, "--root", runs, "--only", "eval", merged=True)
    assert shown.returncode == 0 and shown.stdout.splitlines()[-1] == f"report: {runs / 'eval' / 'report.md'}"


@pytest.mark.parametrize("stage", ["toy/model", "sft", "dpo", "rev", "student"])
def test_saved_models_round_trip(runs, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligndistil_cli.data import toy

    d = runs / stage
    tok = AutoTokenizer.from_pretrained(d)
    reference = toy.build_tokenizer()
    for text in ["we visited on monday . write a review about the pizza and the staff .",
                 "the pizza was not very good . i loved the view ."]:
        assert tok(text).input_ids == reference(text).input_ids
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.vocab_size > len(tok), "embedding rows are padded past the tokenizer"


def test_dpo_moves_the_policy_and_reverse_moves_it_the_other_way(runs):
    dpo = [json.loads(line) for line in (runs / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(dpo[0]["loss"] - 0.693147) < 1e-4, "policy == reference at step 1, so the loss is ln 2"
    rev = [json.loads(line) for line in (runs / "rev" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rev[0]["loss"] - 0.693147) < 1e-4


def test_cache_equals_live_teacher(runs):
    """The cached teacher reproduces the composition of the live DPO / reverse-DPO logits."""
    config = load_config(PrecomputeConfig, None, json.loads((runs / "teacher" / "stage_config.json").read_text()))
    tok = load_tokenizer(config.dpo)
    rows = load_rows(config.data, PAIR_FIELDS)[:5]
    batch = collate([encode(tok, r["prompt"], r["chosen"], config.max_length, config.max_prompt_length) for r in rows],
                    tok.pad_token_id)
    dpo, rev = (load_model(p, torch.device("cpu")).eval() for p in (config.dpo, config.rev))
    with torch.no_grad():
        live, coef, tvd = compose_teacher(response_logits(dpo, batch, len(tok)), response_logits(rev, batch, len(tok)),
                                          vocab_size=len(tok))
    cached = TeacherCache(runs / "teacher").fetch(list(range(5)))
    assert cached["teacher_logprobs"].shape == (int(batch.loss_mask.sum()), len(tok))
    torch.testing.assert_close(cached["teacher_logprobs"], live[:, : len(tok)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["coef"], coef, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached["tvd"], tvd, rtol=1e-5, atol=1e-6)
    assert torch.isinf(live[:, len(tok):]).all(), "padded rows of the live teacher have zero probability"


def test_precompute_rerun_keeps_finished_shards(runs, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", copy)
    victim = sorted(copy.glob("shard-*.safetensors"))[1]
    original = load_file(victim)
    victim.unlink()
    values = json.loads((runs / "teacher" / "stage_config.json").read_text()) | {"out": str(copy)}
    from aligndistil_cli.stages import precompute

    precompute.run(load_config(PrecomputeConfig, None, values))
    manifest = read_manifest(copy)
    assert manifest["metrics"]["shards_reused"] == manifest["metrics"]["shards"] - 1
    recomputed = load_file(victim)
    assert recomputed.keys() == original.keys()
    for key in original:
        assert torch.equal(recomputed[key], original[key]), key


def test_distill_refuses_a_cache_for_other_data(runs, tmp_path):
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    other = tmp_path / "other.jsonl"
    other.write_text((runs / "prefs" / "pairs.jsonl").read_text().replace("the", "a", 1))
    from aligndistil_cli.stages import distill

    with pytest.raises(UserError, match="other data"):
        distill.run(load_config(DistillConfig, None, values | {"data": str(other), "out": str(tmp_path / "s")}))
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_distill_says_that_the_data_file_changed_since_the_cache(runs, tmp_path):
    """Issue 22, 12: the data file at the path the cache recorded has changed, said so, without the path twice."""
    for name in ("prefs", "teacher"):
        shutil.copytree(runs / name, tmp_path / name)
    data = tmp_path / "prefs" / "pairs.jsonl"
    data.write_text(data.read_text().replace("the", "a", 1))
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    from aligndistil_cli.stages import distill

    with pytest.raises(UserError) as refused:
        distill.run(load_config(DistillConfig, None, values | {"data": str(data), "cache": str(tmp_path / "teacher"),
                                                                "out": str(tmp_path / "s")}))
    assert str(refused.value) == (f"teacher cache {tmp_path / 'teacher'} was computed on {data}, whose content has "
                                  "changed since; give the data it was computed on, or rerun precompute")


def test_unfinished_input_is_refused(runs, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", broken)
    (broken / "manifest.json").unlink()
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    from aligndistil_cli.stages import distill

    with pytest.raises(UserError, match="unfinished"):
        distill.run(load_config(DistillConfig, None, values | {"cache": str(broken), "out": str(tmp_path / "s")}))


def test_report_names_every_model(runs):
    report = json.loads((runs / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["sft", "dpo", "student"]
    assert report["models"]["sft"]["kl"]["mean"] == 0.0
    assert 0.0 <= report["implicit_accuracy"]["dpo"] <= 1.0
    md = (runs / "eval" / "report.md").read_text()
    assert "| dpo |" in md and "![" in md


def test_corrupted_shard_is_named_and_never_read(runs, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", broken)
    shard = sorted(broken.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    cache = TeacherCache(broken)
    first = cache.shards[1]["row_start"]
    with pytest.raises(UserError, match=f"{shard.name} is corrupted"):
        cache.fetch([first])


def test_truncated_shard_is_refused_up_front(runs, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", broken)
    shard = sorted(broken.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=shard.name):
        TeacherCache(broken)


def test_cache_from_another_dpo_model_is_stale(runs, tmp_path):
    """A cache records its models' fingerprints; a retrained DPO model makes the pipeline recompute it."""
    from aligndistil_cli.rundir.artifacts import stale_inputs

    manifest = read_manifest(runs / "teacher")
    assert stale_inputs(manifest) == []
    dpo_copy = tmp_path / "dpo"
    shutil.copytree(runs / "dpo", dpo_copy)
    weights = load_file(dpo_copy / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    from safetensors.torch import save_file

    (dpo_copy / "manifest.json").unlink()
    save_file(weights, str(dpo_copy / "model.safetensors"))
    manifest["inputs"]["dpo"]["path"] = str(dpo_copy)
    assert stale_inputs(manifest) == ["dpo"]


SWEEP_SPECS = {"experiments.yaml", "experiments-full.yaml"}


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "pipelines").glob("*.yaml") if p.name not in SWEEP_SPECS),
                         ids=lambda p: p.name)
def test_every_shipped_pipeline_file_resolves(path):
    stages = load_pipeline(path)
    assert stages and len({name for name, _, _ in stages}) == len(stages)


def test_the_experiments_sweep_spec_resolves(tmp_path):
    from aligndistil_cli.orchestrate.sweep import load_spec, plan

    bases, runs = plan(load_spec(REPO / "pipelines" / "experiments.yaml"), tmp_path)
    assert len(bases) == 5 and len(runs) >= 5 * 20
    bases, runs = plan(load_spec(REPO / "pipelines" / "experiments-full.yaml"), tmp_path)
    assert len(bases) == 5 and len(runs) >= 5 * 180


def test_distill_refuses_a_cache_built_from_another_dpo_model(runs, tmp_path):
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    from aligndistil_cli.stages import distill

    with pytest.raises(UserError, match="built from another dpo model"):
        distill.run(load_config(DistillConfig, None, values | {"dpo": str(runs / "rev"), "out": str(tmp_path / "s")}))
    teacher = json.loads((runs / "teacher" / "stage_config.json").read_text())
    out = distill.run(load_config(DistillConfig, None, values | {"dpo": teacher["dpo"], "rev": teacher["rev"],
                                                                 "max_steps": 1, "out": str(tmp_path / "ok")}))
    assert (out / "manifest.json").is_file()


def test_teacher_selection_links_the_pair_with_the_best_held_out_accuracy(runs, tmp_path):
    """A candidate whose 'DPO' is the reverse model (and the reverse) ranks pairs the wrong way round: never chosen.
    Evaluation prompts are left out of the held-out pairs."""
    from aligndistil_cli.config.stages import DpoConfig
    from aligndistil_cli.orchestrate.selection import Selection, choose_teachers

    dpo, rev = (load_config(DpoConfig, None, json.loads((runs / n / "stage_config.json").read_text())) for n in ("dpo", "rev"))
    swapped = (dataclasses.replace(dpo, out=rev.out), dataclasses.replace(rev, out=dpo.out))
    pairs = runs / "prefs" / "pairs.jsonl"
    record = choose_teachers(Selection(str(tmp_path / "teachers"), (((1e-3, 1), *swapped), ((1e-3, 3), dpo, rev)),
                                       str(pairs), (str(pairs), 5)))
    assert record["chosen"] == {"lr": 1e-3, "epochs": 3}
    assert (tmp_path / "teachers" / "dpo").resolve() == Path(dpo.out).resolve()
    assert (tmp_path / "teachers" / "rev").resolve() == Path(rev.out).resolve()
    first, second = record["candidates"]  # the swapped pair is the smaller budget, but not within one SE
    assert second["score"] - second["standard_error"] > first["score"]
    assert record["held_out_pairs"] == len(pairs.read_text().splitlines()) - 5
