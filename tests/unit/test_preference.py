"""SimPO and TDPO (losses.preference) and TDPO's fused per-token KL (losses.fused.fused_token_logps_kl).

Expected values are worked out by plain arithmetic in the test, taken from an invariant (DPO's own
loss), from TRL's formula written out as TRL writes it, or from a float64 computation over the full
logits that autograd differentiates (it shares no code with the fused pass, which computes its
gradients by hand).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.losses.fused import fused_token_logps_kl
from aligndistil_cli.losses.preference import simpo_loss, tdpo_kl_weights, tdpo_loss


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- SimPO


def test_simpo_hand_worked():
    # beta (a_w - a_l) - gamma: 2 (-1.0 + 1.5) - 0.5 = 0.5 and 2 (-2.0 + 1.0) - 0.5 = -2.5
    loss = simpo_loss(t([-1.0, -2.0]), t([-1.5, -1.0]), beta=2.0, gamma=0.5)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(2.5)) / 2, abs=1e-12)


def test_simpo_defaults_are_the_official_scripts():
    # train_simpo.py: beta 2.5, gamma_beta_ratio 0.5, so gamma = 1.25; a_w - a_l = 1: 2.5 - 1.25 = 1.25
    assert simpo_loss(t([-1.0]), t([-2.0])).item() == pytest.approx(softplus(-1.25), abs=1e-12)


def trl_cpo_simpo_losses(policy_chosen_logps, policy_rejected_logps, beta, simpo_gamma, label_smoothing=0.0):
    """TRL's CPOTrainer.cpo_loss for loss_type="simpo", as TRL writes it (its log-probs are length averages)."""
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses


@pytest.mark.parametrize("seed", range(4))
def test_simpo_equals_trl_cpo_simpo(seed):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = -3 * torch.rand(6, generator=gen, dtype=torch.float64), -3 * torch.rand(6, generator=gen,
                                                                                                dtype=torch.float64)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.25), (0.1, 0.5), (10.0, 3.0)):
        expected = trl_cpo_simpo_losses(chosen, rejected, beta, gamma).mean()
        assert abs(simpo_loss(chosen, rejected, beta=beta, gamma=gamma).item() - expected.item()) < 1e-7


def test_simpo_without_margin_and_equal_lengths_is_reference_free_dpo_at_beta_over_length():
    # Sums S over responses of the same length L: a = S / L, so beta (a_w - a_l) = (beta / L) (S_w - S_l).
    length, beta = 7, 2.0
    s_w, s_l = t([-9.0, -20.0, -4.5]), t([-12.0, -11.0, -4.0])
    zero = torch.zeros(3, dtype=torch.float64)
    got = simpo_loss(s_w / length, s_l / length, beta=beta, gamma=0.0)
    assert got.item() == pytest.approx(dpo_loss(s_w, s_l, zero, zero, beta=beta / length).item(), abs=1e-6)


# --------------------------------------------------------------------------- TDPO

# One pair: u = 0.5 ((-3 + 4) - (-5 + 4.5)) = 0.75; D_w = 0.2, D_l = 0.7.
PAIR = dict(policy_chosen_logps=t([-3.0]), policy_rejected_logps=t([-5.0]), ref_chosen_logps=t([-4.0]),
            ref_rejected_logps=t([-4.5]), chosen_kl=t([0.2]), rejected_kl=t([0.7]), beta=0.5)


def test_tdpo1_hand_worked():
    # delta = beta (D_l - D_w) = 0.5 * 0.5 = 0.25, so u - delta = 0.5
    assert tdpo_loss(**PAIR, version="tdpo1").item() == pytest.approx(softplus(-0.5), abs=1e-12)


def test_tdpo2_hand_worked():
    # delta = alpha (beta D_l - beta D_w) = 0.4 (0.35 - 0.1) = 0.1, so u - delta = 0.65
    assert tdpo_loss(**PAIR, alpha=0.4, version="tdpo2").item() == pytest.approx(softplus(-0.65), abs=1e-12)


