"""On-policy distillation: masks of sampled sequences, one loss path with off-policy, a smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from aligndistil_cli.config.stages import DistillConfig, PrecomputeConfig
from aligndistil_cli.data.encode import Encoded, collate, prompt_ids
from aligndistil_cli.model.loading import load_model, load_tokenizer, output_head
from aligndistil_cli.model.sampling import generate
from aligndistil_cli.stages import on_policy, precompute
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.teacher.live import teacher_for_batch, teacher_heads
from aligndistil_cli.teacher.objective import teacher_loss

CPU = torch.device("cpu")
PAD, EOS = 0, 2


def test_sampled_sequence_mask_covers_first_token_and_eos_only():
    # Prompt [7 8 9], then sampled 11 12 EOS (sampling ends a response at its first EOS: test_sampling.py).
    response = [11, 12, EOS]
    batch = collate([Encoded([7, 8, 9], response), Encoded([7, 8], [13, EOS])], PAD)
    # Row 0: prompt at 0..2, response at 3..5; positions 2 (predicts 11), 3, 4 (predicts EOS) are in.
    assert batch.loss_mask[0].tolist() == [False, False, True, True, True, False]
    assert batch.targets[0, 2:5].tolist() == [11, 12, EOS]
    # Row 1 is right-padded: its prompt position 1 predicts 13, position 2 predicts EOS, the rest are out.
    assert batch.loss_mask[1].tolist() == [False, True, True, False, False, False]


def test_on_policy_teacher_takes_the_alpha_cap_and_the_kept_eos():
    config = DistillConfig(out="-", student="-", data="-", mode="on-policy", dpo="d", rev="r", alpha_max=2.0,
                           extrapolate_eos=False, alpha_scale=5.0)
    spec = on_policy.on_policy_spec(config, EOS)
    assert (spec.alpha_scale, spec.alpha_eps, spec.alpha_max, spec.keep_eos) == (5.0, 1e-3, 2.0, EOS)
    paper = on_policy.on_policy_spec(DistillConfig(out="-", student="-", data="-", mode="on-policy", dpo="d", rev="r"), EOS)
    assert (paper.alpha_scale, paper.alpha_max, paper.keep_eos) == (20.0, None, None)


def test_live_teacher_and_cache_give_the_same_loss(runs, tmp_path):
    """Sampled sequences through the off-policy cache path give the live path's loss (one implementation)."""
    tok = load_tokenizer(runs / "sft")
    student = load_model(runs / "sft", CPU)
    prompts = [[{"role": "user", "content": p}] for p in
               [json.loads(line)["prompt"] for line in (runs / "toy" / "heldout_prompts.jsonl").read_text().splitlines()[:12]]]
    samples = generate(student, tok, prompts, [prompt_ids(tok, p) for p in prompts], max_new_tokens=24, seed=3)
    # Keep the samples whose text re-encodes to the sampled ids (a sampled <unk> or <pad> would not).
    samples = [s for s in samples if s.finished and s.text.strip()
               and tok(s.text, add_special_tokens=False).input_ids + [tok.eos_token_id] == s.response_ids][:4]
    assert samples, "some samples end in EOS"
    data = tmp_path / "sampled.jsonl"
    data.write_text("".join(json.dumps({"prompt": s.prompt[0]["content"], "chosen": s.text, "rejected": "i"}) + "\n"
                            for s in samples))
    values = json.loads((runs / "teacher" / "stage_config.json").read_text())
    cache_dir = precompute.run(PrecomputeConfig(**{**values, "out": str(tmp_path / "c"), "data": str(data),
                                                   "format": "hidden"}))
    cache = TeacherCache(cache_dir)
    batch = collate([Encoded(s.prompt_ids, s.response_ids) for s in samples], tok.pad_token_id)
    config = DistillConfig(out="-", student="-", data="-", mode="on-policy", dpo=values["dpo"], rev=values["rev"])
    spec = on_policy.on_policy_spec(config, tok.eos_token_id)
    teachers = {n: load_model(values[n], CPU).eval() for n in ("dpo", "rev")}
    live = teacher_for_batch(teachers, teacher_heads(teachers), batch, spec, "hidden", len(tok), torch.float32, host=False)
    # The teachers' parameters require grad here, but no autograd graph may be built over their forwards.
    assert all(p.requires_grad for p in teachers["dpo"].parameters())
    assert not any(t.requires_grad for t in live.values())
    heads = {n: output_head(m) for n, m in teachers.items()}
    live_loss, _ = teacher_loss(student, batch, live, heads, "hidden", spec, len(tok), 5)
    cached_loss, _ = teacher_loss(student, batch, cache.fetch(list(range(len(samples)))), cache.heads(CPU), "hidden",
                                  cache.spec, len(tok), 7)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-5)


