"""distill --mode on-policy: the student samples its own responses and live teachers teach them.

Each rollout samples responses from the current student for a batch of
prompts, runs the DPO and reverse-DPO models (and the reference where the
variant needs it) in inference mode on prompt + sample, and trains on the
same loss as off-policy distillation (teacher.objective.teacher_loss) with the teacher
built by precompute's own function, kept on the device.

Under torchrun the teachers are held whole on every rank, or sharded over
the ranks with --shard-teachers. Their forwards run in the loss, once per
micro-batch, and training.accumulate runs as many micro-batches on every rank
(padding ones included), so the ranks' teacher forwards pair up.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch

from aligndistil_cli.config.stages import DistillConfig
from aligndistil_cli.data.encode import (
    Encoded,
    collate,
    data_input,
    encode_prompts,
    encode_rows,
    load_data,
    truncate,
)
from aligndistil_cli.eval.monitor import make_monitor
from aligndistil_cli.model.loading import (
    autocast,
    bf16_enabled,
    hub_options,
    load_student,
    load_teacher,
    load_tokenizer,
    pick_device,
    save_model,
)
from aligndistil_cli.model.packing import MIN_PADDING, collate_for
from aligndistil_cli.model.packing import enable as enable_padding_free
from aligndistil_cli.model.sampling import generate
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.rundir.artifacts import fingerprint_model, input_record, prepare_output
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.teacher.compose import TeacherSpec, spec_overrides
from aligndistil_cli.teacher.live import check_same_tokenizers, teacher_for_batch, teacher_heads
from aligndistil_cli.teacher.objective import FINAL_KL_ROWS, final_teacher_kl, report_final_kl, teacher_loss
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.loop import seed_everything, step_batches, train


def on_policy_spec(config: DistillConfig, eos_id: int) -> TeacherSpec:
    """The live teacher: the paper's (r 20, eps 1e-3), with distill's own options over it."""
    paper = TeacherSpec(config.variant, config.beta, config.kl_coef, 20.0, 1e-3, config.teacher_temperature)
    return dataclasses.replace(paper, **spec_overrides(config, eos_id))


def load_teachers(config: DistillConfig, spec: TeacherSpec, device, student_tokenizer) -> dict:
    """The teacher models, in inference mode, bf16 where the precision says so; sharded with --shard-teachers."""
    paths = {"dpo": config.dpo, "rev": config.rev, "ref": config.ref}
    names = {name: paths[name] for name in spec.models}
    tokenizers = {f"{n} ({p})": load_tokenizer(p, **hub_options(config)) for n, p in names.items()}
    check_same_tokenizers({f"student ({config.student})": student_tokenizer, **tokenizers})
    dtype = torch.bfloat16 if bf16_enabled(config.precision, device) else torch.float32
    return {n: load_teacher(p, device, dtype, config.attn_implementation, config.shard_teachers, **hub_options(config))
            for n, p in names.items()}


class RolloutItem(NamedTuple):
    """One prompt of one rollout, with its place in the rollout, so that its samples and the off-policy
    mix are functions of the rollout and not of the micro-batch or rank that draws them."""

    rollout: int  # rollout index (the final-KL probe uses indices past every training rollout)
    prompt: int  # index into the prompts
    position: int  # place among the rollout's prompts
    size: int  # prompts in the rollout


def stream_index(item: RolloutItem, sample: int, num_prompts: int, samples_per_prompt: int) -> int:
    """The random stream (sampling.prompt_keys) of sample k of a rollout's prompt: unique over
    (rollout, prompt, sample), so a response is the same whichever rank or micro-batch draws it."""
    return (item.rollout * num_prompts + item.prompt) * samples_per_prompt + sample


def off_policy_plan(rollout: int, slots: int, rows: int, mix: float, seed: int) -> dict[int, int]:
    """{sample slot: off-policy row} for a rollout of `slots` samples (prompt position x samples_per_prompt + k).

    round(mix * slots) slots, at most one per row (no row twice), drawn from (seed, rollout) alone:
    every rank and micro-batch computes the same plan and takes the slots of its own prompts.
    """
    n = min(round(mix * slots), rows)
    rng = random.Random(seed * 100_003 + rollout)
    return dict(zip(rng.sample(range(slots), n), rng.sample(range(rows), n)))


class Rollouts:
    """Samples for a step's prompts, drawn with the student's current weights, reused across the
    --updates-per-rollout steps that share them.

    Each micro-batch is sampled once per rollout (train's weight function asks first, before
    any forward of the step, so every micro-batch of a step sees the same weights) and kept
    until the rollout changes. Under FSDP every decode step is a collective: ranks agree on
    each request whether anyone samples, and a rank with nothing to sample decodes one
    throwaway row, so the ranks' forwards pair up.
    """

    def __init__(self, student, tokenizer, prompts: list, ids: list[list[int]], config: DistillConfig,
                 off_policy: list[Encoded], device):
        self.student, self.tokenizer, self.config, self.device = student, tokenizer, config, device
        self.prompts = prompts
        self.ids = [truncate(tokenizer, i, [], config.max_length, config.max_prompt_length)[0].prompt for i in ids]
        self.off_policy = off_policy
        self.rollout, self.plan, self.cache = None, {}, {}

    def examples_for(self, chunk: list[RolloutItem]) -> tuple[list[Encoded], dict]:
        if chunk[0].rollout != self.rollout:
            cfg = self.config
            self.rollout, self.cache = chunk[0].rollout, {}
            self.plan = off_policy_plan(self.rollout, chunk[0].size * cfg.samples_per_prompt, len(self.off_policy),
                                        cfg.mix_off_policy, cfg.seed)
        key = tuple(chunk)
        missing = key not in self.cache
        synced = fsdp.is_sharded(self.student) and distributed.world_size() > 1
        if synced and distributed.all_reduce_max(float(missing)) and not missing:
            self._generate([(chunk[0].prompt, 0)])  # another rank samples: decode alongside it, discard
        if missing:
            self.cache[key] = self._sample(chunk, synced)
        return self.cache[key]

    def sequences(self, chunk: list[RolloutItem]) -> int:
        """The number of sequences the chunk's loss is a mean over (losses.position_weights): those with a response."""
        return sum(1 for e in self.examples_for(chunk)[0] if e.response)

    def _generate(self, rows: list[tuple[int, int]]) -> list:
        """One decode batch: a sample of each (prompt index, stream index) with the student's current weights."""
        cfg = self.config
        self.student.eval()
        with autocast(cfg.precision, self.device):
            samples = generate(self.student, self.tokenizer, [self.prompts[i] for i, _ in rows],
                               [self.ids[i] for i, _ in rows],
                               max_new_tokens=min(cfg.max_new_tokens, cfg.max_length - cfg.max_prompt_length),
                               temperature=cfg.temperature, top_p=cfg.top_p, batch_size=max(1, len(rows)),
                               seed=cfg.seed, indices=[k for _, k in rows], desc="rollout", kv_cache=cfg.kv_cache,
                               device=self.device)
        self.student.train()
        return samples

    def _sample(self, chunk: list[RolloutItem], synced: bool) -> tuple[list[Encoded], dict]:
        k_max = self.config.samples_per_prompt
        on, off = [], []
        for item in chunk:
            for k in range(k_max):
                row = self.plan.get(item.position * k_max + k)
                if row is None:
                    on.append((item.prompt, stream_index(item, k, len(self.prompts), k_max)))
                else:
                    off.append(self.off_policy[row])
        start = time.perf_counter()
        samples = self._generate(on) if on else []
        if synced and not on:  # every slot is off-policy, but the other ranks' decode batches need a partner
            self._generate([(chunk[0].prompt, 0)])
        seconds = time.perf_counter() - start
        examples = [Encoded(s.prompt_ids, s.response_ids) for s in samples if s.response_ids] + off
        tokens = sum(len(s.response_ids) for s in samples)
        # (mean, count) pairs: training.accumulate averages them over the step's samples, whatever the split.
        return examples, {"rollout_tokens_per_s": tokens / max(seconds, 1e-9),
                          "response_length_mean": (tokens / max(1, len(samples)), len(samples)),
                          "eos_rate": (sum(s.finished for s in samples) / max(1, len(samples)), len(samples)),
                          "off_policy_sequences": len(self.plan)}


