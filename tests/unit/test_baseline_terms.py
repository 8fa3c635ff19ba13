"""train-dpo --loss simpo|tdpo1|tdpo2: the stage's fused inputs to the losses against plain float64 model computations.

Each sequence is run alone through float64 copies of the models, its full logits taken, and the loss built
from them and differentiated by autograd; the stage instead runs chosen and rejected in one (padded or
shared-prompt packed) batch through one fused head pass whose gradients are computed by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch

from aligndistil_cli.data.encode import Encoded
from aligndistil_cli.losses.preference import simpo_loss, tdpo_kl_weights, tdpo_loss
from aligndistil_cli.model.packing import collate_for, enable
from aligndistil_cli.stages.dpo import policy_logps, tdpo_terms

VOCAB = 37  # of 40 embedding rows: 3 padded
CPU = torch.device("cpu")


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def random_pairs(seed: int, n: int):
    """n pairs whose chosen and rejected share their prompt and differ in length."""
    gen = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(1, VOCAB, (k,), generator=gen).tolist()

    def length():
        return int(torch.randint(2, 8, (1,), generator=gen))

    return [(Encoded(p := ids(length()), ids(length())), Encoded(p, ids(length()))) for _ in range(n)]


def plain_terms(model, ref, examples):
    """Per sequence, float64: (sum of log pi, number of tokens, sum of log ref, sum_t KL(ref || pi))."""
    out = []
    for e in examples:
        ids = torch.tensor([e.prompt + e.response])
        p = len(e.prompt)
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, p - 1 : -1, :VOCAB], -1)
        with torch.no_grad():
            log_q = torch.log_softmax(ref(input_ids=ids).logits[0, p - 1 : -1, :VOCAB], -1)
        tgt = torch.tensor(e.response).unsqueeze(1)
        kl = (log_q.exp() * (log_q - log_p)).sum()
        out.append((log_p.gather(1, tgt).sum(), len(e.response), log_q.gather(1, tgt).sum(), kl))
    return [torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in col]) for col in zip(*out)]


def grads_of(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters()])


def assert_close_all(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-5, atol=1e-6)


def packing(model, ref, packed: bool):
    if packed:
        assert enable(model, True, "test") and (ref is None or enable(ref, True, "test (reference)"))
    return collate_for(packed, pairs=True)


@pytest.mark.parametrize("packed", [False, True])
def test_simpo_average_log_probs_and_gradients_equal_plain(packed):
    model = tiny_model(0)
    pairs = random_pairs(0, 4)
    plain = copy.deepcopy(model).double()
    lp_c, n_c, _, _ = plain_terms(plain, plain, [c for c, _ in pairs])
    lp_r, n_r, _, _ = plain_terms(plain, plain, [r for _, r in pairs])
    expected = simpo_loss(lp_c / n_c, lp_r / n_r, beta=2.0, gamma=0.7)
    expected_grads = grads_of(plain, expected)

    ac, ar = policy_logps(model, pairs, 0, VOCAB, 3, CPU, packing(model, None, packed), average=True)
    torch.testing.assert_close(ac.detach().double(), (lp_c / n_c).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ar.double(), (lp_r / n_r).detach(), rtol=1e-5, atol=1e-6)
    loss = simpo_loss(ac, ar, beta=2.0, gamma=0.7)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert_close_all(grads_of(model, loss), expected_grads)


@pytest.mark.parametrize("version", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("packed", [False, True])
def test_tdpo_terms_loss_and_gradients_equal_plain(version, packed):
    model, ref = tiny_model(1), tiny_model(2)
    with torch.no_grad():  # a sharper reference than the near-uniform random policy: KLs far from 0
        ref.lm_head.weight.mul_(20.0)
    pairs = random_pairs(1, 4)
    beta, alpha = 0.5, 0.3
    plain, plain_ref = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
    lp_c, _, ref_c, kl_c = plain_terms(plain, plain_ref, [c for c, _ in pairs])
    lp_r, _, ref_r, kl_r = plain_terms(plain, plain_ref, [r for _, r in pairs])
    expected = tdpo_loss(lp_c, lp_r, ref_c, ref_r, kl_c, kl_r, beta=beta, alpha=alpha, version=version)
    expected_grads = grads_of(plain, expected)

    ref_head = (ref.lm_head.weight.detach().float(), None)
    terms = tdpo_terms(model, ref, ref_head, pairs, 0, VOCAB, 3, CPU, tdpo_kl_weights(version, alpha),
                       packing(model, ref, packed))
    for name, want in [("policy_chosen_logps", lp_c), ("policy_rejected_logps", lp_r), ("ref_chosen_logps", ref_c),
                       ("ref_rejected_logps", ref_r), ("chosen_kl", kl_c), ("rejected_kl", kl_r)]:
        torch.testing.assert_close(terms[name].detach().double(), want.detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert (kl_c > 0.5).all() and (kl_r > 0.5).all(), "the KL term is exercised"
    loss = tdpo_loss(**terms, beta=beta, alpha=alpha, version=version)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert_close_all(grads_of(model, loss), expected_grads)
