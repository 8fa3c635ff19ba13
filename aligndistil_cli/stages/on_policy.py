"""distill --mode on-policy: the student samples its own responses and live teachers teach them.

Each rollout samples responses from the current student for a batch of
prompts, runs the DPO and reverse-DPO models (and the reference where the
variant needs it) in inference mode on prompt + sample, and trains on the
same loss as off-policy distillation (distill.teacher_loss) with the teacher
built by precompute's own function, kept on the device.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from .. import checkpoint
from ..artifacts import finalize, fingerprint_model, input_record, prepare_output
from ..config import DistillConfig
from ..data import Encoded, collate, data_input, encode_prompts, encode_rows, load_data, prompt_ids, truncate
from ..modeling import (bf16_enabled, hub_options, load_model, load_student, load_tokenizer, pick_device,
                        save_model)
from ..monitor import make_monitor
from ..packing import MIN_PADDING, collate_for, enable as enable_padding_free
from ..sampling import generate
from ..teacher import TeacherSpec
from ..training import seed_everything, step_batches, train
from .distill import FINAL_KL_ROWS, final_teacher_kl, report_final_kl, teacher_loss
from .precompute import check_same_tokenizers, teacher_for_batch, teacher_heads


def on_policy_spec(config: DistillConfig) -> TeacherSpec:
    return TeacherSpec(config.variant, config.beta, config.kl_coef,
                       20.0 if config.alpha_scale is None else config.alpha_scale,
                       1e-3 if config.alpha_eps is None else config.alpha_eps, config.teacher_temperature)


def load_teachers(config: DistillConfig, spec: TeacherSpec, device, student_tokenizer) -> dict:
    paths = {"dpo": config.dpo, "rev": config.rev, "ref": config.ref}
    names = {name: paths[name] for name in spec.models}
    tokenizers = {f"{n} ({p})": load_tokenizer(p, **hub_options(config)) for n, p in names.items()}
    check_same_tokenizers({f"student ({config.student})": student_tokenizer, **tokenizers})
    dtype = torch.bfloat16 if bf16_enabled(config.precision, device) else torch.float32
    models = {n: load_model(p, device, dtype, config.attn_implementation, **hub_options(config)).eval()
              for n, p in names.items()}
    for m in models.values():
        m.requires_grad_(False)
    return models


class Rollouts:
    """Samples for a step's prompts, drawn with the student's current weights, reused across the
    --updates-per-rollout steps that share them."""

    def __init__(self, student, tokenizer, prompts: list, config: DistillConfig, off_policy: list[Encoded]):
        self.student, self.tokenizer, self.config = student, tokenizer, config
        self.prompts = prompts
        self.ids = [truncate(tokenizer, prompt_ids(tokenizer, p, config.chat_template), [], config.max_length,
                             config.max_prompt_length)[0].prompt for p in prompts]
        self.off_policy = off_policy
        self.key, self.examples, self.stats = None, [], {}

    def examples_for(self, chunk: list[tuple[int, int]]) -> tuple[list[Encoded], dict]:
        key = tuple(chunk)
        if key != self.key:
            self.key = key
            self.examples, self.stats = self._sample(chunk)
        return self.examples, self.stats

    def _sample(self, chunk: list[tuple[int, int]]) -> tuple[list[Encoded], dict]:
        cfg = self.config
        picked = [i for _, i in chunk for _ in range(cfg.samples_per_prompt)]
        n_off = int(round(cfg.mix_off_policy * len(picked))) if self.off_policy else 0
        rng = random.Random(cfg.seed * 100_003 + chunk[0][0])
        on = picked[: len(picked) - n_off]
        self.student.eval()
        start = time.perf_counter()
        samples = generate(self.student, self.tokenizer, [self.prompts[i] for i in on], [self.ids[i] for i in on],
                           max_new_tokens=min(cfg.max_new_tokens, cfg.max_length - cfg.max_prompt_length),
                           temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(on),
                           seed=cfg.seed + chunk[0][0], desc="rollout")
        seconds = time.perf_counter() - start
        self.student.train()
        examples = [Encoded(s.prompt_ids, s.response_ids) for s in samples if s.response_ids]
        examples += [self.off_policy[j] for j in rng.sample(range(len(self.off_policy)), min(n_off, len(self.off_policy)))]
        tokens = sum(len(s.response_ids) for s in samples)
        return examples, {"rollout_tokens_per_s": tokens / max(seconds, 1e-9),
                          "response_length_mean": tokens / max(1, len(samples)),
                          "eos_rate": sum(s.finished for s in samples) / max(1, len(samples)),
                          "off_policy_sequences": n_off}


def rollout_steps(num_prompts: int, config: DistillConfig):
    """(rollout index, prompt index) lists: each rollout's prompts, repeated --updates-per-rollout times."""
    batch = max(1, config.batch_size // config.samples_per_prompt)
    rollouts = step_batches(list(range(num_prompts)), batch, config.epochs, config.seed,
                            -(-config.max_steps // config.updates_per_rollout) if config.max_steps else None)
    for r, prompts in enumerate(rollouts):
        for _ in range(config.updates_per_rollout):
            yield [(r, i) for i in prompts]


def at_rollout_boundaries(config: DistillConfig) -> DistillConfig:
    """config with --save-every rounded up to a multiple of --updates-per-rollout.

    A checkpoint taken inside a rollout could not be resumed exactly: the
    rollout's samples were drawn with weights the checkpoint no longer holds.
    """
    n = config.updates_per_rollout
    return dataclasses.replace(config, save_every=-(-config.save_every // n) * n)


def run(config: DistillConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    spec = on_policy_spec(config)
    tokenizer = load_tokenizer(config.student, **hub_options(config))
    teachers = load_teachers(config, spec, device, tokenizer)
    rows, data_stats = load_data(config, "prompts")
    rows, _ = encode_prompts(tokenizer, rows, config, data_stats)
    off_policy = []
    if config.mix_off_policy > 0:
        pair_rows, pair_stats = load_data(config, "pairs")
        off_policy, _ = encode_rows(tokenizer, pair_rows, "chosen", config, pair_stats)
    student = load_student(config.student, device, config)
    out = prepare_output(Path(config.out), "distill", config.force, checkpoint.scratch(config.resume))
    rollouts = Rollouts(student, tokenizer, [r["prompt"] for r in rows], config, off_policy)
    heads = teacher_heads(teachers)
    teacher_dtype = next(teachers["dpo"].parameters()).dtype
    vocab = len(tokenizer)
    pack = collate_for(enable_padding_free(student, config.padding_free, "distill (on-policy)"), MIN_PADDING)
    trained = {"tokens": 0}  # response tokens trained on by this process (a --resume counts from there)

    def loss_fn(chunk):
        examples, stats = rollouts.examples_for(chunk)
        start = time.perf_counter()
        batch = collate(examples, tokenizer.pad_token_id).to(device)
        fields = teacher_for_batch(teachers, heads, batch, spec, "hidden", vocab, teacher_dtype, host=False)
        # The teachers run padded; the student's packed row selects the same positions in the same order.
        loss, metrics = teacher_loss(student, pack(batch), fields, heads, "hidden", spec, vocab, config.chunk_size)
        tokens = int(batch.loss_mask.sum())
        if torch.is_grad_enabled():
            trained["tokens"] += tokens
        return loss, {**metrics, **stats, "train_tokens_per_s": tokens / max(time.perf_counter() - start, 1e-9)}

    per_epoch = -(-len(rows) // max(1, config.batch_size // config.samples_per_prompt))
    n_steps = min(per_epoch * config.epochs * config.updates_per_rollout, config.max_steps or 10**12)
    monitor = make_monitor(config, tokenizer, config.student, device)
    summary = train(student, rollout_steps(len(rows), config), n_steps, loss_fn, at_rollout_boundaries(config), out,
                    "distill (on-policy)", monitor)
    # Fresh rollouts of the trained student on the first prompts, keyed past every training rollout.
    probe = list(range(min(FINAL_KL_ROWS, len(rows))))
    chunks = [[(n_steps + 1 + s, i) for i in probe[s : s + config.batch_size]]
              for s in range(0, len(probe), config.batch_size)]
    final_kl = final_teacher_kl(student, loss_fn, chunks, config.precision, device)
    report_final_kl(out, summary["steps"], final_kl, trained["tokens"])
    save_model(student, tokenizer, out)
    inputs = {"student": input_record("model", config.student, fingerprint_model(config.student)),
              **{name: input_record("model", getattr(config, name), fingerprint_model(getattr(config, name)))
                 for name in teachers},
              "data": data_input(config)}
    finalize(out, "distill", config, inputs, {**summary, "mode": "on-policy", "final_kl_teacher": final_kl,
                                              "train_tokens": trained["tokens"], "data": data_stats})
    return out
