"""Live teachers: their output heads, the per-position teacher tensors of a batch, and the check that they
share one tokenizer. precompute stores what these compute; on-policy distillation uses it at once."""

from __future__ import annotations

import torch

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.model.loading import output_head, response_hidden
from aligndistil_cli.parallel import fsdp
from aligndistil_cli.rundir.artifacts import fingerprint_tokenizer, tokenizer_difference, tokenizer_parts
from aligndistil_cli.teacher.compose import TeacherSpec, encode_chunk, float32_heads

POSITION_CHUNK = 1024


def check_same_tokenizers(named: dict[str, object]) -> dict:
    """All models must share one tokenizer; return its record or name the odd one out and how it differs."""
    parts = {name: tokenizer_parts(tok) for name, tok in named.items()}
    first_name, first = next(iter(parts.items()))
    for name, p in parts.items():
        if p != first:
            raise UserError(f"tokenizer of {name} differs from that of {first_name} in: "
                            f"{tokenizer_difference(first, p)}; all models must share one tokenizer")
    return {"kind": "tokenizer", "fingerprint": fingerprint_tokenizer(next(iter(named.values()))), "parts": first}


@torch.no_grad()
def teacher_heads(models: dict) -> dict:
    """Each teacher's output head, whole and in float32, gathered (a sharded teacher's) and converted once per run
    rather than once per batch. Every rank calls it: gathering a sharded head is a collective."""
    return float32_heads({name: tuple(fsdp.full(t) for t in output_head(m)) for name, m in models.items()})


@torch.no_grad()
def teacher_for_batch(models: dict, heads: dict, batch, spec: TeacherSpec, fmt: str, vocab: int,
                      store: torch.dtype, top_k: int = 64, host: bool = True) -> dict[str, torch.Tensor]:
    """The teacher's per-position tensors for the batch's response positions, chunk by chunk.

    heads: teacher_heads(models). precompute writes the result to shards; on-policy distillation
    (host=False) uses it at once.
    """
    # Through each teacher's root forward: a sharded teacher's embedding and final norm are gathered only there.
    hidden = {name: fsdp.redirect(m, response_hidden, m, batch) for name, m in models.items()}
    n = next(iter(hidden.values())).shape[0]
    parts = [encode_chunk(fmt, {k: h[s : s + POSITION_CHUNK] for k, h in hidden.items()}, heads, spec, vocab, store,
                          top_k, host)
             for s in range(0, n, POSITION_CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
