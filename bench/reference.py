"""Reference implementations that the tool itself does not use: the naive full-vocabulary teacher and losses.

They are the baseline bench.run times (what the official code computes) and the oracles the tests compare
the fused, chunked paths of aligndistil_cli.losses.functions against. Shapes as in aligndistil_cli.losses.functions."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from aligndistil_cli.losses.functions import compose_teacher_full, reverse_kl
from aligndistil_cli.losses.fused import head_logits, position_weights


def compose_teacher(
    dpo_logits: torch.Tensor,
    rev_logits: torch.Tensor | None,
    *,
    variant: str = "aligndistil",
    beta: float = 0.1,
    kl_coef: float = 0.1,
    alpha_scale: float = 20.0,
    alpha_eps: float = 1e-3,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AlignDistil teacher distribution per position (DESIGN.md section 1).

    dpo_logits, rev_logits, ref_logits: [..., V] at positions that predict a token.
    vocab_size: the tokenizer's real size; rows >= vocab_size get log-prob -inf.

    Variants (alpha_t = alpha_scale * TVD_t + alpha_eps, w = beta / kl_coef):
      aligndistil  z* = z_dpo + alpha_t (z_dpo - z_rev),  c_t = beta / alpha_t, TVD(dpo, rev)
      contrastive  z* = z_dpo + w (z_dpo - z_rev),        c_t = kl_coef
      theorem1     z* = w z_dpo + (1 - w) z_ref,          c_t = kl_coef
      adaptive     z* = alpha_t z_dpo + (1 - alpha_t) z_ref, c_t = beta / alpha_t, TVD(dpo, ref)

    Returns (teacher_logprobs [..., V] float32 = log_softmax(z*/temperature),
    coef [...] float32, tvd [...] float32: the TVD that alpha_t is built from).
    """
    teacher = compose_teacher_full(
        dpo_logits,
        rev_logits,
        variant=variant,
        beta=beta,
        kl_coef=kl_coef,
        alpha_scale=alpha_scale,
        alpha_eps=alpha_eps,
        ref_logits=ref_logits,
        temperature=temperature,
        vocab_size=vocab_size,
    )
    logprobs = mask_padded_vocab_width(torch.log_softmax(teacher.logits, dim=-1), dpo_logits.shape[-1])
    return logprobs, teacher.coef, teacher.tvd


def aligndistil_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    coef: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """AlignDistil loss: mean_b (1/n_b) sum_t c_t KL(pi_theta(.|x, y<t) || pi*_t).

    student_logits [B, T, V] (raw model logits: rows where the teacher is -inf
    at every selected position are padded rows and are masked here),
    teacher_logprobs [B, T, V], coef [B, T], mask [B, T] marking positions whose
    logits predict a response token (already shifted; the first response token and the EOS
    are in, prompt, padding and post-EOS positions are out). Returns a scalar.
    """
    sel = mask.bool()
    seq_ids = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(sel)[sel]
    kl = reverse_kl(student_logits[sel], teacher_logprobs[sel])
    return (position_weights(coef[sel], seq_ids, mask.shape[0]) * kl).sum()


def token_logps_from_hidden(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log pi(target) at selected positions, chunked: hidden [N, H], targets [N] -> [N] float32.

    Equivalent to log_softmax(hidden @ weight.T)[n, targets[n]] but never
    holds more than one [chunk_size, V] logit block.
    """

    def one_chunk(h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = head_logits(h, weight, bias, vocab_size)
        return logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    return chunked_map(one_chunk, chunk_size, hidden, targets)


def chunked_reverse_kl(
    hidden: torch.Tensor,
    teacher_fn: Callable[[int, int], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Reverse KL of the student head against a teacher, chunked: hidden [N, H] -> [N].

    teacher_fn(start, end) returns the teacher log-probs [end - start, V'] for
    those positions (V' <= V; missing columns are padded rows, -inf). It is
    called inside the chunk, so teacher blocks are built (or read) one chunk
    at a time as well.
    """
    width = weight.shape[0]
    index = torch.arange(hidden.shape[0], device=hidden.device)

    def one_chunk(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        start, end = int(idx[0]), int(idx[-1]) + 1
        teacher = mask_padded_vocab_width(teacher_fn(start, end).to(h.device).float(), width)
        return reverse_kl(head_logits(h, weight, bias, vocab_size), teacher)

    return chunked_map(one_chunk, chunk_size, hidden, index)


def mask_padded_vocab_width(logprobs: torch.Tensor, width: int) -> torch.Tensor:
    """Pad [..., v] to [..., width] with -inf (the padded rows' zero probability)."""
    missing = width - logprobs.shape[-1]
    if missing <= 0:
        return logprobs
    return torch.cat([logprobs, logprobs.new_full(logprobs.shape[:-1] + (missing,), float("-inf"))], dim=-1)


def chunked_map(fn: Callable[..., torch.Tensor], chunk_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply fn to row chunks of [N, ...] tensors and concatenate the [n] results.

    Each chunk runs under activation checkpointing when gradients are needed,
    so only one [chunk, V] block is alive at a time in forward and backward:
    peak extra memory is O(chunk_size x V), not O(N x V).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    n = tensors[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for start in range(0, n, chunk_size):
        parts = [t[start : start + chunk_size] for t in tensors]
        if needs_grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    if not outs:
        return tensors[0].new_zeros((0,), dtype=torch.float32)
    return torch.cat(outs)
