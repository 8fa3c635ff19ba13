"""Unit tests for aligndistil_cli.losses.functions (DESIGN.md section 1).

Every expected value is computed independently of the code under test: with
python's math module on explicit numbers, from closed forms and invariants,
or from an explicit, unchunked torch computation written out in the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil_cli.losses.functions import VARIANTS, dpo_loss, mask_padded_vocab, reverse_kl, total_variation
from bench.reference import aligndistil_loss, chunked_map, chunked_reverse_kl, compose_teacher, token_logps_from_hidden

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Plain-python reference helpers (lists of floats, no torch)
# ---------------------------------------------------------------------------


def py_logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def py_log_softmax(xs):
    lse = py_logsumexp(xs)
    return [x - lse for x in xs]


def py_softmax(xs):
    return [math.exp(v) for v in py_log_softmax(xs)]


def py_tvd(a, b):
    pa, pb = py_softmax(a), py_softmax(b)
    return 0.5 * sum(abs(x - y) for x, y in zip(pa, pb))


def py_kl(student_logits, teacher_logprobs):
    """KL(softmax(student) || exp(teacher)) by an explicit loop over the vocabulary."""
    log_p = py_log_softmax(student_logits)
    total = 0.0
    for lp, lq in zip(log_p, teacher_logprobs):
        total += math.exp(lp) * (lp - lq)
    return total


def py_log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def py_teacher(variant, z_dpo, z_rev, z_ref, *, beta, kl_coef, alpha_scale, alpha_eps, temperature=1.0):
    """Hand reference for one position: returns (logprobs list, coef, tvd)."""
    if variant == "aligndistil":
        tvd = py_tvd(z_dpo, z_rev)
        alpha = alpha_scale * tvd + alpha_eps
        z = [d + alpha * (d - r) for d, r in zip(z_dpo, z_rev)]
        coef = beta / alpha
    elif variant == "contrastive":
        tvd = py_tvd(z_dpo, z_rev)
        w = beta / kl_coef
        z = [d + w * (d - r) for d, r in zip(z_dpo, z_rev)]
        coef = kl_coef
    elif variant == "theorem1":
        tvd = py_tvd(z_dpo, z_ref)  # a diagnostic only: w is fixed, and theorem1 needs no reverse model
        w = beta / kl_coef
        z = [w * d + (1.0 - w) * f for d, f in zip(z_dpo, z_ref)]
        coef = kl_coef
    elif variant == "adaptive":
        tvd = py_tvd(z_dpo, z_ref)
        alpha = alpha_scale * tvd + alpha_eps
        z = [alpha * d + (1.0 - alpha) * f for d, f in zip(z_dpo, z_ref)]
        coef = beta / alpha
    else:  # pragma: no cover
        raise AssertionError(variant)
    return py_log_softmax([v / temperature for v in z]), coef, tvd


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------
# 1. DPO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dpo_loss_is_ln2_when_policy_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b = 1 + seed * 3
    chosen = -50 * torch.rand(b, generator=g)
    rejected = -50 * torch.rand(b, generator=g)
    for beta in (0.1, 0.5, 2.0):
        loss = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
        assert loss.dtype == torch.float32
        assert loss.ndim == 0
        assert abs(loss.item() - math.log(2.0)) < 1e-6


def test_dpo_loss_hand_worked_example():
    # margin = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2; beta * margin = 1
    loss = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert abs(loss.item() - math.log1p(math.exp(-1.0))) < 1e-6


def test_dpo_loss_batch_mean_hand_worked():
    pc, pr, rc, rr = [-1.0, -10.0], [-3.0, -4.0], [-2.0, -8.0], [-2.0, -5.0]
    beta = 0.2
    expected = 0.0
    for i in range(2):
        m = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected += -py_log_sigmoid(beta * m)
    expected /= 2
    loss = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta)
    assert abs(loss.item() - expected) < 1e-6


def test_reverse_dpo_is_swap():
    # Swapping chosen and rejected (policy and reference alike) negates the margin:
    # -log sigmoid(-x) = log(1 + e^x), with x = beta * margin = 1 here.
    loss = dpo_loss(t([-3.0]), t([-1.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert abs(loss.item() - math.log1p(math.exp(1.0))) < 1e-6
    # Identity: L(x) - L(-x) = -x for a single pair.
    fwd = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert abs((fwd - loss).item() - (-1.0)) < 1e-6


def test_dpo_loss_gradient_sign_and_closed_form():
    pc = t([-1.0, -7.0], torch.float32).requires_grad_()
    pr = t([-3.0, -6.0], torch.float32).requires_grad_()
    rc, rr = t([-2.0, -6.5]), t([-2.0, -6.0])
    beta = 0.5
    loss = dpo_loss(pc, pr, rc, rr, beta=beta)
    loss.backward()
    assert (pc.grad < 0).all(), "raising the chosen log-prob must lower the loss"
    assert (pr.grad > 0).all(), "raising the rejected log-prob must raise the loss"
    # d/dpc [-log sigmoid(beta m)] / B = -beta * sigmoid(-beta m) / B
    for i, (a, b, c, d) in enumerate(zip([-1.0, -7.0], [-3.0, -6.0], [-2.0, -6.5], [-2.0, -6.0])):
        x = beta * ((a - c) - (b - d))
        sig_neg = 1.0 / (1.0 + math.exp(x))
        assert abs(pc.grad[i].item() - (-beta * sig_neg / 2)) < 1e-6
        assert abs(pr.grad[i].item() - (beta * sig_neg / 2)) < 1e-6
    # And a direct check: bumping pc lowers the value.
    with torch.no_grad():
        bumped = dpo_loss(pc + t([0.5, 0.5]), pr, rc, rr, beta=beta)
    assert bumped.item() < loss.item()


# ---------------------------------------------------------------------------
# 2. Teacher composition
# ---------------------------------------------------------------------------

Z_DPO = [2.0, 0.0, 0.0]
Z_REV = [0.0, 0.0, 2.0]
Z_REF = [1.0, 1.0, 1.0]


def test_hand_worked_tvd_value():
    # softmax([2,0,0]) = [e^2, 1, 1] / (e^2 + 2); the mirror for [0,0,2]
    e2 = math.exp(2.0)
    expected = (e2 - 1.0) / (e2 + 2.0)
    assert abs(py_tvd(Z_DPO, Z_REV) - expected) < 1e-12  # sanity of the helper itself
    got = total_variation(t([Z_DPO]), t([Z_REV]))
    assert got.shape == (1,)
    assert abs(got.item() - expected) < 1e-6


def test_aligndistil_teacher_fully_by_hand():
    # Written out without helpers, r = 20, eps = 1e-3, beta = 0.1 (defaults).
    e2 = math.exp(2.0)
    tvd = (e2 - 1.0) / (e2 + 2.0)
    alpha = 20.0 * tvd + 1e-3
    z = [2.0 + alpha * 2.0, 0.0, 0.0 - alpha * 2.0]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    expected = [v - lse for v in z]
    logprobs, coef, got_tvd = compose_teacher(t([Z_DPO]), t([Z_REV]))
    assert logprobs.shape == (1, 3)
    assert logprobs.dtype == torch.float32
    for v in range(3):
        assert abs(logprobs[0, v].item() - expected[v]) < 1e-5
    assert abs(coef.item() - 0.1 / alpha) < 1e-7
    assert abs(got_tvd.item() - tvd) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compose_teacher_variants_by_hand(variant, temperature):
    kw = dict(beta=0.1, kl_coef=0.05, alpha_scale=2.0, alpha_eps=0.01)
    # Two positions with different TVDs, so alpha must be applied per position.
    dpo = [Z_DPO, [0.5, -1.0, 0.25]]
    rev = [Z_REV, [0.5, -1.0, 0.25]]  # second position: dpo == rev -> TVD 0
    ref = [Z_REF, [-0.3, 0.8, 0.1]]
    logprobs, coef, tvd = compose_teacher(
        t(dpo), t(rev), ref_logits=t(ref), variant=variant, temperature=temperature, **kw
    )
    assert logprobs.shape == (2, 3) and coef.shape == (2,) and tvd.shape == (2,)
    assert logprobs.dtype == coef.dtype == tvd.dtype == torch.float32
    for pos in range(2):
        exp_lp, exp_coef, exp_tvd = py_teacher(variant, dpo[pos], rev[pos], ref[pos], temperature=temperature, **kw)
        for v in range(3):
            assert abs(logprobs[pos, v].item() - exp_lp[v]) < 1e-6, (pos, v)
        assert abs(coef[pos].item() - exp_coef) < 1e-6 * max(1.0, abs(exp_coef))
        assert abs(tvd[pos].item() - exp_tvd) < 1e-6
    # teacher is a distribution
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(2), atol=1e-6)


def test_compose_teacher_specific_values():
    # A few values fully written out, to pin the formulas independently of py_teacher.
    e2 = math.exp(2.0)
    # contrastive, w = beta/kl_coef = 2: z* = 3 z_dpo - 2 z_rev = [6, 0, -4]
    lp, coef, _ = compose_teacher(t([Z_DPO]), t([Z_REV]), variant="contrastive", beta=0.1, kl_coef=0.05)
    lse = math.log(math.exp(6) + 1 + math.exp(-4))
    assert torch.allclose(lp[0], t([6 - lse, -lse, -4 - lse]), atol=1e-6)
    assert abs(coef.item() - 0.05) < 1e-7
    # theorem1, w = 0.5: z* = 0.5 [2,0,0] + 0.5 [1,1,1] = [1.5, .5, .5]
    lp, coef, _ = compose_teacher(
        t([Z_DPO]), t([Z_REV]), ref_logits=t([Z_REF]), variant="theorem1", beta=0.1, kl_coef=0.2
    )
    lse = math.log(math.exp(1.5) + 2 * math.exp(0.5))
    assert torch.allclose(lp[0], t([1.5 - lse, 0.5 - lse, 0.5 - lse]), atol=1e-6)
    assert abs(coef.item() - 0.2) < 1e-7
    # adaptive: TVD(dpo, uniform ref)
    p0 = e2 / (e2 + 2)
    p1 = 1 / (e2 + 2)
    tvd = 0.5 * (abs(p0 - 1 / 3) + 2 * abs(p1 - 1 / 3))
    alpha = 1.0 * tvd + 0.0
    z = [alpha * 2 + (1 - alpha) * 1, (1 - alpha), (1 - alpha)]
    lse = math.log(sum(math.exp(v) for v in z))
    lp, coef, got_tvd = compose_teacher(
        t([Z_DPO]), t([Z_REV]), ref_logits=t([Z_REF]), variant="adaptive", beta=0.1, alpha_scale=1.0, alpha_eps=0.0
    )
    assert abs(got_tvd.item() - tvd) < 1e-6
    assert torch.allclose(lp[0], t([v - lse for v in z]), atol=1e-6)
    assert abs(coef.item() - 0.1 / alpha) < 1e-6


def test_compose_teacher_rejects_bad_arguments():
    z = t([Z_DPO])
    with pytest.raises(ValueError, match="unknown teacher variant"):
        compose_teacher(z, z, variant="nope")
    for variant in ("theorem1", "adaptive"):
        with pytest.raises(ValueError, match="needs ref_logits"):
            compose_teacher(z, z, variant=variant)
    with pytest.raises(ValueError, match="temperature"):
        compose_teacher(z, z, temperature=0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_teacher_bf16_inputs_combined_in_float32(variant):
    g = torch.Generator().manual_seed(7)
    shape = (2, 5, 11)
    dpo = (3 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    rev = (3 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    ref = (3 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    kw = dict(variant=variant, beta=0.1, kl_coef=0.03)  # w = 10/3, a non-trivial mix
    out = compose_teacher(dpo, rev, ref_logits=ref, **kw)
    ref_out = compose_teacher(dpo.float(), rev.float(), ref_logits=ref.float(), **kw)
    for a, b in zip(out, ref_out):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)
    # and that differs from doing the arithmetic in bf16 (the official defect),
    # checked on the aligndistil combination against a float64 reference
    if variant == "aligndistil":
        zd, zr = dpo.double(), rev.double()
        tvd = 0.5 * (torch.softmax(zd, -1) - torch.softmax(zr, -1)).abs().sum(-1)
        alpha = 20.0 * tvd + 1e-3
        z64 = zd + alpha.unsqueeze(-1) * (zd - zr)
        lp64 = torch.log_softmax(z64, -1)
        assert torch.allclose(out[0].double(), lp64, atol=1e-4)


# ---------------------------------------------------------------------------
# 3. TVD range and limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["aligndistil", "adaptive"])
def test_identical_logits_tvd_zero_alpha_eps(variant):
    z = t([[0.3, -1.2, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    beta, eps = 0.1, 1e-3
    lp, coef, tvd = compose_teacher(z, z, ref_logits=z, variant=variant, beta=beta, alpha_eps=eps)
    assert torch.all(tvd.abs() < 1e-7)
    assert torch.allclose(coef, torch.full((2,), beta / eps), rtol=1e-5)
    # alpha = eps: aligndistil z* = z_dpo; adaptive z* = eps z + (1-eps) z = z
    expected = torch.tensor([py_log_softmax(row) for row in z.tolist()])
    assert torch.allclose(lp, expected, atol=1e-6)


def test_disjoint_distributions_tvd_one():
    tvd = total_variation(t([[50.0, -50.0]]), t([[-50.0, 50.0]]))
    assert abs(tvd.item() - 1.0) < 1e-6
    _, coef, tvd2 = compose_teacher(t([[50.0, -50.0]]), t([[-50.0, 50.0]]), beta=0.1)
    assert abs(tvd2.item() - 1.0) < 1e-6
    assert abs(coef.item() - 0.1 / (20.0 + 1e-3)) < 1e-7


def test_tvd_in_unit_interval_random():
    g = torch.Generator().manual_seed(3)
    a = 10 * torch.randn(200, 17, generator=g)
    b = 10 * torch.randn(200, 17, generator=g)
    tvd = total_variation(a, b)
    assert torch.all(tvd >= 0) and torch.all(tvd <= 1 + 1e-6)
    # symmetric
    assert torch.allclose(tvd, total_variation(b, a), atol=1e-7)


# ---------------------------------------------------------------------------
# 4. Padded vocabularies
# ---------------------------------------------------------------------------


def test_mask_padded_vocab():
    x = t([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-1.0, 0.0, 9.0, 1e4, 7.0, 8.0]])
    before = x.clone()
    y = mask_padded_vocab(x, 4)
    assert y.shape == x.shape
    assert torch.equal(y[:, :4], before[:, :4])
    assert torch.all(y[:, 4:] == NEG_INF)
    assert torch.equal(x, before), "must be out of place"
    assert torch.equal(mask_padded_vocab(x, None), before)
    assert torch.equal(mask_padded_vocab(x, 6), before)
    assert torch.equal(mask_padded_vocab(x, 10), before)
    # works on 3-D too and keeps dtype
    z = torch.zeros(2, 3, 6, dtype=torch.bfloat16)
    m = mask_padded_vocab(z, 5)
    assert m.dtype == torch.bfloat16 and torch.all(m[..., 5] == NEG_INF) and torch.all(m[..., :5] == 0)


def _random_logits(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_vocab_rows_get_zero_probability_and_are_ignored(variant):
    dpo, rev, ref = _random_logits(1, (3, 6)), _random_logits(2, (3, 6)), _random_logits(3, (3, 6))
    lp, coef, tvd = compose_teacher(dpo, rev, ref_logits=ref, variant=variant, vocab_size=4)
    assert lp.shape == (3, 6)
    assert torch.all(lp[:, 4:] == NEG_INF)
    assert torch.all(lp[:, 4:].exp() == 0)
    assert torch.allclose(lp[:, :4].exp().sum(-1), torch.ones(3), atol=1e-6)
    # equals the hand reference on the first 4 columns only
    for pos in range(3):
        exp_lp, exp_coef, exp_tvd = py_teacher(
            variant, dpo[pos, :4].tolist(), rev[pos, :4].tolist(), ref[pos, :4].tolist(),
            beta=0.1, kl_coef=0.1, alpha_scale=20.0, alpha_eps=1e-3,
        )
        assert torch.allclose(lp[pos, :4], t(exp_lp), atol=1e-5)
        assert abs(coef[pos].item() - exp_coef) < 1e-5 * max(1.0, exp_coef)
        assert abs(tvd[pos].item() - exp_tvd) < 1e-6
    # garbage in the padded rows of any input changes nothing
    for which in ("dpo", "rev", "ref"):
        d, r, f = dpo.clone(), rev.clone(), ref.clone()
        {"dpo": d, "rev": r, "ref": f}[which][:, 4:] = 1e4
        lp2, coef2, tvd2 = compose_teacher(d, r, ref_logits=f, variant=variant, vocab_size=4)
        assert torch.equal(lp2, lp), which
        assert torch.equal(coef2, coef), which
        assert torch.equal(tvd2, tvd), which


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_vocab_different_widths(variant):
    # dpo padded to 6, rev to 8, ref to 7; 4 real tokens
    dpo, rev, ref = _random_logits(4, (2, 6)), _random_logits(5, (2, 8)), _random_logits(6, (2, 7))
    lp, coef, tvd = compose_teacher(dpo, rev, ref_logits=ref, variant=variant, vocab_size=4)
    assert lp.shape == (2, 6)  # width follows the dpo logits
    assert torch.all(lp[:, 4:] == NEG_INF)
    assert torch.allclose(lp[:, :4].exp().sum(-1), torch.ones(2), atol=1e-6)
    lp_trim, coef_trim, tvd_trim = compose_teacher(dpo[:, :4], rev[:, :4], ref_logits=ref[:, :4], variant=variant)
    assert torch.equal(lp[:, :4], lp_trim)
    assert torch.equal(coef, coef_trim) and torch.equal(tvd, tvd_trim)
    # the other way round: dpo wider than rev
    lp_b, _, _ = compose_teacher(rev, dpo, ref_logits=ref, variant=variant, vocab_size=4)
    assert lp_b.shape == (2, 8)
    assert torch.all(lp_b[:, 4:] == NEG_INF)
    assert torch.allclose(lp_b[:, :4].exp().sum(-1), torch.ones(2), atol=1e-6)
    # huge values in the padded rows change nothing
    dpo2, rev2, ref2 = dpo.clone(), rev.clone(), ref.clone()
    dpo2[:, 4:] = 1e4
    rev2[:, 4:] = -1e4
    ref2[:, 4:] = 1e4
    lp2, coef2, tvd2 = compose_teacher(dpo2, rev2, ref_logits=ref2, variant=variant, vocab_size=4)
    assert torch.equal(lp2, lp) and torch.equal(coef2, coef) and torch.equal(tvd2, tvd)


# ---------------------------------------------------------------------------
# 5. The distillation loss
# ---------------------------------------------------------------------------

# B = 2, T = 3, V = 3
STUDENT = [
    [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, -2.0, 0.0]],
    [[0.0, 0.0, 0.0], [-1.0, 2.0, 0.3], [1.5, 1.5, -0.5]],
]
TEACHER_LOGITS = [
    [[0.0, 1.0, 0.0], [2.0, -1.0, 0.5], [0.0, 0.0, 1.0]],
    [[1.0, 1.0, 1.0], [0.7, 0.0, -0.7], [-2.0, 0.0, 2.0]],
]
COEF = [[0.5, 2.0, 7.0], [3.0, 0.25, 9.0]]
MASK = [[1, 1, 0], [0, 1, 0]]  # seq 0: 2 response positions, seq 1: 1


def _teacher_logprobs():
    return t([[py_log_softmax(row) for row in seq] for seq in TEACHER_LOGITS])


def _hand_loss(student, teacher_lp, coef, mask):
    per_seq = []
    for b in range(len(mask)):
        n_b = sum(mask[b])
        if n_b == 0:
            continue
        s = 0.0
        for tt in range(len(mask[b])):
            if mask[b][tt]:
                s += coef[b][tt] * py_kl(student[b][tt], teacher_lp[b][tt])
        per_seq.append(s / n_b)
    return sum(per_seq) / len(per_seq)


def test_aligndistil_loss_hand_computed():
    teacher = _teacher_logprobs()
    expected = _hand_loss(STUDENT, teacher.tolist(), COEF, MASK)
    for mask in (t(MASK), t(MASK).bool(), torch.tensor(MASK)):
        loss = aligndistil_loss(t(STUDENT), teacher, t(COEF), mask)
        assert loss.ndim == 0 and loss.dtype == torch.float32
        assert abs(loss.item() - expected) < 1e-6


def test_aligndistil_loss_zero_iff_student_equals_teacher():
    teacher = _teacher_logprobs()
    # student logits = teacher logits + per-position shift: same log_softmax
    student = t(TEACHER_LOGITS) + t([[[3.0], [-1.0], [0.0]], [[10.0], [2.0], [-4.0]]])
    loss = aligndistil_loss(student, teacher, t(COEF), t(MASK))
    assert abs(loss.item()) < 1e-6
    loss2 = aligndistil_loss(t(STUDENT), teacher, t(COEF), t(MASK))
    assert loss2.item() > 1e-3


def test_aligndistil_loss_excludes_empty_sequences():
    teacher = _teacher_logprobs()
    student3 = torch.cat([t(STUDENT), t([[[9.0, -9.0, 0.0]] * 3])])
    teacher3 = torch.cat([teacher, t([[py_log_softmax([-5.0, 5.0, 0.0])] * 3])])
    coef3 = torch.cat([t(COEF), t([[1.0, 1.0, 1.0]])])
    mask3 = torch.cat([t(MASK), t([[0, 0, 0]])])
    expected = _hand_loss(STUDENT, teacher.tolist(), COEF, MASK)  # mean over 2 seqs, not 3
    loss = aligndistil_loss(student3, teacher3, coef3, mask3)
    assert abs(loss.item() - expected) < 1e-6
    # all sequences empty: zero, not NaN
    loss0 = aligndistil_loss(t(STUDENT), teacher, t(COEF), torch.zeros(2, 3))
    assert loss0.item() == 0.0


def test_aligndistil_loss_ignores_masked_positions():
    teacher = _teacher_logprobs()
    base = aligndistil_loss(t(STUDENT), teacher, t(COEF), t(MASK))
    student = t(STUDENT).clone()
    teacher_g = teacher.clone()
    coef = t(COEF).clone()
    off = ~t(MASK).bool()
    student[off] = t([1e30, -1e30, 3e4])
    teacher_g[off] = t([-1e30, 1e30, 5e4])
    coef[off] = 1e30
    loss = aligndistil_loss(student, teacher_g, coef, t(MASK))
    assert torch.isfinite(loss)
    assert abs(loss.item() - base.item()) < 1e-6
    # even NaN at masked positions stays out
    teacher_n, coef_n = teacher.clone(), t(COEF).clone()
    teacher_n[off] = float("nan")
    coef_n[off] = float("nan")
    loss_n = aligndistil_loss(t(STUDENT), teacher_n, coef_n, t(MASK))
    assert abs(loss_n.item() - base.item()) < 1e-6


def test_aligndistil_loss_padded_vocab_finite_value_and_grad():
    teacher = _teacher_logprobs()
    pad = torch.full((2, 3, 2), NEG_INF)
    student = torch.cat([t(STUDENT), pad], dim=-1).requires_grad_()
    teacher_p = torch.cat([teacher, pad], dim=-1)
    loss = aligndistil_loss(student, teacher_p, t(COEF), t(MASK))
    assert torch.isfinite(loss)
    expected = _hand_loss(STUDENT, teacher.tolist(), COEF, MASK)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert torch.all(torch.isfinite(student.grad))
    assert torch.all(student.grad[..., 3:] == 0)
    # same gradient on the real rows as without padding
    plain = t(STUDENT).requires_grad_()
    aligndistil_loss(plain, teacher, t(COEF), t(MASK)).backward()
    assert torch.allclose(student.grad[..., :3], plain.grad, atol=1e-7)
    # masked positions get zero gradient
    assert torch.all(plain.grad[~t(MASK).bool()] == 0)


def test_reverse_kl_hand_values():
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    q = [py_log_softmax([0.0, 1.0, 0.0]), py_log_softmax([2.0, -1.0, 0.5])]
    got = reverse_kl(t(s), t(q))
    assert got.shape == (2,) and got.dtype == torch.float32
    for i in range(2):
        assert abs(got[i].item() - py_kl(s[i], q[i])) < 1e-6
    # KL >= 0, and == 0 for equal distributions
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(50, 9, generator=g), torch.randn(50, 9, generator=g)
    assert torch.all(reverse_kl(a, torch.log_softmax(b, -1)) >= -1e-6)
    assert torch.all(reverse_kl(a, torch.log_softmax(a + 3.0, -1)).abs() < 1e-6)


# ---------------------------------------------------------------------------
# 6. Gradient checks
# ---------------------------------------------------------------------------


def test_reverse_kl_gradient_closed_form():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64)
    q = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    zz = z.float().requires_grad_()
    reverse_kl(zz, q.float()).sum().backward()
    # d KL / d z_i = p_i (log p_i - log q_i - KL), in float64
    log_p = z - torch.logsumexp(z, -1, keepdim=True)
    p = log_p.exp()
    kl = (p * (log_p - q)).sum(-1, keepdim=True)
    expected = p * (log_p - q - kl)
    assert torch.allclose(zz.grad.double(), expected, atol=1e-6)


def test_reverse_kl_finite_difference_float32():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(3, 5, generator=g)
    q = torch.log_softmax(torch.randn(3, 5, generator=g), -1)
    w = t([0.3, -1.2, 0.7])  # weights so that rows are mixed into one scalar
    zz = z.clone().requires_grad_()
    (w * reverse_kl(zz, q)).sum().backward()
    eps = 1e-2
    fd = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zp, zm = z.clone(), z.clone()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd[i, j] = ((w * reverse_kl(zp, q)).sum() - (w * reverse_kl(zm, q)).sum()) / (2 * eps)
    assert torch.allclose(zz.grad, fd, atol=1e-3, rtol=1e-3)


def test_dpo_loss_gradcheck():
    g = torch.Generator().manual_seed(2)
    pc = (-10 * torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    pr = (-10 * torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    rc = -10 * torch.rand(3, generator=g, dtype=torch.float64)
    rr = -10 * torch.rand(3, generator=g, dtype=torch.float64)
    # dpo_loss computes the sigmoid in float32, so tolerances are float32-sized.
    fn = lambda a, b: dpo_loss(a, b, rc, rr, beta=0.3).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pc, pr), eps=1e-2, atol=1e-4, rtol=1e-3)


def test_dpo_loss_finite_difference():
    pc, pr, rc, rr = t([-4.0, -2.5]), t([-3.0, -6.0]), t([-4.5, -2.0]), t([-3.5, -5.0])
    beta = 0.7
    pcg = pc.clone().requires_grad_()
    dpo_loss(pcg, pr, rc, rr, beta=beta).backward()
    eps = 1e-2
    for i in range(2):
        d = torch.zeros(2)
        d[i] = eps
        fd = (dpo_loss(pc + d, pr, rc, rr, beta=beta) - dpo_loss(pc - d, pr, rc, rr, beta=beta)) / (2 * eps)
        assert abs(fd.item() - pcg.grad[i].item()) < 1e-3


# ---------------------------------------------------------------------------
# 7. Chunking equivalence
# ---------------------------------------------------------------------------

N, H, V, VOCAB = 10, 5, 7, 5


def _head_setup(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    upstream = torch.randn(N, generator=g)
    teacher = torch.log_softmax(2 * torch.randn(N, VOCAB, generator=g), -1)  # V' = VOCAB < V
    return hidden, weight, b, targets, upstream, teacher


def _explicit_logits(hidden, weight, bias, vocab_size):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    keep = torch.arange(logits.shape[-1]) < vocab_size
    return torch.where(keep, logits, torch.full_like(logits, NEG_INF))


def _rel_close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, N, N + 6])
def test_token_logps_from_hidden_chunked_equals_unchunked(chunk, bias):
    hidden, weight, b, targets, upstream, _ = _head_setup(bias=bias)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(_explicit_logits(h1, w1, b, VOCAB), -1)
    ref = logp[torch.arange(N), targets]
    (upstream * ref).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = token_logps_from_hidden(h2, targets, w2, b, vocab_size=VOCAB, chunk_size=chunk)
    assert got.shape == (N,) and got.dtype == torch.float32
    (upstream * got).sum().backward()
    assert _rel_close(got, ref.detach())
    assert _rel_close(h2.grad, h1.grad)
    assert _rel_close(w2.grad, w1.grad)
    assert torch.all(w2.grad[VOCAB:] == 0), "padded rows get no gradient"
    with torch.no_grad():
        assert _rel_close(token_logps_from_hidden(hidden, targets, weight, b, VOCAB, chunk), ref.detach())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, N, N + 6])
def test_chunked_reverse_kl_equals_unchunked(chunk, bias):
    hidden, weight, b, _, upstream, teacher = _head_setup(seed=1, bias=bias)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_p = torch.log_softmax(_explicit_logits(h1, w1, b, VOCAB), -1)[:, :VOCAB]
    ref = (log_p.exp() * (log_p - teacher)).sum(-1)  # KL over the real vocabulary only
    (upstream * ref).sum().backward()

    calls = []

    def teacher_fn(start, end):
        calls.append((start, end))
        return teacher[start:end]

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = chunked_reverse_kl(h2, teacher_fn, w2, b, vocab_size=VOCAB, chunk_size=chunk)
    assert got.shape == (N,) and got.dtype == torch.float32
    (upstream * got).sum().backward()
    assert torch.all(torch.isfinite(got))
    assert _rel_close(got, ref.detach())
    assert _rel_close(h2.grad, h1.grad)
    assert _rel_close(w2.grad, w1.grad)
    # forward covers [0, N) in contiguous chunks of the requested size (with grad on,
    # activation checkpointing calls teacher_fn once more per chunk in backward)
    expected_spans = [(s, min(s + chunk, N)) for s in range(0, N, chunk)]
    assert calls[: len(expected_spans)] == expected_spans
    with torch.no_grad():
        calls.clear()
        assert _rel_close(chunked_reverse_kl(hidden, teacher_fn, weight, b, VOCAB, chunk), ref.detach())
        assert calls == expected_spans


def test_chunked_reverse_kl_teacher_with_full_padded_width():
    # teacher already padded to V with -inf gives the same result as V' = VOCAB
    hidden, weight, _, _, _, teacher = _head_setup(seed=2)
    padded = torch.cat([teacher, torch.full((N, V - VOCAB), NEG_INF)], -1)
    a = chunked_reverse_kl(hidden, lambda s, e: teacher[s:e], weight, vocab_size=VOCAB, chunk_size=3)
    b = chunked_reverse_kl(hidden, lambda s, e: padded[s:e], weight, vocab_size=VOCAB, chunk_size=4)
    assert _rel_close(a, b)


# ---------------------------------------------------------------------------
# 8. chunked_map
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunked_map_rejects_nonpositive_chunk(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_map(lambda x: x.sum(-1), chunk, torch.ones(4, 2))


def test_chunked_map_empty_and_plain():
    assert chunked_map(lambda x: x.sum(-1), 3, torch.ones(0, 2)).shape == (0,)
    x = torch.arange(14.0).reshape(7, 2)
    out = chunked_map(lambda a: a[:, 0] * 10 + a[:, 1], 3, x)
    assert out.tolist() == [1.0, 23.0, 45.0, 67.0, 89.0, 111.0, 133.0]