def test_on_policy_smoke_run(runs, tmp_path):
    config = DistillConfig(out=str(tmp_path / "op"), student=str(runs / "sft"), data=str(runs / "toy" / "prompts.jsonl"),
                           mode="on-policy", dpo=str(runs / "dpo"), rev=str(runs / "rev"), batch_size=4, max_steps=4,
                           updates_per_rollout=2, max_new_tokens=12, max_length=64, max_prompt_length=32, lr=1e-3)
    out = on_policy.run(config)
    *metrics, final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and set(final) == {"step", "final_kl_teacher"} and final["final_kl_teacher"] > 0
    assert all(m["rollout_tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0 for m in metrics)
    # Steps 1-2 share a rollout, and so do steps 3-4: same samples, same rollout statistics.
    assert metrics[0]["response_length_mean"] == metrics[1]["response_length_mean"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["mode"] == "on-policy" and set(manifest["inputs"]) >= {"dpo", "rev", "student"}
    assert manifest["metrics"]["final_kl_teacher"] == final["final_kl_teacher"]
    # Each of the 2 rollouts (4 samples of at most 12 tokens) is trained on twice.
    assert 0 < manifest["metrics"]["train_tokens"] <= 2 * 2 * 4 * 12


def test_on_policy_mixes_off_policy_sequences(runs, tmp_path):
    config = DistillConfig(out=str(tmp_path / "mix"), student=str(runs / "sft"), data=str(runs / "prefs" / "pairs.jsonl"),
                           mode="on-policy", dpo=str(runs / "dpo"), rev=str(runs / "rev"), batch_size=4, max_steps=1,
                           mix_off_policy=0.5, max_new_tokens=8, max_length=64, max_prompt_length=32)
    out = on_policy.run(config)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["off_policy_sequences"] == 2


def timing_free(out) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (elapsed_s, *_tokens_per_s), which no two runs share."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s" and not k.endswith("_tokens_per_s")} for r in rows]


def test_on_policy_does_not_depend_on_grad_accum(runs, tmp_path):
    """The same global batch split into 2 micro-batches samples the same responses, mixes in the same
    off-policy rows and normalises over the same sequences as 1 micro-batch: same losses, same weights.

    The two gradients differ by float32 rounding only (summed over 1 or 2 backward passes: 4e-7 relative
    at the first step). Adam divides each element by its own RMS, so an element whose gradient is
    itself at the rounding scale (3e-9 against a median of 3e-6 in layers.0.mlp.up_proj) would step by
    about lr * g / (|g| + eps) and turn a 1e-11 rounding difference into a 6e-6 weight difference at
    eps 1e-8 (the default), more or less by luck of the thread count. At eps 1e-6 a gradient below eps
    steps by lr * g / eps, so the weights compare the gradients themselves (largest difference 7e-7,
    with 1 thread and with 2).
    """
    from safetensors.torch import load_file

    values = {"student": str(runs / "sft"), "data": str(runs / "prefs" / "pairs.jsonl"), "mode": "on-policy",
              "dpo": str(runs / "dpo"), "rev": str(runs / "rev"), "batch_size": 8, "samples_per_prompt": 2,
              "max_steps": 3, "mix_off_policy": 0.25, "max_new_tokens": 8, "max_length": 64,
              "max_prompt_length": 32, "lr": 1e-2, "adam_eps": 1e-6}
    one = on_policy.run(DistillConfig(out=str(tmp_path / "one"), grad_accum=1, **values))
    two = on_policy.run(DistillConfig(out=str(tmp_path / "two"), grad_accum=2, **values))
    a, b = timing_free(one), timing_free(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3]  # 3 steps, then the final KL
    # 4 prompts x 2 samples a step: round(0.25 * 8) = 2 slots hold off-policy rows, whatever the split.
    assert [r["off_policy_sequences"] for r in a[:3]] == [2, 2, 2]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (x["step"], k)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = load_model(runs / "sft", CPU).state_dict()
    assert any(not torch.equal(wa[k], start[k]) for k in wa), "training moved the weights"
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
