"""Sampling straight from the composed teacher softmax(z*), the upper bound of distillation.

The composed teacher is a sampling.Decoder: each step runs every teacher model
(DPO, reverse DPO, and the reference where the variant needs it) on the newest
token over its own KV cache and composes the last positions' logits in float32
with teacher.compose, the one composition that precompute and distillation use.
The decode loop, its per-prompt random streams and its top-p rule are
sampling.py's, so a teacher's samples are drawn exactly like a model's.
Each response's log-prob under the teacher is then computed teacher-forced
(precompute's own teacher_for_batch), so KL(teacher || ref) is estimated from
the teacher's own samples like any model's.
"""

from __future__ import annotations

import torch

from aligndistil_cli.data.encode import Encoded, collate
from aligndistil_cli.model.kv_cache import resolve as resolve_kv_cache
from aligndistil_cli.model.sampling import ModelDecoder, Sample, generate
from aligndistil_cli.teacher.compose import TeacherSpec, compose


class TeacherDecoder:
    """sampling.Decoder over softmax(z*/tau): one cache per teacher model (of kind kv_cache), logits composed
    in float32."""

    def __init__(self, models: dict, spec: TeacherSpec, vocab: int, kv_cache: str = "dynamic",
                 max_new_tokens: int | None = None):
        self.parts = {name: ModelDecoder(model, None, kv_cache, max_new_tokens) for name, model in models.items()}
        self.spec, self.vocab = spec, vocab

    def step(self, input_ids, attention_mask, position_ids, state):
        state = state or {}
        logits, caches = {}, {}
        for name, part in self.parts.items():
            logits[name], caches[name] = part.step(input_ids, attention_mask, position_ids, state.get(name))
        return torch.log_softmax(compose(logits, self.spec, self.vocab).logits, dim=-1), caches

    def select(self, state, rows):
        return {name: self.parts[name].select(cache, rows) for name, cache in state.items()}


@torch.no_grad()
def teacher_logps(models: dict, spec: TeacherSpec, samples: list[Sample], pad_id: int, vocab: int,
                  batch_size: int = 64) -> list[float]:
    """Each sample's response log-prob under softmax(z*/tau), EOS included, teacher-forced."""
    from aligndistil_cli.teacher.live import teacher_for_batch, teacher_heads

    device = next(models["dpo"].parameters()).device
    heads = teacher_heads(models)
    totals: list[float] = []
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        batch = collate([Encoded(s.prompt_ids, s.response_ids) for s in part], pad_id).to(device)
        fields = teacher_for_batch(models, heads, batch, spec, "logits", vocab, torch.float32, host=False)
        per_token = fields["teacher_logprobs"].gather(-1, batch.targets[batch.loss_mask].unsqueeze(-1)).squeeze(-1)
        rows = torch.arange(len(part), device=device).unsqueeze(1).expand_as(batch.loss_mask)[batch.loss_mask]
        totals += torch.zeros(len(part), device=device).index_add(0, rows, per_token.float()).tolist()
    return totals


@torch.no_grad()
def generate_teacher(models: dict, spec: TeacherSpec, tokenizer, prompts: list, prompt_ids: list[list[int]], *,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                     seed: int = 0, desc: str = "sample teacher",
                     kv_cache: str = "auto") -> tuple[list[Sample], list[float]]:
    """One response per prompt sampled from softmax(z* / tau) (then / temperature, within top_p).

    models: name -> model for every name in spec.models. Returns the samples and each response's
    log-prob under the teacher softmax(z* / tau) itself, EOS included.
    """
    vocab = len(tokenizer)
    samples = generate(models["dpo"], tokenizer, prompts, prompt_ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, desc=desc,
                       decoder=TeacherDecoder(models, spec, vocab, resolve_kv_cache(kv_cache), max_new_tokens))
    return samples, teacher_logps(models, spec, samples, tokenizer.pad_token_id, vocab, batch_size)
