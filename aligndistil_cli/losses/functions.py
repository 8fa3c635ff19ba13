"""Losses of AlignDistil (Zhang et al., ACL 2025, arXiv 2503.02832) and DPO.

Every function here is pure: tensors in, tensors out, no model and no I/O.
Shapes use B = batch, T = sequence length, N = number of selected positions,
V = logit width (may include padded rows), H = hidden size.

All teacher arithmetic runs in float32 whatever the input dtype: the official
code combines bf16 logits and then multiplies them by alpha up to 20, which
amplifies bf16 rounding error twentyfold.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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


def position_weights(coef: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Weights [N] realising mean_b (1/n_b) sum_t c_t (.) over selected positions.

    coef [N] per-position coefficients, seq_ids [N] the sequence of each
    position (0..num_seqs-1). Sequences with no position are left out of the
    mean instead of dividing by zero.
    """
    counts = torch.zeros(num_seqs, dtype=torch.float32, device=coef.device)
    counts = counts.index_add(0, seq_ids, torch.ones_like(coef, dtype=torch.float32))
    present = (counts > 0).sum().clamp(min=1)
    return coef.float() / counts[seq_ids] / present






def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int | None) -> torch.Tensor:
    """Output head on selected positions: [N, H] x [V, H] -> [N, V] float32, padded rows -inf."""
    logits = F.linear(hidden, weight, bias).float()
    return mask_padded_vocab(logits, vocab_size)






class _FusedHeadKL(torch.autograd.Function):
    """sum_n w_n KL(softmax(h_n W^T + b) || q_n), with its gradient computed in the forward pass.

    Each chunk's student logits, teacher log-probs and dKL/dz = p (log p - log q - KL)
    live only while that chunk is processed; the gradients w.r.t. hidden,
    weight and bias are accumulated on the way. Backward only scales them, so
    nothing is recomputed (unlike checkpointing, which runs the head and the
    teacher twice).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, position_weights, teacher_fn, vocab_size, chunk_size):
        needs = ctx.needs_input_grad
        vocab = vocab_size or weight.shape[0]
        # Padded rows get probability 0 and gradient 0: leaving them out of every
        # block is the same as masking them to -inf, and keeps NaNs out.
        w_real = weight[:vocab]
        b_real = bias[:vocab] if bias is not None else None
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None
        kl_all = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # One flag for the whole pass rather than a host sync per chunk.
        no_mass = torch.zeros((), dtype=torch.bool, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            e = min(s + chunk_size, hidden.shape[0])
            h = hidden[s:e]
            # In place where possible: at most about three [chunk, vocab] float32 blocks are alive.
            log_p = torch.log_softmax(F.linear(h, w_real, b_real).float(), dim=-1)
            log_q = teacher_fn(s, e)[:, :vocab].to(device=h.device, dtype=torch.float32)
            no_mass |= torch.isneginf(log_q).any()
            # A new tensor, never in place: teacher_fn may return a view of the cache.
            diff = log_p - log_q
            del log_q
            p = log_p.exp_()
            kl = torch.linalg.vecdot(p, diff)
            kl_all[s:e] = kl
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # dKL/dz = p (log p - log q - KL), scaled by the position weight, built in diff's storage.
            grad_z = diff.sub_(kl.unsqueeze(-1)).mul_(p).mul_(position_weights[s:e].float().unsqueeze(-1))
            del p
            if grad_h is not None:
                grad_h[s:e] = grad_z @ w_real.float()
            if grad_w is not None:  # addmm_ accumulates in place: no [V, H] temporary
                grad_w[:vocab].addmm_(grad_z.T, h.float())
            if grad_b is not None:
                grad_b[:vocab] += grad_z.sum(0)
        if no_mass:
            raise ValueError("the teacher gives zero probability (log-prob -inf) to a real vocabulary row, where the "
                             "student's softmax has mass: the KL is infinite")
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(kl_all)
        return (position_weights.float() * kl_all).sum(), kl_all

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl):
        grads = []
        for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3]):
            # In place: a second [V, H] float32 buffer would be the largest allocation of the step.
            grads.append(g.mul_(grad_loss).to(dtype) if needed else None)
        return (*grads, None, None, None, None)


def fused_head_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    position_weights: torch.Tensor,
    teacher_fn: Callable[[int, int], torch.Tensor],
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted reverse-KL distillation loss straight from student hidden states.

    hidden [N, H] at response positions, weight [V, H], bias [V] or None,
    position_weights [N] (from position_weights()), teacher_fn(start, end) ->
    teacher log-probs [end - start, V'] (V' <= V; the rest are padded rows).
    Returns (loss scalar = sum_n w_n KL_n, kl [N] detached). Peak extra memory
    is a few [chunk_size, V] float32 blocks; the teacher is built once per chunk.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return _FusedHeadKL.apply(hidden, weight, bias, position_weights, teacher_fn, vocab_size, chunk_size)


def _group_runs(groups: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, group) of each run of equal ids in groups [N] (one host sync per call)."""
    n = groups.shape[0]
    if n == 0:
        return []
    starts = [0] + (torch.nonzero(groups[1:] != groups[:-1]).flatten() + 1).tolist()
    ids = groups[starts].tolist()
    return [(s, e, g) for s, e, g in zip(starts, starts[1:] + [n], ids)]


