"""Teacher cache formats through distill, against the live teacher (padded vocabulary: 96 rows, 64 tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import CacheLayout, DistillConfig, PrecomputeConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import PAIR_FIELDS, collate, encode, load_rows
from aligndistil_cli.losses.functions import mask_padded_vocab
from aligndistil_cli.model.loading import load_model, load_tokenizer
from aligndistil_cli.parallel import fsdp
from aligndistil_cli.rundir.artifacts import read_manifest, sha256_file
from aligndistil_cli.stages import distill, precompute
from aligndistil_cli.stages.distill import cached_teacher_loss
from aligndistil_cli.teacher.cache import TeacherCache
from bench.reference import aligndistil_loss, compose_teacher

CPU = torch.device("cpu")


def precompute_as(runs: Path, out: Path, **overrides) -> Path:
    values = json.loads((runs / "teacher" / "stage_config.json").read_text()) | {"out": str(out)} | overrides
    return precompute.run(load_config(PrecomputeConfig, None, values))


@pytest.fixture(scope="module")
def caches(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {fmt: precompute_as(runs, root / fmt, format=fmt, top_k=16) for fmt in ("logits", "hidden", "topk")}


def live_loss(runs: Path, rows: list[int], variant_kwargs: dict | None = None):
    """The AlignDistil loss computed the way the official code does: full logits of all three models."""
    config = load_config(PrecomputeConfig, None, json.loads((runs / "teacher" / "stage_config.json").read_text()))
    tok = load_tokenizer(config.dpo)
    data = load_rows(config.data, PAIR_FIELDS)
    batch = collate([encode(tok, data[i]["prompt"], data[i]["chosen"], config.max_length, config.max_prompt_length)
                     for i in rows], tok.pad_token_id)
    student, dpo, rev = (load_model(p, CPU).eval() for p in (runs / "sft", config.dpo, config.rev))
    with torch.no_grad():
        z_dpo, z_rev = (m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits for m in (dpo, rev))
        teacher, coef, _ = compose_teacher(z_dpo, z_rev, vocab_size=len(tok), **(variant_kwargs or {}))
    z_student = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = aligndistil_loss(mask_padded_vocab(z_student, len(tok)), teacher, coef, batch.loss_mask)
    return loss, student, tok, batch, config


def cached_loss(cache_dir: Path, student, tok, config, rows: list[int], alpha_scale=None):
    cache = TeacherCache(cache_dir)
    spec = distill.cache_spec(cache, DistillConfig(out="x", student="s", cache=str(cache_dir), data="d",
                                                   alpha_scale=alpha_scale), tok.eos_token_id)
    data = load_rows(config.data, PAIR_FIELDS)
    chunk = [(i, encode(tok, data[i]["prompt"], data[i]["chosen"], config.max_length, config.max_prompt_length))
             for i in rows]
    return cached_teacher_loss(student, cache, spec, tok.pad_token_id, len(tok), CPU, chunk_size=7)(chunk)[0]


@pytest.mark.parametrize("fmt", ["logits", "hidden"])
def test_exact_formats_reproduce_the_live_teacher_loss_and_gradient(runs, caches, fmt):
    rows = [0, 3, 5, 6]
    live, student, tok, _, config = live_loss(runs, rows)
    live.backward()
    live_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    cached = cached_loss(caches[fmt], student, tok, config, rows)
    cached.backward()
    assert abs(cached.item() - live.item()) <= 1e-5 * abs(live.item())
    torch.testing.assert_close(student.lm_head.weight.grad, live_grad, rtol=1e-4, atol=1e-6)


def test_topk_is_biased_and_exact_when_one_id_is_left(runs, caches, tmp_path):
    rows = [0, 3, 5, 6]
    live, student, tok, _, config = live_loss(runs, rows)
    truncated = cached_loss(caches["topk"], student, tok, config, rows)
    assert torch.isfinite(truncated)
    assert truncated.item() != pytest.approx(live.item(), rel=1e-3), "a truncated teacher is biased"
    # With k = vocab - 1 the "evenly spread" tail is one id holding exactly its own mass.
    full = cached_loss(precompute_as(runs, tmp_path / "k63", format="topk", top_k=len(tok) - 1), student, tok, config, rows)
    assert full.item() == pytest.approx(live.item(), rel=1e-5)


def test_topk_teacher_is_a_distribution(caches):
    from aligndistil_cli.teacher.compose import logq_fn

    cache = TeacherCache(caches["topk"])
    fields = cache.fetch([0, 1])
    logq = logq_fn("topk", fields, {}, cache.spec, cache.index["vocab_size"], CPU)(0, fields["coef"].shape[0])
    torch.testing.assert_close(logq.logsumexp(-1), torch.zeros(logq.shape[0]), atol=1e-5, rtol=0)


def test_compact_formats_are_smaller(caches):
    size = {fmt: read_manifest(d)["metrics"]["bytes_per_position"] for fmt, d in caches.items()}
    assert size["topk"] < size["logits"]
    assert (caches["hidden"] / "heads.safetensors").is_file()


def test_shard_teachers_changes_nothing_in_one_process(runs, caches, tmp_path):
    """--shard-teachers without torchrun: the teachers stay whole, the cache is byte for byte the one built
    without it, and its settings_key is the same, so either run reuses the other's shards."""
    base = caches["hidden"]
    dpo = load_model(json.loads((base / "stage_config.json").read_text())["dpo"], CPU)
    assert fsdp.shard_frozen(dpo) is dpo and not fsdp.is_sharded(dpo)
    out = precompute_as(runs, tmp_path / "sharded", format="hidden", top_k=16, shard_teachers=True)
    assert json.loads((out / "stage_config.json").read_text())["shard_teachers"] is True
    assert json.loads((base / "stage_config.json").read_text())["shard_teachers"] is False
    index = json.loads((out / "index.json").read_text())
    assert index["settings_key"] == json.loads((base / "index.json").read_text())["settings_key"]
    assert index == json.loads((base / "index.json").read_text())
    files = sorted(p.name for p in base.glob("*.safetensors"))
    assert "heads.safetensors" in files and sorted(p.name for p in out.glob("*.safetensors")) == files
    for name in files:
        assert sha256_file(out / name) == sha256_file(base / name), name
    # Both held every teacher parameter (float32 on CPU), counted here from the model files.
    config = json.loads((base / "stage_config.json").read_text())
    whole = sum(4 * sum(p.numel() for p in load_model(config[n], CPU).parameters()) for n in ("dpo", "rev"))
    assert [read_manifest(d)["metrics"]["teacher_param_bytes_per_rank"] for d in (base, out)] == [whole, whole]
    again = tmp_path / "again"
    shutil.copytree(base, again)
    metrics = read_manifest(precompute_as(runs, again, format="hidden", top_k=16, shard_teachers=True))["metrics"]
    assert metrics["shards_reused"] == metrics["shards"] == len(index["shards"])


