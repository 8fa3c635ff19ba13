"""Issue 10: the teacher is exact float32 under bf16 autocast, and the public loss API cannot
return garbage on raw logits over a padded vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil_cli.config.stages import PrecomputeConfig
from aligndistil_cli.core.errors import ConfigError
from aligndistil_cli.losses.functions import reverse_kl
from aligndistil_cli.losses.fused import fused_head_kl_loss
from aligndistil_cli.teacher.compose import TeacherSpec, encode_chunk, float32_heads, logq_fn
from bench.reference import aligndistil_loss

N, H, WIDTH, VOCAB = 64, 32, 520, 500  # 20 padded rows


def teacher_inputs(seed: int = 0):
    """Hidden states and heads whose logits have std about 12, with DPO and reverse DPO apart
    enough that alpha_t = 20 TVD_t + 1e-3 is around 2 to 6 (the regime the issue measured)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = {name: torch.randn(N, H, generator=gen) for name in ("dpo", "rev", "ref")}
    base = torch.randn(WIDTH, H, generator=gen) * (12 / math.sqrt(H))
    heads = {name: (base + torch.randn(WIDTH, H, generator=gen) * (1.5 / math.sqrt(H)), torch.randn(WIDTH, generator=gen))
             for name in ("dpo", "rev", "ref")}
    hidden["rev"] = hidden["dpo"] + 0.3 * torch.randn(N, H, generator=gen)
    return hidden, heads


def teacher_probs(fmt: str, spec: TeacherSpec, hidden, heads, autocast: bool,
                  device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher probabilities [N, VOCAB], alpha [N]) on the CPU, as precompute (encode_chunk) and
    distill's `hidden` rebuild (logq_fn) compute them on `device`, optionally inside the bf16
    autocast that training opens around every loss. On CUDA the bodies' bf16 hidden states are fed."""
    dev = torch.device(device)
    body = torch.bfloat16 if device == "cuda" else torch.float32
    used = {name: hidden[name].to(dev, body) for name in spec.models}
    on_dev = {name: tuple(t.to(dev) for t in head) for name, head in heads.items()}
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        fields = encode_chunk(fmt, used, float32_heads(on_dev), spec, VOCAB, torch.float32, top_k=8, host=False)
        if fmt == "hidden":
            logq = logq_fn("hidden", fields, float32_heads(on_dev), spec, VOCAB, dev)(0, N)
        else:
            logq = fields["teacher_logprobs"]
    return logq.float().exp().cpu(), fields["alpha"].cpu()


@pytest.mark.parametrize("fmt", ["logits", "hidden"])
@pytest.mark.parametrize("variant", ["aligndistil", "adaptive"])
def test_teacher_under_bf16_autocast_equals_float32(fmt, variant):
    hidden, heads = teacher_inputs()
    spec = TeacherSpec(variant, beta=0.1, kl_coef=0.1, alpha_scale=20.0, alpha_eps=1e-3, temperature=1.0)
    exact, alpha = teacher_probs(fmt, spec, hidden, heads, autocast=False)
    under_autocast, alpha_ac = teacher_probs(fmt, spec, hidden, heads, autocast=True)
    if variant == "aligndistil":  # the inputs are in the regime where bf16 rounding would show
        assert alpha.mean() > 1.5, alpha.mean()
    tvd = 0.5 * (exact - under_autocast).abs().sum(-1)
    assert tvd.max() < 1e-3, f"teacher moved by a TVD of up to {tvd.max():.4f} under bf16 autocast"
    torch.testing.assert_close(alpha_ac, alpha, rtol=1e-4, atol=1e-5)


def test_bf16_rounded_heads_would_move_the_teacher():
    """The check above can fail: composing from bf16-rounded logits moves this teacher visibly."""
    hidden, heads = teacher_inputs()
    spec = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)
    exact, _ = teacher_probs("logits", spec, hidden, heads, autocast=False)
    rounded = {name: (w.bfloat16().float(), b) for name, (w, b) in heads.items()}
    rounded_hidden = {name: h.bfloat16().float() for name, h in hidden.items()}
    with torch.no_grad():
        z = {name: torch.nn.functional.linear(rounded_hidden[name].bfloat16(), rounded[name][0][:VOCAB].bfloat16(),
                                              heads[name][1][:VOCAB].bfloat16()).float() for name in ("dpo", "rev")}
    p_dpo, p_rev = z["dpo"].softmax(-1), z["rev"].softmax(-1)
    alpha = 20 * 0.5 * (p_dpo - p_rev).abs().sum(-1, keepdim=True) + 1e-3
    moved = torch.softmax(z["dpo"] + alpha * (z["dpo"] - z["rev"]), -1)
    assert (0.5 * (exact - moved).abs().sum(-1)).mean() > 1e-3


