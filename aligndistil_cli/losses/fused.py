"""The output head applied chunk by chunk, fused with the loss that reads it: no [N, V] float32 tensor.

The distillation KL (fused_head_kl_loss) and the per-token log-probs of DPO and its relatives
(fused_token_logps, and fused_token_logps_kl with TDPO's per-token KL to a reference) compute
the head's logits one chunk of positions at a time, in float32, and write the gradient of the
hidden states and the head's weights in the same pass. Shapes: N = selected positions,
V = logit width (may include padded rows), H = hidden size, G = groups (sequences).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from aligndistil_cli.losses.functions import mask_padded_vocab


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