@pytest.mark.parametrize("fmt", ["hidden", "topk"])
def test_distill_trains_from_compact_caches(runs, caches, fmt, tmp_path):
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    out = distill.run(load_config(DistillConfig, None, values | {"cache": str(caches[fmt]), "out": str(tmp_path / fmt),
                                                                "max_steps": 2}))
    *metrics, final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    assert final["step"] == 2 and final["final_kl_teacher"] > 0


def test_hidden_cache_serves_other_r(runs, caches):
    """alpha_t = r TVD_t + eps is applied at distill time, from the stored TVD_t."""
    rows = [1, 2]
    live, student, tok, _, config = live_loss(runs, rows, {"alpha_scale": 5.0})
    cached = cached_loss(caches["hidden"], student, tok, config, rows, alpha_scale=5.0)
    default = cached_loss(caches["hidden"], student, tok, config, rows)
    # 1e-4: the stored TVD comes from selected positions, the live one from a full forward (float32 rounding).
    assert cached.item() == pytest.approx(live.item(), rel=1e-4)
    assert cached.item() != pytest.approx(default.item(), rel=1e-2), "r = 5 and r = 20 give different teachers"


def test_other_r_needs_a_hidden_cache(caches):
    with pytest.raises(UserError, match="format hidden"):
        distill.cache_spec(TeacherCache(caches["logits"]),
                           DistillConfig(out="x", student="s", cache="c", data="d", alpha_scale=5.0), 2)


def test_logits_format_refused_for_a_large_vocabulary():
    config = PrecomputeConfig(out="x", dpo="d", rev="r", data="p", format="logits")
    with pytest.raises(UserError, match="--format hidden"):
        precompute.choose_format(CacheLayout.of(config), vocab=151_936, hidden=1_536, n_models=2)
    assert precompute.choose_format(CacheLayout(), 151_936, 1_536, 2) == "hidden"
    assert precompute.choose_format(CacheLayout(), 64, 128, 2) == "logits"


def test_post_head_transform_is_refused_by_name(runs, tmp_path):
    model_dir = tmp_path / "capped"
    # A model of someone else's (save_pretrained files only): editing one of ours would be refused as changed.
    shutil.copytree(runs / "dpo", model_dir,
                    ignore=shutil.ignore_patterns(".aligndistil", "manifest.json", "stage_config.json", "metrics.jsonl"))
    cfg = json.loads((model_dir / "config.json").read_text()) | {"final_logit_softcapping": 30.0}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="final_logit_softcapping"):
        load_model(model_dir, CPU)


def test_theorem1_cache_needs_no_reverse_model(runs, tmp_path):
    """theorem1 (z* = w z_dpo + (1 - w) z_ref) is built from DPO and the reference only: precompute
    runs without --rev, loads no reverse model and records none."""
    out = precompute_as(runs, tmp_path / "t1", variant="theorem1", rev=None, ref=str(runs / "sft"), format="logits",
                        kl_coef=0.05)
    cache = TeacherCache(out)
    assert cache.index["models"] == ["dpo", "ref"]
    assert "rev" not in read_manifest(out)["inputs"]
    config = load_config(PrecomputeConfig, None, json.loads((runs / "teacher" / "stage_config.json").read_text()))
    tok = load_tokenizer(config.dpo)
    row = load_rows(config.data, PAIR_FIELDS)[0]
    batch = collate([encode(tok, row["prompt"], row["chosen"], config.max_length, config.max_prompt_length)],
                    tok.pad_token_id)
    dpo, ref = (load_model(p, CPU).eval() for p in (config.dpo, runs / "sft"))
    with torch.no_grad():
        z_dpo, z_ref = (m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.loss_mask]
                        for m in (dpo, ref))
    w = config.beta / 0.05
    assert w != 1.0, "w = 1 would not exercise the reference"
    expected = torch.log_softmax((w * z_dpo + (1 - w) * z_ref)[:, : len(tok)].double(), -1)
    got = cache.fetch([0])["teacher_logprobs"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
