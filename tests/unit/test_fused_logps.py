"""fused_token_logps against the plain float64 computation: values and gradients.

The reference builds the full [N, V] logits in float64 and lets autograd differentiate it, so it
shares no code with the fused pass (which computes its gradients by hand, chunk by chunk).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.losses.fused import fused_token_logps

N, H, WIDTH, VOCAB = 12, 5, 17, 14  # three padded vocabulary rows


def inputs(seed: int, n: int = N):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen)
    weight = torch.randn(WIDTH, H, generator=gen)
    bias = torch.randn(WIDTH, generator=gen)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    return hidden, weight, bias, targets


def plain_logps(hidden, weight, bias, targets):
    """log softmax over the real vocabulary, gathered, in float64."""
    logits = hidden.double() @ weight[:VOCAB].double().T + bias[:VOCAB].double()
    return torch.log_softmax(logits, -1).gather(1, targets.unsqueeze(1)).squeeze(1)


def leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


def close(got, expected):
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_grouped_sums_and_gradients_equal_float64(chunk):
    hidden, weight, bias, targets = inputs(chunk)
    # DPO-style groups: rows 0-5 are chosen (+1) and 6-11 rejected (-1) of pairs 0, 0, 1, 1, 2, 2 / 1, 1, 2, 2, 0, 0.
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0])
    coefs = torch.tensor([1.0] * 6 + [-1.0] * 6)
    upstream = torch.tensor([0.3, -1.7, 0.9])

    h64, w64, b64 = leaves(hidden.double(), weight.double(), bias.double())
    lp = plain_logps(h64, w64, b64, targets)
    expected = torch.zeros(3, dtype=torch.float64).index_add(0, groups, lp * coefs.double())
    exp_grads = torch.autograd.grad((expected * upstream.double()).sum(), (h64, w64, b64))

    h, w, b = leaves(hidden, weight, bias)
    sums, logps = fused_token_logps(h, targets, w, b, groups, coefs, 3, VOCAB, chunk)
    grads = torch.autograd.grad((sums * upstream).sum(), (h, w, b))
    close(sums, expected)
    close(logps, lp.detach())
    assert not logps.requires_grad
    for g, e in zip(grads, exp_grads):
        close(g, e)
    assert torch.all(grads[1][VOCAB:] == 0) and torch.all(grads[2][VOCAB:] == 0), "padded rows get no gradient"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_single_group_without_bias(chunk):
    hidden, weight, _, targets = inputs(100 + chunk)
    h64, w64 = leaves(hidden.double(), weight.double())
    logits = h64 @ w64[:VOCAB].T
    expected = torch.log_softmax(logits, -1).gather(1, targets.unsqueeze(1)).sum()
    exp_grads = torch.autograd.grad(-expected / N, (h64, w64))
    h, w = leaves(hidden, weight)
    sums, _ = fused_token_logps(h, targets, w, None, vocab_size=VOCAB, chunk_size=chunk)
    assert sums.shape == (1,)
    grads = torch.autograd.grad(-sums.sum() / N, (h, w))
    close(sums[0], expected)
    for g, e in zip(grads, exp_grads):
        close(g, e)


def test_two_calls_in_one_graph_through_dpo_loss():
    """Chosen and rejected as two calls sharing the head, combined by the (non-linear) DPO loss."""
    hidden, weight, bias, targets = inputs(7)
    seq = torch.tensor([0, 0, 0, 1, 1, 1])  # two sequences of three positions per call
    ref_c, ref_r = torch.tensor([-3.0, -2.0]), torch.tensor([-2.5, -4.0])

    h64, w64, b64 = leaves(hidden.double(), weight.double(), bias.double())
    lp = plain_logps(h64, w64, b64, targets)
    pc = torch.zeros(2, dtype=torch.float64).index_add(0, seq, lp[:6])
    pr = torch.zeros(2, dtype=torch.float64).index_add(0, seq, lp[6:])
    expected = -F.logsigmoid(0.5 * ((pc - ref_c.double()) - (pr - ref_r.double()))).mean()
    exp_grads = torch.autograd.grad(expected, (h64, w64, b64))

    h, w, b = leaves(hidden, weight, bias)
    pc_f, _ = fused_token_logps(h[:6], targets[:6], w, b, seq, None, 2, VOCAB, 4)
    pr_f, _ = fused_token_logps(h[6:], targets[6:], w, b, seq, None, 2, VOCAB, 4)
    loss = dpo_loss(pc_f, pr_f, ref_c, ref_r, beta=0.5)
    grads = torch.autograd.grad(loss, (h, w, b))
    close(loss, expected)
    for g, e in zip(grads, exp_grads):
        close(g, e)


def test_gradient_accumulation_over_micro_batches():
    """Two micro-batches, each backward scaled by its share, accumulate into .grad as one batch would."""
    hidden, weight, bias, targets = inputs(11)
    h64, w64, b64 = leaves(hidden.double(), weight.double(), bias.double())
    (-plain_logps(h64, w64, b64, targets).sum() / N).backward()

    w, b = leaves(weight, bias)
    for part in (slice(0, 5), slice(5, N)):
        h = hidden[part].clone().requires_grad_()
        sums, _ = fused_token_logps(h, targets[part], w, b, vocab_size=VOCAB, chunk_size=3)
        n = h.shape[0]
        (-sums.sum() / n * (n / N)).backward()
    close(w.grad, w64.grad)
    close(b.grad, b64.grad)


def test_no_grad_values_and_second_backward_refused():
    hidden, weight, bias, targets = inputs(3)
    with torch.no_grad():
        _, logps = fused_token_logps(hidden, targets, weight, bias, vocab_size=VOCAB, chunk_size=5)
    close(logps, plain_logps(hidden, weight, bias, targets))
    h, w = leaves(hidden, weight)
    sums, _ = fused_token_logps(h, targets, w, None, vocab_size=VOCAB, chunk_size=5)
    sums.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        sums.sum().backward()


def test_no_grad_builds_no_gradients():
    """Under no_grad, parameters that require a gradient (a trained model's reference pass) get no
    gradient work: the [G, V, H] accumulators alone would be 32 x 2048 x 64 float32 = 16 MiB here."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 64, generator=gen), torch.randn(2048, 64, generator=gen).requires_grad_()
    targets, groups = torch.randint(0, 2048, (64,), generator=gen), torch.arange(64) % 32
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sums, _ = fused_token_logps(hidden, targets, weight, None, groups, None, 32, chunk_size=16)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())  # every allocation, freed or not
    assert allocated < 4 * 2**20, allocated  # [16, 2048] float32 blocks (128 KiB) a few times per chunk
    assert not sums.requires_grad


