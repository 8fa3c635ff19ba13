"""Sampling straight from the composed teacher softmax(z*), the upper bound of distillation.

Each step runs every teacher model (DPO, reverse DPO, and the reference where
the variant needs it) on the newest token over its own KV cache, composes the
last positions' logits in float32 with teacher.compose (the one composition
that precompute and distillation use), and samples the next token. The log-prob
of each response under the teacher is summed on the way, so KL(teacher || ref)
is estimated from the teacher's own samples like any model's.
"""

from __future__ import annotations

import inspect

import torch

from .sampling import Sample, left_pad, split_generation
from .teacher import TeacherSpec, compose
from .training import progress


def nucleus(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] log-probs with everything outside the smallest set of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the strictly more likely tokens
    sorted_drop = before >= top_p
    drop = torch.zeros_like(sorted_drop).scatter(-1, order, sorted_drop)
    return logprobs.masked_fill(drop, float("-inf"))


def _cache_argument(model) -> str:
    """transformers >= 5.2x names the KV cache `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(models: dict, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, caches: dict) -> dict:
    """Each model's last-position logits [B, V] after feeding ids; caches are updated in place."""
    logits = {}
    for name, model in models.items():
        key = _cache_argument(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{key: caches.get(name)})
        caches[name] = out[key] if key in out else out.past_key_values
        logits[name] = out.logits[:, -1]
    return logits


@torch.no_grad()
def generate_teacher(models: dict, spec: TeacherSpec, tokenizer, prompts: list, prompt_ids: list[list[int]], *,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                     seed: int = 0, desc: str = "sample teacher") -> tuple[list[Sample], list[float]]:
    """One response per prompt sampled from softmax(z* / tau) (then / temperature, within top_p).

    models: name -> model for every name in spec.models. Returns the samples and each response's
    log-prob under the teacher softmax(z* / tau) itself, EOS included.
    """
    vocab = len(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(models["dpo"].parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[Sample] = []
    totals: list[float] = []
    with progress(desc, len(prompts)) as advance:
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_ids = prompts[start : start + batch_size], prompt_ids[start : start + batch_size]
            ids, mask = left_pad(chunk_ids, pad, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            draw = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            caches: dict = {}
            logits = _step(models, ids, mask, positions, caches)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            logp = torch.zeros(len(chunk), dtype=torch.float32, device=device)
            new = []
            for _ in range(max_new_tokens):
                teacher = torch.log_softmax(compose(logits, spec, vocab).logits, dim=-1)
                probs = torch.softmax(nucleus(torch.log_softmax(teacher / temperature, dim=-1), top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=draw).squeeze(-1)
                token = torch.where(done, torch.full_like(token, pad), token)
                logp += torch.where(done, 0.0, teacher.gather(-1, token.unsqueeze(-1)).squeeze(-1))
                new.append(token)
                done |= token == eos
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = positions[:, -1:] + 1
                logits = _step(models, token.unsqueeze(-1), mask, positions, caches)
            rows = torch.cat([ids, torch.stack(new, dim=1)], dim=1).tolist()
            for prompt, p_ids, row, total in zip(chunk, chunk_ids, rows, logp.tolist()):
                response, finished = split_generation(row, ids.shape[1], eos)
                samples.append(Sample(prompt, p_ids, response, tokenizer.decode(response, skip_special_tokens=True),
                                      finished))
                totals.append(total)
            advance(len(chunk))
    return samples, totals