def test_tdpo_batch_mean_hand_worked():
    both = {k: torch.cat([v, v + 1.0]) if torch.is_tensor(v) else v for k, v in PAIR.items()}
    # row 2 adds 1 to every input: u is unchanged, and so is every KL difference
    assert tdpo_loss(**both, version="tdpo1").item() == pytest.approx(softplus(-0.5), abs=1e-12)


@pytest.mark.parametrize("version", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("seed", range(3))
def test_tdpo_without_kl_is_dpo(version, seed):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-40 * torch.rand(5, generator=gen) for _ in range(4))
    zero = torch.zeros(5)
    for beta in (0.1, 0.5):
        got = tdpo_loss(pc, pr, rc, rr, zero, zero, beta=beta, alpha=0.7, version=version)
        assert got.item() == pytest.approx(dpo_loss(pc, pr, rc, rr, beta=beta).item(), abs=1e-6)


def test_tdpo_equal_kls_is_dpo_for_tdpo1_only():
    """delta vanishes for TDPO1 when D_w = D_l, and for TDPO2 only at alpha 0."""
    kl = t([0.3])
    args = [PAIR[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
    dpo = softplus(-0.75)
    assert tdpo_loss(*args, kl, kl, beta=0.5, version="tdpo1").item() == pytest.approx(dpo, abs=1e-12)
    assert tdpo_loss(*args, kl, kl, beta=0.5, alpha=0.0, version="tdpo2").item() == pytest.approx(dpo, abs=1e-12)
    # TDPO2 at alpha 1 with equal KLs: delta = beta D_l - beta D_w = 0 in value too
    assert tdpo_loss(*args, kl, kl, beta=0.5, alpha=1.0, version="tdpo2").item() == pytest.approx(dpo, abs=1e-12)


def kl_gradients(version, alpha=0.4):
    leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in PAIR.items()}
    tensors = {k: v for k, v in leaves.items() if torch.is_tensor(v)}
    grads = torch.autograd.grad(tdpo_loss(**leaves, alpha=alpha, version=version), list(tensors.values()),
                                allow_unused=True, materialize_grads=True)
    return {k: g.item() for k, g in zip(tensors, grads)}


def test_tdpo2_stops_the_gradient_of_the_chosen_kl_only():
    grads = kl_gradients("tdpo2")
    assert grads["chosen_kl"] == 0.0
    # dL/dD_l = sigmoid(-(u - delta)) * alpha * beta, with u - delta = 0.65
    assert grads["rejected_kl"] == pytest.approx(0.4 * 0.5 / (1 + math.exp(0.65)), abs=1e-12)
    # and the value still counts D_w (test_tdpo2_hand_worked)


def test_tdpo1_kl_gradients_are_opposite():
    grads = kl_gradients("tdpo1")
    # dL/dD_w = -sigmoid(-0.5) beta, dL/dD_l = +sigmoid(-0.5) beta
    assert grads["chosen_kl"] == pytest.approx(-0.5 / (1 + math.exp(0.5)), abs=1e-12)
    assert grads["rejected_kl"] == pytest.approx(0.5 / (1 + math.exp(0.5)), abs=1e-12)


@pytest.mark.parametrize("version", ["tdpo1", "tdpo2"])
def test_kl_weights_are_the_loss_gradients_relative_to_the_chosen_log_prob(version):
    """The fused pass weighs log-probs by +1 / -1 and KLs by tdpo_kl_weights: the loss's own gradient ratios."""
    grads = kl_gradients(version)
    unit = grads["policy_chosen_logps"]
    assert grads["policy_rejected_logps"] / unit == pytest.approx(-1.0, abs=1e-12)
    wc, wr = tdpo_kl_weights(version, 0.4)
    assert grads["chosen_kl"] / unit == pytest.approx(wc, abs=1e-12)
    assert grads["rejected_kl"] / unit == pytest.approx(wr, abs=1e-12)


def test_unknown_tdpo_version_is_refused():
    with pytest.raises(ValueError, match="unknown TDPO version 'tdpo3'"):
        tdpo_loss(**PAIR, version="tdpo3")


# --------------------------------------------------------------------------- the fused per-token KL

N, H, WIDTH, VOCAB = 12, 5, 17, 14  # three padded vocabulary rows


def kl_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden, ref_hidden = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    weight, ref_weight = torch.randn(WIDTH, H, generator=gen), torch.randn(WIDTH, H, generator=gen)
    bias = torch.randn(WIDTH, generator=gen)
    targets = torch.randint(0, VOCAB, (N,), generator=gen)
    return hidden, ref_hidden, weight, ref_weight, bias, targets


def ref_log_softmax(ref_hidden, ref_weight, zero_row: int | None):
    """The reference over the real vocabulary, float64; zero_row: a real row it gives no mass at rows 0-3."""
    logits = ref_hidden.double() @ ref_weight[:VOCAB].double().T
    if zero_row is not None:
        logits[:4, zero_row] = float("-inf")
    return torch.log_softmax(logits, -1)


def dense_expected(hidden, weight, bias, targets, log_q, groups, coefs, kl_coefs, upstream):
    """(sums, logps, kl, gradients w.r.t. hidden, weight, bias), all float64, from the full [N, V] logits."""
    h, w, b = (x.double().clone().requires_grad_() for x in (hidden, weight, bias))
    log_p = torch.log_softmax(h @ w[:VOCAB].T + b[:VOCAB], -1)
    lp = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)  # 0 log 0 = 0
    sums = torch.zeros(3, dtype=torch.float64).index_add(0, groups, coefs.double() * lp + kl_coefs.double() * kl)
    grads = torch.autograd.grad((sums * upstream.double()).sum(), (h, w, b))
    return sums.detach(), lp.detach(), kl.detach(), grads


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("zero_row", [None, 5])
def test_fused_kl_values_and_gradients_equal_a_dense_float64_computation(chunk, zero_row):
    hidden, ref_hidden, weight, ref_weight, bias, targets = kl_inputs(chunk)
    log_q = ref_log_softmax(ref_hidden, ref_weight, zero_row)
    # TDPO-style: rows 0-5 chosen (+1, KL weight 1), 6-11 rejected (-1, KL weight -0.5) of 3 pairs
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0])
    coefs = torch.tensor([1.0] * 6 + [-1.0] * 6)
    kl_coefs = torch.tensor([1.0] * 6 + [-0.5] * 6)
    upstream = torch.tensor([0.3, -1.7, 0.9])
    sums_64, lp_64, kl_64, grads_64 = dense_expected(hidden, weight, bias, targets, log_q, groups, coefs, kl_coefs,
                                                     upstream)

    # The callable hands out [chunk, WIDTH] with the padded rows -inf; the fused pass reads the real ones.
    padded = torch.cat([log_q.float(), torch.full((N, WIDTH - VOCAB), float("-inf"))], dim=1)
    handed_out = padded.clone()
    calls = []

    def ref_logprobs(s, e):
        calls.append((s, e))
        return padded[s:e]

    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    sums, logps, kl = fused_token_logps_kl(h, targets, w, b, ref_logprobs, groups, coefs, kl_coefs, 3, VOCAB, chunk)
    grads = torch.autograd.grad((sums * upstream).sum(), (h, w, b))
    assert calls == [(s, min(s + chunk, N)) for s in range(0, N, chunk)], "each chunk of the reference once, in order"
    assert torch.equal(padded, handed_out), "the views handed out are read, never written"
    for got, expected in [(sums, sums_64), (logps, lp_64), (kl, kl_64), *zip(grads, grads_64)]:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not logps.requires_grad and not kl.requires_grad
    assert torch.isfinite(torch.stack([g.abs().sum() for g in grads])).all()


def test_fused_kl_is_zero_where_the_policy_is_the_reference():
    hidden, _, weight, _, bias, targets = kl_inputs(0)
    log_p = torch.log_softmax(hidden @ weight[:VOCAB].T + bias[:VOCAB], -1)
    groups, ones = torch.zeros(N, dtype=torch.long), torch.ones(N)
    with torch.no_grad():
        _, _, kl = fused_token_logps_kl(hidden, targets, weight, bias, lambda s, e: log_p[s:e], groups, ones, ones, 1,
                                        VOCAB, 5)
    assert kl.abs().max().item() < 1e-6
