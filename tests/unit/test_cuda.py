"""The CUDA / bf16 path. Skipped cleanly where there is no GPU (CI never has one)."""

from __future__ import annotations

import pytest
import torch

from aligndistil_cli.losses.fused import fused_head_kl_loss
from aligndistil_cli.model.loading import autocast
from bench.reference import compose_teacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_teacher_is_combined_in_float32_on_cuda():
    gen = torch.Generator().manual_seed(0)
    z_dpo, z_rev = (torch.randn(4, 7, 50, generator=gen).to(torch.bfloat16) for _ in range(2))
    gpu = compose_teacher(z_dpo.cuda(), z_rev.cuda(), vocab_size=45)
    cpu = compose_teacher(z_dpo.float(), z_rev.float(), vocab_size=45)
    assert gpu[0].dtype == torch.float32
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("fmt", ["logits", "hidden"])
def test_teacher_heads_under_cuda_autocast_equal_float32(fmt):
    """Issue 10 on the GPU: precompute's and distill's teacher from bf16 hidden states, inside
    the bf16 autocast of training, against the same hidden states composed in float32 on the CPU."""
    from test_teacher_precision import teacher_inputs, teacher_probs

    from aligndistil_cli.teacher.compose import TeacherSpec

    hidden, heads = teacher_inputs()
    hidden = {name: h.bfloat16().float() for name, h in hidden.items()}  # what a bf16 body hands over
    spec = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)
    exact, _ = teacher_probs(fmt, spec, hidden, heads, autocast=False)
    on_gpu, _ = teacher_probs(fmt, spec, hidden, heads, autocast=True, device="cuda")
    tvd = 0.5 * (exact - on_gpu).abs().sum(-1)
    print(f"teacher TVD, CUDA bf16 autocast vs float32 ({fmt}): mean {tvd.mean():.2e}, max {tvd.max():.2e}")
    assert tvd.max() < 1e-3


@cuda
def test_fused_loss_under_bf16_autocast_matches_float32():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 64, generator=gen).cuda().requires_grad_()
    weight = (torch.randn(1000, 64, generator=gen) * 0.125).cuda().requires_grad_()
    teacher = torch.log_softmax(torch.randn(300, 990, generator=gen), -1).cuda()
    w = torch.full((300,), 1 / 300, device="cuda")
    exact = fused_head_kl_loss(hidden, weight, None, w, lambda s, e: teacher[s:e], 990, 128)[0]
    with autocast("auto", torch.device("cuda")):
        mixed = fused_head_kl_loss(hidden, weight, None, w, lambda s, e: teacher[s:e], 990, 128)[0]
    mixed.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
    assert mixed.item() == pytest.approx(exact.item(), rel=2e-2)
