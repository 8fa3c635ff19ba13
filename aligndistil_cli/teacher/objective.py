"""The distillation objective of both modes: the per-position AlignDistil loss against a teacher given as
cache fields (read from a cache, or computed live), and the student's final KL to its teacher."""

from __future__ import annotations

from pathlib import Path

import torch

from aligndistil_cli.core.console import say
from aligndistil_cli.losses.fused import fused_head_kl_loss, position_weights
from aligndistil_cli.model.loading import autocast, num_sequences, output_head, response_hidden, sequence_ids
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.parallel.distributed import rank_micro_batches
from aligndistil_cli.rundir.artifacts import json_line
from aligndistil_cli.teacher.compose import TeacherSpec, logq_fn


def teacher_loss(model, batch, fields: dict, heads: dict, fmt: str, spec: TeacherSpec, vocab: int,
                 chunk_size: int) -> tuple[torch.Tensor, dict]:
    """The AlignDistil loss of a batch against a teacher given as per-position fields.

    The one loss path of both modes: off-policy reads the fields from the
    cache, on-policy computes them live (teacher.live.teacher_for_batch).
    """
    device = batch.input_ids.device
    weight, bias = output_head(model)
    weights = position_weights(fields["coef"].to(device), sequence_ids(batch), num_sequences(batch))
    loss, kl = fused_head_kl_loss(response_hidden(model, batch), weight, bias, weights,
                                  logq_fn(fmt, fields, heads, spec, vocab, device), vocab, chunk_size)
    # Means over positions, so (mean, count) pairs: training.accumulate averages them over the global batch.
    n = kl.shape[0]
    return loss, {"kl_teacher": (kl.mean().item(), n), "alpha_mean": (fields["alpha"].mean().item(), n),
                  "coef_mean": (fields["coef"].mean().item(), n), "tvd_mean": (fields["tvd"].mean().item(), n)}


# Rows (off-policy) or prompts (on-policy) the final KL to the teacher is measured on.
FINAL_KL_ROWS = 256


@torch.no_grad()
def final_teacher_kl(model, loss_fn, chunks: list, precision: str, device) -> float:
    """Mean per-token KL(student || teacher) of the trained student over chunks, without an update.

    loss_fn reports kl_teacher as (mean over the chunk's positions, positions): each chunk is
    weighted by its positions, so the result is the mean over tokens, not over batches. Under
    torchrun each rank measures its share of every chunk (the same number of forwards on every
    rank, as in training) and the sums are reduced over ranks.
    """
    model.eval()
    total, count = 0.0, 0.0
    for chunk in chunks:
        for micro, live in rank_micro_batches(chunk, 1):
            with autocast(precision, device):
                _, metrics = fsdp.redirect(model, loss_fn, micro)
            mean, n = metrics["kl_teacher"]
            total += mean * n * live
            count += n * live
    total, count = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1)


def report_final_kl(out: Path, step: int, kl: float, tokens: int) -> None:
    """Append the final KL to metrics.jsonl (a last record at the last step) and print it (rank 0, which writes)."""
    if not distributed.is_main():
        return
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json_line({"step": step, "final_kl_teacher": kl}))
    say(f"distill: final KL to the teacher {kl:.4f} nats/token (trained on {tokens:,} tokens)")