def rollout_steps(num_prompts: int, config: DistillConfig):
    """Lists of RolloutItem: each rollout's prompts, repeated --updates-per-rollout times."""
    batch = max(1, config.batch_size // config.samples_per_prompt)
    rollouts = step_batches(list(range(num_prompts)), batch, config.epochs, config.seed,
                            -(-config.max_steps // config.updates_per_rollout) if config.max_steps else None)
    for r, prompts in enumerate(rollouts):
        items = [RolloutItem(r, i, p, len(prompts)) for p, i in enumerate(prompts)]
        for _ in range(config.updates_per_rollout):
            yield items


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
    tokenizer = load_tokenizer(config.student, **hub_options(config))
    spec = on_policy_spec(config, tokenizer.eos_token_id)
    teachers = load_teachers(config, spec, device, tokenizer)
    rows, data_stats = load_data(config, "prompts")
    rows, ids = encode_prompts(tokenizer, rows, config, data_stats)
    off_policy = []
    if config.mix_off_policy > 0:
        pair_rows, pair_stats = load_data(config, "pairs")
        off_policy, _ = encode_rows(tokenizer, pair_rows, "chosen", config, pair_stats)
    student = load_student(config.student, device, config)
    out = prepare_output(Path(config.out), "distill", config.force, checkpoint.scratch(config.resume))
    rollouts = Rollouts(student, tokenizer, [r["prompt"] for r in rows], ids, config, off_policy, device)
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
                    "distill (on-policy)", monitor, weight=rollouts.sequences)
    # Fresh rollouts of the trained student on the first prompts, keyed past every training rollout.
    probe = list(range(min(FINAL_KL_ROWS, len(rows))))
    parts = [probe[s : s + config.batch_size] for s in range(0, len(probe), config.batch_size)]
    chunks = [[RolloutItem(n_steps + 1 + s, i, p, len(part)) for p, i in enumerate(part)] for s, part in enumerate(parts)]
    final_kl = final_teacher_kl(student, loss_fn, chunks, config.precision, device)
    # Held after the last forward (a sharded teacher's gathered layers are freed again); rank 0's, in the manifest.
    teacher_bytes = sum(fsdp.local_bytes(m) for m in teachers.values())
    report_final_kl(out, summary["steps"], final_kl, trained["tokens"])
    save_model(student, tokenizer, out)
    inputs = {"student": input_record("model", config.student, fingerprint_model(config.student)),
              **{name: input_record("model", getattr(config, name), fingerprint_model(getattr(config, name)))
                 for name in teachers},
              "data": data_input(config)}
    finalize(out, "distill", config, inputs, {**summary, "mode": "on-policy", "final_kl_teacher": final_kl,
                                              "train_tokens": trained["tokens"], "data": data_stats,
                                              "teacher_param_bytes_per_rank": teacher_bytes})
    return out