def test_empty_and_bad_chunk():
    hidden, weight, bias, targets = inputs(0, n=0)
    sums, logps = fused_token_logps(hidden.requires_grad_(), targets, weight, bias, vocab_size=VOCAB)
    assert sums.tolist() == [0.0] and logps.shape == (0,)
    with pytest.raises(ValueError):
        fused_token_logps(hidden, targets, weight, bias, chunk_size=0)


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).double().eval()


def random_pairs(seed: int, n: int):
    from aligndistil_cli.data.encode import Encoded

    gen = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(1, 37, (k,), generator=gen).tolist()
    lens = lambda: int(torch.randint(2, 7, (1,), generator=gen))
    return [(Encoded(p := ids(lens()), ids(lens())), Encoded(p, ids(lens()))) for _ in range(n)]


def plain_sequence_logps(model, examples, vocab):
    """Per-sequence sums from the model's full logits, one sequence at a time, float64."""
    out = []
    for e in examples:
        ids = torch.tensor([e.prompt + e.response])
        logits = model(input_ids=ids).logits[0, :, :vocab].double()
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        out.append(lp[len(e.prompt) - 1 :].sum())
    return torch.stack(out)


def test_dpo_policy_logps_gradients_equal_plain_model_computation():
    from aligndistil_cli.stages.dpo import policy_logps

    pairs, vocab, beta = random_pairs(0, 3), 37, 0.5  # 3 padded vocabulary rows
    ref_c, ref_r = torch.tensor([-9.0, -8.0, -11.0]), torch.tensor([-10.0, -7.5, -9.0])
    model = tiny_model()
    params = [p for p in model.parameters()]
    pc = plain_sequence_logps(model, [c for c, _ in pairs], vocab)
    pr = plain_sequence_logps(model, [r for _, r in pairs], vocab)
    expected = dpo_loss(pc, pr, ref_c.double(), ref_r.double(), beta=beta)
    exp_grads = torch.autograd.grad(expected, params)

    fc, fr = policy_logps(model, pairs, 0, vocab, 3, torch.device("cpu"))
    close(fc, pc.detach())
    close(fr, pr.detach())
    grads = torch.autograd.grad(dpo_loss(fc, fr, ref_c, ref_r, beta=beta), params)
    for g, e in zip(grads, exp_grads):
        close(g, e)
