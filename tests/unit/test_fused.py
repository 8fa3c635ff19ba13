"""fused_head_kl_loss against the unchunked loss written out in full, values and gradients."""

from __future__ import annotations

import pytest
import torch

from aligndistil_cli.losses.fused import fused_head_kl_loss


def explicit_loss(hidden, weight, bias, teacher, weights, vocab):
    """sum_n w_n sum_v p_nv (log p_nv - log q_nv) over real tokens, from scratch."""
    logits = hidden @ weight[:vocab].T + bias[:vocab]
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return (weights * (log_p.exp() * (log_p - teacher[:, :vocab])).sum(-1)).sum()


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
def test_fused_equals_unchunked(chunk):
    gen = torch.Generator().manual_seed(chunk)
    n, h, width, vocab = 10, 6, 13, 11  # two padded rows
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(width, h, generator=gen, requires_grad=True)
    bias = torch.randn(width, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=gen), -1)
    weights = torch.rand(n, generator=gen)
    expected = explicit_loss(hidden, weight, bias, teacher, weights, vocab)
    grads = torch.autograd.grad(expected, (hidden, weight, bias))
    loss, kl = fused_head_kl_loss(hidden, weight, bias, weights, lambda s, e: teacher[s:e], vocab, chunk)
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for g, e in zip(got, grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1][vocab:] == 0) and torch.all(got[2][vocab:] == 0), "padded rows get no gradient"
    assert not kl.requires_grad and torch.all(kl >= -1e-6)


def test_zero_when_student_equals_teacher_and_teacher_is_untouched():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 4, generator=gen), torch.randn(9, 4, generator=gen)
    teacher = torch.log_softmax(hidden @ weight.T, -1)
    before = teacher.clone()
    loss, kl = fused_head_kl_loss(hidden, weight, None, torch.ones(5), lambda s, e: teacher[s:e], None, 2)
    assert abs(loss.item()) < 1e-6 and torch.all(kl.abs() < 1e-6)
    assert torch.equal(teacher, before), "the teacher (a view of the cache) is never written to"


def test_rejects_bad_chunk():
    with pytest.raises(ValueError):
        fused_head_kl_loss(torch.zeros(2, 2), torch.zeros(3, 2), None, torch.ones(2), lambda s, e: None, None, 0)
