"""Losses of AlignDistil (Zhang et al., ACL 2025, arXiv 2503.02832) and DPO.

Every function here is pure: tensors in, tensors out, no model and no I/O.
Shapes use B = batch, T = sequence length, N = number of selected positions,
V = logit width (may include padded rows), H = hidden size.

All teacher arithmetic runs in float32 whatever the input dtype: the official
code combines bf16 logits and then multiplies them by alpha up to 20, which
amplifies bf16 rounding error twentyfold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from aligndistil_cli.core.variants import NEEDS_REFERENCE, VARIANTS


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO loss, mean over the batch.

    All inputs are [B] sequence log-probabilities summed over response tokens.
    L = -log sigmoid(beta * ((pc - rc) - (pr - rr))). Reverse DPO is this
    function called with chosen and rejected swapped.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin.float()).mean()


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Return logits [..., V] with rows >= vocab_size set to -inf (out of place).

    Models pad their embedding matrix (Qwen2.5: 151,936 rows for 151,665
    tokens); those rows are not tokens and must get zero probability.
    """
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    pad = logits.new_full(logits.shape[:-1] + (logits.shape[-1] - vocab_size,), float("-inf"))
    return torch.cat([logits[..., :vocab_size], pad], dim=-1)


def total_variation(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """TVD between softmax(logits_p) and softmax(logits_q): [..., V] -> [...], in [0, 1]."""
    p = torch.softmax(logits_p.float(), dim=-1)
    q = torch.softmax(logits_q.float(), dim=-1)
    return 0.5 * (p - q).abs().sum(dim=-1)


class Teacher(NamedTuple):
    """A composed teacher. logits/logprobs [..., V'] float32; alpha, coef, tvd [...]."""

    logits: torch.Tensor
    alpha: torch.Tensor
    coef: torch.Tensor
    tvd: torch.Tensor


class VariantSpec(NamedTuple):
    """How a teacher variant is built: TVD partner, alpha rule, logit combination."""

    tvd_against: str  # "rev" or "ref": alpha_t is built from TVD(pi_dpo, pi_<this>)
    adaptive_alpha: bool  # alpha_t = r * TVD_t + eps and c_t = beta / alpha_t; else alpha = beta / kl_coef, c_t = kl_coef
    extrapolate: bool  # z* = z_dpo + alpha (z_dpo - z_rev); else z* = alpha z_dpo + (1 - alpha) z_ref


VARIANT_SPECS = {
    "aligndistil": VariantSpec("rev", adaptive_alpha=True, extrapolate=True),
    "contrastive": VariantSpec("rev", adaptive_alpha=False, extrapolate=True),
    # theorem1's weight is fixed, so its TVD is only a diagnostic: measuring it against the
    # reference it already needs spares loading a reverse model it does not use.
    "theorem1": VariantSpec("ref", adaptive_alpha=False, extrapolate=False),
    "adaptive": VariantSpec("ref", adaptive_alpha=True, extrapolate=False),
}


def teacher_models(variant: str) -> tuple[str, ...]:
    """The models a variant's teacher is built from, among "dpo", "rev" and "ref"."""
    spec = VARIANT_SPECS[variant]
    needs_rev = spec.extrapolate or spec.tvd_against == "rev"
    needs_ref = not spec.extrapolate or spec.tvd_against == "ref"
    return ("dpo",) + (("rev",) if needs_rev else ()) + (("ref",) if needs_ref else ())


def teacher_alpha(variant: str, tvd: torch.Tensor, *, beta: float, kl_coef: float, alpha_scale: float,
                  alpha_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, c_t) [...] float32 from TVD_t [...].

    Separate from the logits so that a cache that stores TVD_t can serve
    other r and eps without running the models again.
    """
    tvd = tvd.float()
    if VARIANT_SPECS[variant].adaptive_alpha:
        alpha = alpha_scale * tvd + alpha_eps
        return alpha, beta / alpha
    return torch.full_like(tvd, beta / kl_coef), torch.full_like(tvd, kl_coef)


def combine_logits(variant: str, z_dpo: torch.Tensor, z_rev: torch.Tensor | None, z_ref: torch.Tensor | None,
                   alpha: torch.Tensor) -> torch.Tensor:
    """z* [..., V] float32 from the teachers' logits [..., V] and alpha_t [...]."""
    a = alpha.float().unsqueeze(-1)
    z_dpo = z_dpo.float()
    if VARIANT_SPECS[variant].extrapolate:
        return z_dpo + a * (z_dpo - z_rev.float())
    return a * z_dpo + (1.0 - a) * z_ref.float()


def compose_teacher_full(
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
) -> Teacher:
    """Compose the teacher and return its raw combined logits z*/tau too.

    Logits [..., V] (each model may pad differently; all are cut to
    vocab_size first, so padded rows never enter a softmax). Returns
    Teacher(logits [..., vocab_size] float32, alpha, coef, tvd [...]).
    """
    if variant not in VARIANT_SPECS:
        raise ValueError(f"unknown teacher variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in NEEDS_REFERENCE and ref_logits is None:
        raise ValueError(f"teacher variant {variant!r} needs ref_logits")
    if "rev" in teacher_models(variant) and rev_logits is None:
        raise ValueError(f"teacher variant {variant!r} needs rev_logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    width = vocab_size or dpo_logits.shape[-1]
    z_dpo = dpo_logits[..., :width].float()
    z_rev = rev_logits[..., :width].float() if rev_logits is not None else None
    z_ref = ref_logits[..., :width].float() if ref_logits is not None else None
    tvd = total_variation(z_dpo, z_ref if VARIANT_SPECS[variant].tvd_against == "ref" else z_rev)
    alpha, coef = teacher_alpha(variant, tvd, beta=beta, kl_coef=kl_coef, alpha_scale=alpha_scale, alpha_eps=alpha_eps)
    return Teacher(combine_logits(variant, z_dpo, z_rev, z_ref, alpha) / temperature, alpha, coef, tvd)






def reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) || teacher) per position: [N, V], [N, V] -> [N] float32.

    Vocabulary rows where the teacher is -inf at every position are padded rows
    (DESIGN.md section 1): the student is masked there itself, so raw model
    logits give the right loss. A student that puts mass where the teacher has
    none on any other row has an infinite KL: that raises ValueError instead of
    returning a number.
    """
    log_q = teacher_logprobs.float()
    no_mass = torch.isneginf(log_q)
    padded = no_mass.reshape(-1, no_mass.shape[-1]).all(dim=0)
    student = student_logits.float().masked_fill(padded, float("-inf"))
    conflict = no_mass & ~torch.isneginf(student)
    if conflict.any():
        pos, row = (int(i) for i in conflict.nonzero()[0])
        raise ValueError(f"the student gives probability to vocabulary row {row} at position {pos}, where the teacher "
                         f"has none ({int(conflict.sum())} such entries): the KL is infinite")
    log_p = torch.log_softmax(student, dim=-1)
    # where(), not the product alone: 0 * (-inf - -inf) would put NaN in the value and the gradient.
    diff = torch.where(no_mass, torch.zeros_like(log_p), log_p - log_q)
    return (log_p.exp() * diff).sum(dim=-1)




























