"""Bias of the truncated (top-k) teacher against the exact one, at a real vocabulary size.

There is no pretrained model on this machine, so the teacher is synthetic but
shaped like a language model's next-token distribution: Zipf-like logits
(-s log rank, s in [1.2, 2.4] drawn per position so some positions are peaked and some flat)
over V = 151,936 ids in a random order. The student is the teacher plus noise.
For k = 16, 64, 256 it reports the relative error of the reverse-KL loss and
the cosine between the truncated and exact gradients w.r.t. the student logits,
through the same code distill uses (teacher.topk_fields, teacher.logq_fn).

    python -m bench.topk_bias [--positions 64] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import json

import torch

from aligndistil_cli.losses.functions import reverse_kl
from aligndistil_cli.teacher.compose import TeacherSpec, logq_fn, topk_fields

SPEC = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)


def synthetic_teacher(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(n)]).float() + 1
    s = 1.2 + 1.2 * torch.rand(n, 1, generator=gen)
    return torch.log_softmax(-s * ranks.log(), dim=-1)


def measure(n: int, vocab: int, ks: list[int], noise: float, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    teacher = synthetic_teacher(n, vocab, gen)
    student_logits = (teacher + noise * torch.randn(teacher.shape, generator=gen)).requires_grad_()
    exact = reverse_kl(student_logits, teacher).mean()
    (exact_grad,) = torch.autograd.grad(exact, student_logits)
    rows = []
    for k in ks:
        fields = topk_fields(teacher, k)
        logq = logq_fn("topk", fields, {}, SPEC, vocab, torch.device("cpu"))(0, n)
        loss = reverse_kl(student_logits, logq).mean()
        (grad,) = torch.autograd.grad(loss, student_logits)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0).item()
        tail = fields["log_tail"].exp().mean().item()
        rows.append({"k": k, "teacher_tail_mass": tail, "exact_loss": exact.item(), "topk_loss": loss.item(),
                     "relative_loss_error": abs(loss.item() - exact.item()) / exact.item(), "gradient_cosine": cosine})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--noise", type=float, default=1.0, help="std of the student's deviation from the teacher")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = measure(args.positions, args.vocab, [16, 64, 256], args.noise, args.seed)
    print("| k | mean teacher tail mass | relative loss error | gradient cosine |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['teacher_tail_mass']:.3f} | {r['relative_loss_error']:.3f} | {r['gradient_cosine']:.4f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