def float64_reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """KL over the real rows only, in float64, written out from the definition."""
    s = student_logits[..., :vocab].double()
    log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - teacher_logprobs[..., :vocab].double())).sum(-1)


def padded_teacher(shape, vocab: int, width: int, gen) -> torch.Tensor:
    real = torch.log_softmax(torch.randn(*shape, vocab, generator=gen) * 3, dim=-1)
    return torch.cat([real, torch.full((*shape, width - vocab), float("-inf"))], dim=-1)


def test_reverse_kl_masks_raw_student_logits_on_padded_rows():
    gen = torch.Generator().manual_seed(1)
    vocab, width = 11, 16
    student = torch.randn(7, width, generator=gen) * 4  # raw logits: finite on the padded rows too
    student[:, vocab:] += 30  # and large there, where an unmasked softmax would put most of its mass
    teacher = padded_teacher((7,), vocab, width, gen)
    got = reverse_kl(student, teacher)
    torch.testing.assert_close(got.double(), float64_reverse_kl(student, teacher, vocab), rtol=1e-5, atol=1e-6)
    assert got.abs().max() < 50, "a clamp of -inf to finfo.min would give about 1e35"


def test_aligndistil_loss_on_raw_logits_against_float64():
    gen = torch.Generator().manual_seed(2)
    b, t, vocab, width = 3, 6, 9, 12
    student = (torch.randn(b, t, width, generator=gen) * 3).requires_grad_()
    teacher = padded_teacher((b, t), vocab, width, gen)
    coef = torch.rand(b, t, generator=gen) + 0.1
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = aligndistil_loss(student, teacher, coef, mask)
    kl = float64_reverse_kl(student.detach(), teacher, vocab)
    expected = sum((coef[i].double() * kl[i])[mask[i]].sum() / mask[i].sum() for i in range(b)) / b
    assert abs(loss.item() - expected.item()) < 1e-5
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and torch.all(grad[..., vocab:] == 0), "padded rows get no gradient"


def test_loss_is_zero_when_raw_student_equals_teacher_on_real_rows():
    gen = torch.Generator().manual_seed(3)
    vocab, width = 10, 13
    teacher = padded_teacher((2, 4), vocab, width, gen)
    student = torch.cat([teacher[..., :vocab] + 5.0, torch.randn(2, 4, width - vocab, generator=gen)], dim=-1)
    loss = aligndistil_loss(student, teacher, torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool))
    assert abs(loss.item()) < 1e-6


def test_student_mass_where_the_teacher_has_none_is_an_error():
    gen = torch.Generator().manual_seed(4)
    vocab, width = 8, 10
    teacher = padded_teacher((5,), vocab, width, gen)
    teacher[2, 3] = float("-inf")  # a real row, -inf at one position only: not a padded row
    with pytest.raises(ValueError, match="row 3 at position 2.*KL is infinite"):
        reverse_kl(torch.randn(5, width, generator=gen), teacher)


def test_fused_loss_refuses_a_teacher_with_no_mass_on_a_real_row():
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)
    teacher = torch.log_softmax(torch.randn(6, 9, generator=gen), -1)
    teacher[4, 1] = float("-inf")
    with pytest.raises(ValueError, match="KL is infinite"):
        fused_head_kl_loss(hidden, weight, None, torch.ones(6), lambda s, e: teacher[s:e], 9, 3)


def test_theorem1_needs_only_dpo_and_reference():
    assert TeacherSpec("theorem1", 0.1, 0.1, 20.0, 1e-3, 1.0).models == ("dpo", "ref")
    PrecomputeConfig(dpo="d", ref="r", data="x.jsonl", out="o", variant="theorem1")
    with pytest.raises(ConfigError, match="'rev' is required by teacher variant 'aligndistil'"):
        PrecomputeConfig(dpo="d", data="x.jsonl", out="o")
