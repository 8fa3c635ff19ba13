"""Issue 13: the student's final KL to its teacher, and sampling the composed teacher itself.

Expected values are recomputed in float64 from full model forwards, independently of the
chunked, cached paths under test.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import DistillConfig, EvaluateConfig
from aligndistil_cli.data.encode import Encoded, collate, encode_rows, load_data, prompt_ids
from aligndistil_cli.model.loading import load_model, load_tokenizer
from aligndistil_cli.stages import distill, evaluate
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.teacher.compose import TeacherSpec
from aligndistil_cli.teacher.sampling import generate_teacher

CPU = torch.device("cpu")


def response_logits(model, batch) -> torch.Tensor:
    """[N, V] float64 logits at the positions that predict response tokens, from one full forward."""
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.loss_mask].double()


def aligndistil_teacher64(z_dpo: torch.Tensor, z_rev: torch.Tensor, vocab: int, r: float = 20.0, eps: float = 1e-3):
    """log softmax(z*) in float64: z* = z_dpo + alpha (z_dpo - z_rev), alpha = r TVD(dpo, rev) + eps."""
    z_dpo, z_rev = z_dpo[..., :vocab].double(), z_rev[..., :vocab].double()
    tvd = 0.5 * (torch.softmax(z_dpo, -1) - torch.softmax(z_rev, -1)).abs().sum(-1, keepdim=True)
    return torch.log_softmax(z_dpo + (r * tvd + eps) * (z_dpo - z_rev), -1)


def test_distill_records_the_final_kl_to_its_teacher(runs, tmp_path):
    values = json.loads((runs / "student" / "stage_config.json").read_text())
    out = distill.run(load_config(DistillConfig, None, values | {"out": str(tmp_path / "s"), "max_steps": None,
                                                                "epochs": 2}))
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final_kl_teacher"] == manifest["final_kl_teacher"]
    # Independently: the trained student's KL to the cached teacher, per token, over the first 256 rows.
    cache = TeacherCache(runs / "teacher")
    tok = load_tokenizer(out)
    rows, stats = load_data(load_config(DistillConfig, None, values), "pairs")
    examples, _ = encode_rows(tok, rows, "chosen", load_config(DistillConfig, None, values), stats)
    n = min(256, len(examples))
    batch = collate(examples[:n], tok.pad_token_id)
    log_p = torch.log_softmax(response_logits(load_model(out, CPU), batch)[:, : len(tok)], -1)
    log_q = cache.fetch(list(range(n)))["teacher_logprobs"].double()[:, : len(tok)]
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert manifest["final_kl_teacher"] == pytest.approx(expected, rel=1e-4)
    # Two epochs over every row: twice the response positions the cache holds.
    assert manifest["train_tokens"] == 2 * cache.index["positions"]


def test_teacher_samples_carry_their_teacher_log_probs(runs):
    """Sampling over KV caches with left padding gives the log-probs a teacher-forced float64 forward gives."""
    tok = load_tokenizer(runs / "sft")
    dpo, rev = load_model(runs / "dpo", CPU).eval(), load_model(runs / "rev", CPU).eval()
    texts = [json.loads(line)["prompt"] for line in (runs / "toy" / "heldout_prompts.jsonl").read_text().splitlines()[:6]]
    texts = [t if i % 2 else f"{t} {texts[i - 1]}" for i, t in enumerate(texts)]  # two lengths
    prompts = [[{"role": "user", "content": t}] for t in texts]
    ids = [prompt_ids(tok, p) for p in prompts]
    assert len({len(i) for i in ids}) > 1, "prompts of different lengths exercise the left padding"
    spec = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)
    samples, logps = generate_teacher({"dpo": dpo, "rev": rev}, spec, tok, prompts, ids, max_new_tokens=10,
                                      batch_size=4, seed=5)
    assert [s.prompt_ids for s in samples] == ids and any(s.response_ids for s in samples)
    batch = collate([Encoded(s.prompt_ids, s.response_ids) for s in samples], tok.pad_token_id)
    teacher = aligndistil_teacher64(response_logits(dpo, batch), response_logits(rev, batch), len(tok))
    per_token = teacher.gather(-1, batch.targets[batch.loss_mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(len(samples)).unsqueeze(1).expand_as(batch.loss_mask)[batch.loss_mask]
    expected = torch.zeros(len(samples), dtype=torch.float64).index_add(0, rows, per_token)
    torch.testing.assert_close(torch.tensor(logps, dtype=torch.float64), expected, rtol=1e-4, atol=1e-4)
    # The same seed draws the same responses, over every KV cache (one per teacher model).
    for kv_cache in ("dynamic", "static", "preallocated"):
        again, again_logps = generate_teacher({"dpo": dpo, "rev": rev}, spec, tok, prompts, ids, max_new_tokens=10,
                                              batch_size=4, seed=5, kv_cache=kv_cache)
        assert [s.response_ids for s in again] == [s.response_ids for s in samples], kv_cache
        assert again_logps == pytest.approx(logps, abs=1e-5), kv_cache


def test_evaluate_reports_the_teacher_row_and_diagnostics(runs, tmp_path):
    values = json.loads((runs / "eval" / "stage_config.json").read_text())
    config = load_config(EvaluateConfig, None, values | {"out": str(tmp_path / "e"), "models": {}, "dpo": None,
                                                         "rev": None, "teacher": str(runs / "teacher"),
                                                         "num_prompts": 8, "max_new_tokens": 8})
    report = json.loads((evaluate.run(config) / "report.json").read_text())
    row = report["models"]["teacher"]
    assert row["teacher_spec"]["variant"] == "aligndistil" and row["length"]["max"] <= 8
    diag = report["teacher_diagnostics"]
    assert diag["responses_ending_in_eos"] > 0
    # Independently, in float64, over the same chosen responses.
    tok = load_tokenizer(runs / "sft")
    rows, stats = load_data(config, "pairs", config.pairs)
    examples, _ = encode_rows(tok, rows[:256], "chosen", config, stats)
    batch = collate(examples, tok.pad_token_id)
    z = {n: response_logits(load_model(runs / n, CPU), batch)[:, : len(tok)] for n in ("sft", "dpo", "rev")}
    ends = torch.zeros_like(batch.loss_mask)
    for b, ex in enumerate(examples):
        ends[b, len(ex.prompt) + len(ex.response) - 2] = ex.response[-1] == tok.eos_token_id
    ends = ends[batch.loss_mask]
    assert diag["responses_ending_in_eos"] == int(ends.sum())
    eos = tok.eos_token_id
    for name, key in (("sft", "ref"), ("dpo", "dpo"), ("rev", "rev")):
        expected = torch.softmax(z[name], -1)[ends, eos].mean().item()
        assert diag["p_eos_at_end"][key] == pytest.approx(expected, rel=1e-4)
    teacher = aligndistil_teacher64(z["dpo"], z["rev"], len(tok))
    assert diag["p_eos_at_end"]["teacher"] == pytest.approx(teacher[ends, eos].exp().mean().item(), rel=1e-3)
    d_dpo = torch.log_softmax(z["dpo"], -1) - torch.log_softmax(z["sft"], -1)
    d_rev = torch.log_softmax(z["rev"], -1) - torch.log_softmax(z["sft"], -1)
    cos = (d_dpo * -d_rev).sum(-1) / d_dpo.norm(dim=-1) / d_rev.norm(dim=-1)
    assert diag["mirror_cosine_median"] == pytest.approx(statistics.median(cos.tolist()), abs=1e-4)


def eos_raising_rev(runs, out) -> str:
    """The DPO model with its EOS logit raised by about 4 where chosen responses end: the mirror image that
    drives z* = z_dpo + alpha (z_dpo - z_rev) away from EOS exactly where the data stops."""
    from aligndistil_cli.model.loading import response_hidden, save_model

    tok = load_tokenizer(runs / "dpo")
    model = load_model(runs / "dpo", CPU)
    config = load_config(DistillConfig, None, {"out": "-", "student": "-", "data": str(runs / "prefs" / "pairs.jsonl"),
                                               "cache": "-", "max_length": 64, "max_prompt_length": 32})
    rows, stats = load_data(config, "pairs")
    batch = collate(encode_rows(tok, rows[:16], "chosen", config, stats)[0], tok.pad_token_id)
    with torch.no_grad():
        hidden = response_hidden(model, batch)
        u = hidden[batch.targets[batch.loss_mask] == tok.eos_token_id].mean(0)
        model.lm_head.weight[tok.eos_token_id] += 4 * u / u.dot(u)
    save_model(model, tok, out)
    return str(out)


@pytest.mark.parametrize("extrapolate_eos", [True, False])
def test_precompute_health_warns_when_the_teacher_would_not_stop(runs, tmp_path, capsys, extrapolate_eos):
    from aligndistil_cli.config.stages import PrecomputeConfig
    from aligndistil_cli.stages import precompute

    values = json.loads((runs / "teacher" / "stage_config.json").read_text())
    out = precompute.run(PrecomputeConfig(**{**values, "out": str(tmp_path / "c"), "rev": eos_raising_rev(runs, tmp_path / "rev"),
                                             "extrapolate_eos": extrapolate_eos}))
    health = json.loads((out / "manifest.json").read_text())["metrics"]["health"]
    p = health["p_eos_at_end"]
    assert p["ref"] is not None and health["mirror_cosine_median"] is not None  # the reference: the DPO model's own
    assert health["alpha"]["max"] >= health["alpha"]["p50"] > 0 and 0 <= health["tvd"]["p50"] <= 1
    err = capsys.readouterr().err
    assert "teacher health" in err
    if extrapolate_eos:  # extrapolated away from the raised EOS: the teacher would not stop
        assert p["teacher"] < 0.1 * p["dpo"] and "--alpha-max" in health["warning"] and "--no-extrapolate-eos" in err
    else:  # the same teacher with the DPO model's own EOS probability stops where DPO does
        assert p["teacher"] == pytest.approx(p["dpo"], rel=1e-4) and health["warning"] is None
        assert "would not stop" not in err