def _head_compute_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run the head's matmuls in, cast once per call instead of once per chunk."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _reference_kl(log_q: torch.Tensor, z: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [n, V], KL(q || p) [n]) of one chunk: the reference's log-probs log_q [n, V] and the policy's logits z
    [n, V] with their logsumexp lse [n, 1], all float32 (p = softmax(z))."""
    q = log_q.exp()
    # A new tensor, never in place: the caller's log_q may be a view of its own. 0 where q is 0, so that a
    # row the reference rules out adds 0, not 0 * inf = NaN.
    diff = (log_q - z).add_(lse).masked_fill_(q == 0, 0.0)
    return q, torch.linalg.vecdot(q, diff)


class _FusedTokenLogps(torch.autograd.Function):
    """sum_n c_n log softmax(h_n W^T + b)[t_n] (+ d_n KL(q_n || p_n)) per group, with its gradient computed in the
    forward pass.

    The gradient of log p_n(t_n) with respect to the logits is onehot(t_n) - p_n, and that of
    KL(q_n || p_n) = sum_v q_n (log q_n - log p_n) is p_n - q_n. Each chunk's
    logits become that gradient in place and are multiplied into the gradients w.r.t. hidden,
    weight and bias at once; backward only scales the results by the groups' upstream gradients,
    so the head runs once forward and twice backward (checkpointing runs it twice forward). The
    weight gradient needs one [V, H] accumulator per group, because a group's upstream gradient
    is only known after every group is summed (DPO: it depends on the whole pair's margin).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, groups, coefs, num_groups, vocab_size, chunk_size, ref_logprobs,
                kl_coefs):
        needs = ctx.needs_input_grad
        vocab = vocab_size or weight.shape[0]
        n = hidden.shape[0]
        dtype = _head_compute_dtype(hidden.device)
        # Padded rows have probability 0 and gradient 0: leaving them out of every block is the same as
        # masking them to -inf.
        w_real = weight[:vocab] if dtype is None else weight[:vocab].to(dtype)
        b_real = None if bias is None else (bias[:vocab] if dtype is None else bias[:vocab].to(dtype))
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if needs[0] else None
        acc_w = weight.new_zeros((num_groups,) + weight.shape, dtype=torch.float32) if needs[1] else None
        acc_b = bias.new_zeros((num_groups,) + bias.shape, dtype=torch.float32) if bias is not None and needs[2] else None
        any_grad = needs[0] or needs[1] or (bias is not None and needs[2])
        runs = _group_runs(groups) if acc_w is not None or acc_b is not None else []
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kl = torch.zeros(n if ref_logprobs is not None else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e] if dtype is None else hidden[s:e].to(dtype)
            tgt = targets[s:e].unsqueeze(1)
            z = F.linear(h, w_real, b_real).float()
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            logps[s:e] = (z.gather(1, tgt) - lse).squeeze(1)
            q = None
            if ref_logprobs is not None:
                q, kl[s:e] = _reference_kl(ref_logprobs(s, e)[:, :vocab].to(device=z.device, dtype=torch.float32), z, lse)
            if not any_grad:
                continue
            # c_n (onehot(t_n) - p_n) [+ d_n (p_n - q_n)], built in the logits' storage.
            c = coefs[s:e].float().unsqueeze(1)
            p = z.sub_(lse).exp_()
            if q is None:
                grad_z = p.mul_(-c).scatter_add_(1, tgt, c)
            else:
                d = kl_coefs[s:e].float().unsqueeze(1)
                grad_z = p.mul_(d - c).addcmul_(q, d, value=-1.0).scatter_add_(1, tgt, c)
                del q
            if grad_h is not None:
                grad_h[s:e] = grad_z @ w_real.float() if dtype is None else (grad_z.to(dtype) @ w_real).float()
            for rs, re_, g in runs:
                lo, hi = max(rs, s), min(re_, e)
                if lo >= hi:
                    continue
                if acc_w is not None:  # addmm_ accumulates in place: no [V, H] temporary
                    acc_w[g, :vocab].addmm_(grad_z[lo - s : hi - s].T, hidden[lo:hi].float())
                if acc_b is not None:
                    acc_b[g, :vocab] += grad_z[lo - s : hi - s].sum(0)
        sums = torch.zeros(num_groups, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, groups, logps * coefs.float())
        if ref_logprobs is not None:
            sums.index_add_(0, groups, kl * kl_coefs.float())
        empty = torch.empty(0)
        ctx.save_for_backward(*(t if t is not None else empty for t in (grad_h, acc_w, acc_b, groups)))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.used = False
        ctx.mark_non_differentiable(logps, kl)
        return sums, logps, kl

    @staticmethod
    def backward(ctx, grad_sums, _grad_logps, _grad_kl):
        if ctx.used:
            raise RuntimeError("fused_token_logps: backward through the same call twice is not supported "
                               "(its gradients are scaled in place)")
        ctx.used = True
        grad_h, acc_w, acc_b, groups = ctx.saved_tensors
        u = grad_sums.float()
        needs = ctx.needs_input_grad
        out_h = out_w = out_b = None
        if needs[0]:
            # In place: a second [N, H] float32 buffer is not needed.
            out_h = grad_h.mul_(u[groups].unsqueeze(1)).to(ctx.dtypes[0])
        if needs[1]:
            out_w = (acc_w[0].mul_(u[0]) if acc_w.shape[0] == 1 else torch.einsum("g,g...->...", u, acc_w))
            out_w = out_w.to(ctx.dtypes[1])
        if needs[2] and ctx.dtypes[2] is not None:
            out_b = torch.einsum("g,g...->...", u, acc_b).to(ctx.dtypes[2])
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None


def fused_token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    coefs: torch.Tensor | None = None,
    num_groups: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped sums of target log-probs straight from hidden states, in one pass over the head.

    hidden [N, H] at the positions that predict a token, targets [N], weight [V, H], bias [V] or
    None; groups [N] in 0..G-1 (default: all 0, G = 1) and coefs [N] (default 1). Returns
    (sums [G] float32 with sums[g] = sum_{n: groups[n] = g} coefs[n] log pi(targets[n] | h_n),
    differentiable; logps [N] float32, detached). Rows >= vocab_size are padding: probability 0.

    Peak extra memory is a few [chunk_size, V] float32 blocks, [N, H] and, when the weight needs a
    gradient, G [V, H] float32 accumulators: give G as small as the loss allows (SFT: 1 group;
    DPO: 1 group per pair, chosen +1 and rejected -1). Backward may run once per call.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if groups is None:
        groups = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        num_groups = 1
    elif num_groups is None:
        raise ValueError("fused_token_logps: num_groups is required with groups")
    if coefs is None:
        coefs = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if not torch.is_grad_enabled():
        # A Function's forward sees its inputs' requires_grad even under no_grad: detached, a trained model's
        # reference pass builds no gradients ([G, V, H] accumulators, 262 MB for 16 sequences of a 4M-parameter head).
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    sums, logps, _ = _FusedTokenLogps.apply(hidden, weight, bias, targets, groups, coefs, num_groups, vocab_size,
                                            chunk_size, None, None)
    return sums, logps


def fused_token_logps_kl(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_logprobs: Callable[[int, int], torch.Tensor],
    groups: torch.Tensor,
    coefs: torch.Tensor,
    kl_coefs: torch.Tensor,
    num_groups: int,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_token_logps with a per-position KL(q_n || p_n) to a reference in the same pass (TDPO).

    As fused_token_logps, plus ref_logprobs(start, end) -> the reference's log-probs q
    [end - start, V'] (V' >= vocab_size; only the first vocab_size rows are read) at those positions
    and kl_coefs [N]. Returns (sums [G] with sums[g] = sum_{n in g} coefs[n] log p_n(t_n) +
    kl_coefs[n] KL(q_n || p_n), differentiable with respect to the policy; logps [N] and kl [N]
    float32, detached), KL over the real vocabulary. The reference is built one chunk at a time
    (a few [chunk_size, V] float32 blocks): no [N, V] tensor of either model.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return _FusedTokenLogps.apply(hidden, weight, bias, targets, groups, coefs, num_groups, vocab_size, chunk_size,
                                  ref_logprobs, kl_coefs)
