"""Sampling: per-prompt random streams, the sampling rule, and the KV-cache decode loop.

The decode loop is checked against a plain re-implementation (one prompt at a time,
no cache, no padding) on a tiny Llama, and its bookkeeping (EOS, cap, padding,
dropping finished rows) against a scripted decoder whose every output is known.
"""

from __future__ import annotations

import math

import pytest
import torch

from aligndistil_cli.model.sampling import (
    ModelDecoder,
    decode,
    generate,
    length_sorted_batches,
    prompt_keys,
    sample_tokens,
    step_uniforms,
)

EOS, PAD = 2, 0


# --------------------------------------------------------------------------- random streams


def test_uniforms_are_uniform_independent_and_in_the_open_interval():
    n = 200_000
    keys = prompt_keys(0, range(n))
    u0, u1 = step_uniforms(keys, 0), step_uniforms(keys, 1)
    assert u0.dtype == torch.float64 and bool(((u0 > 0) & (u0 < 1)).all())
    sigma = math.sqrt(1 / 12 / n)
    assert abs(u0.mean().item() - 0.5) < 5 * sigma and abs(u1.mean().item() - 0.5) < 5 * sigma
    counts = torch.histc(u0.float(), bins=20, min=0, max=1)
    expected, sd = n / 20, math.sqrt(n / 20 * (1 - 1 / 20))
    assert bool(((counts - expected).abs() < 5 * sd).all()), counts
    # Successive draws of one stream and neighbouring streams are uncorrelated.
    corr = torch.corrcoef(torch.stack([u0, u1, u0.roll(1)]))
    assert corr[0, 1].abs() < 5 / math.sqrt(n) and corr[0, 2].abs() < 5 / math.sqrt(n)
    assert len(torch.unique(u0)) == n


def test_keys_depend_on_seed_and_index_only():
    keys = prompt_keys(7, range(50_000))
    assert len(torch.unique(keys)) == 50_000
    assert torch.equal(prompt_keys(7, [3, 49_999, 0]), keys[[3, 49_999, 0]])
    assert not torch.equal(prompt_keys(8, range(100)), keys[:100])
    # High bits of the seed and of the index matter too.
    assert not torch.equal(prompt_keys(7 + 2**32, range(100)), keys[:100])
    assert prompt_keys(7, [2**32 + 5]).item() != keys[5].item()


# --------------------------------------------------------------------------- the sampling rule

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]


def expected_probs(temperature: float, top_p: float) -> list[float]:
    """Hand re-implementation in float64: softmax(z / T), then the top-p nucleus renormalised."""
    weights = [math.exp(z / temperature) if z != float("-inf") else 0.0 for z in LOGITS]
    p = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.7, 0.9)])
def test_sample_tokens_draws_from_tempered_nucleus(temperature, top_p):
    n = 100_000
    logits = torch.tensor(LOGITS).expand(n, -1)
    tokens = sample_tokens(logits, step_uniforms(prompt_keys(1, range(n)), 0), temperature, top_p)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    for i, p in enumerate(expected_probs(temperature, top_p)):
        if p == 0.0:
            assert counts[i] == 0, (i, counts)
        else:
            assert abs(counts[i] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (i, counts[i] / n, p)


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # p = [0.5, 0.3, 0.2]: the kept set is the most likely tokens up to and including the one
    # whose cumulative mass reaches top_p.
    logits = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.2)]).expand(20_000, -1)
    u = step_uniforms(prompt_keys(2, range(20_000)), 0)
    for top_p, kept in [(0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2})]:
        assert set(sample_tokens(logits, u, 1.0, top_p).tolist()) == kept, top_p


def test_inverse_cdf_boundaries():
    # Uniform u picks the first token whose cumulative mass exceeds u.
    logits = torch.log(torch.tensor([[0.25, 0.0, 0.25, 0.5]])).expand(5, -1)
    u = torch.tensor([1e-12, 0.2499, 0.2501, 0.4999, 0.5001], dtype=torch.float64)
    assert sample_tokens(logits, u).tolist() == [0, 0, 2, 2, 3]


# --------------------------------------------------------------------------- the loop's bookkeeping


class Scripted:
    """Each row counts up from its last prompt token; a row whose count reaches its stop value
    emits EOS. It checks the masks and positions the loop hands it, and keeps one history
    per row (its state), so dropping the wrong rows would change the outputs."""

    def __init__(self, stops: dict[int, int], vocab: int = 40):
        self.stops, self.vocab, self.calls = stops, vocab, 0

    def step(self, input_ids, attention_mask, position_ids, state):
        self.calls += 1
        if state is None:
            # Left padding: each row's mask is 0...0 1...1 and its positions count its real tokens.
            state = []
            for ids, mask, pos in zip(input_ids.tolist(), attention_mask.tolist(), position_ids.tolist()):
                real = [i for i, m in zip(ids, mask) if m]
                assert mask == sorted(mask) and ids[: len(ids) - len(real)] == [PAD] * (len(ids) - len(real))
                assert pos[len(ids) - len(real):] == list(range(len(real)))
                state.append(real)
        else:
            assert input_ids.shape[1] == 1
            for hist, tok, mask, pos in zip(state, input_ids[:, 0].tolist(), attention_mask.tolist(),
                                            position_ids[:, 0].tolist()):
                assert pos == len(hist) and sum(mask) == len(hist) + 1 and mask[-1] == 1
                hist.append(tok)
        logits = torch.full((len(state), self.vocab), float("-inf"))
        for b, hist in enumerate(state):
            nxt = hist[-1] + 1
            logits[b, EOS if nxt == self.stops.get(hist[0]) else nxt] = 0.0
        return logits, state

    def select(self, state, rows):
        return [state[r] for r in rows.tolist()]


def test_decode_stops_rows_at_eos_caps_the_rest_and_drops_finished_rows():
    # First prompt token names the row; rows start counting at their last prompt token.
    prompts = [[30, 3], [31, 5, 6, 10], [32, 20], [33, 4]]
    stops = {30: 6, 31: 12, 33: 5}  # row 2 never stops
    dec = Scripted(stops)
    outs = decode(dec, prompts, prompt_keys(0, range(4)), eos_id=EOS, pad_id=PAD, max_new_tokens=6)
    assert outs == [([4, 5, EOS], True), ([11, EOS], True), ([21, 22, 23, 24, 25, 26], False), ([EOS], True)]
    # One prefill plus one step per token after the first; the loop stops at the cap without a last forward.
    assert dec.calls == 6


def test_decode_stops_when_every_row_has_finished():
    dec = Scripted({30: 5, 31: 6})
    outs = decode(dec, [[30, 3], [31, 3]], prompt_keys(0, range(2)), eos_id=EOS, pad_id=PAD, max_new_tokens=40)
    assert outs == [([4, EOS], True), ([4, 5, EOS], True)]
    assert dec.calls == 3


def test_length_sorted_batches_cover_every_index_once():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert [[lengths[i] for i in b] for b in batches] == [[9, 9, 7], [4, 3, 2], [1]]


# --------------------------------------------------------------------------- a real model


def prompt_rows(tok, n: int) -> list[list[int]]:
    words = ["the", "food", "was", "great", "but", "service", "slow", "and", "the", "staff", "rude"]
    return [tok(" ".join(words[: 1 + (3 * i) % len(words)]), add_special_tokens=False).input_ids for i in range(n)]


@torch.no_grad()
def reference_sample(model, vocab: int, prompt: list[int], key: torch.Tensor, max_new: int, temperature: float,
                     top_p: float) -> list[int]:
    """One prompt, no padding, no cache: the whole sequence through the model at every step."""
    seq, out = list(prompt), []
    for t in range(max_new):
        logits = model(torch.tensor([seq])).logits[:, -1].float()
        logits[:, vocab:] = float("-inf")
        tok = sample_tokens(logits, step_uniforms(key.view(1), t), temperature, top_p).item()
        out.append(tok)
        seq.append(tok)
        if tok == EOS:
            break
    return out


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_generate_matches_uncached_unpadded_sampling(tiny, toy_tokenizer, temperature, top_p):
    tok = toy_tokenizer
    rows = prompt_rows(tok, 12)
    max_new = 24
    samples = generate(tiny, tok, list(range(12)), rows, max_new_tokens=max_new, temperature=temperature,
                       top_p=top_p, batch_size=5, seed=11)
    keys = prompt_keys(11, range(12))
    for i, s in enumerate(samples):
        assert s.prompt == i and s.prompt_ids == rows[i]
        assert s.response_ids == reference_sample(tiny, len(tok), rows[i], keys[i], max_new, temperature, top_p)
        assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
    finished = [s for s in samples if s.finished]
    capped = [s for s in samples if not s.finished]
    assert finished and capped, "the fixture should give both outcomes"
    assert all(s.response_ids[-1] == EOS and s.response_ids.count(EOS) == 1 for s in finished)
    assert all(len(s.response_ids) == max_new and EOS not in s.response_ids for s in capped)
    assert all(max(s.response_ids) < len(tok) for s in samples)


def test_generate_is_deterministic_and_independent_of_batching(tiny, toy_tokenizer):
    tok = toy_tokenizer
    rows = prompt_rows(tok, 16)
    run = lambda **kw: [s.response_ids for s in generate(tiny, tok, rows, rows, max_new_tokens=30,
                                                         **{"seed": 5, "batch_size": 16, **kw})]
    full = run()
    assert run() == full
    assert run(batch_size=1) == full and run(batch_size=3) == full
    assert run(seed=6) != full
    # A shard sampled with its global indices draws exactly what the full run drew (multi-process sampling).
    shard = [1, 4, 9, 15]
    part = generate(tiny, tok, [rows[i] for i in shard], [rows[i] for i in shard], max_new_tokens=30, seed=5,
                    batch_size=2, indices=shard)
    assert [s.response_ids for s in part] == [full[i] for i in shard]


def test_model_decoder_masks_padded_rows(tiny, toy_tokenizer):
    vocab = len(toy_tokenizer)
    logits, cache = ModelDecoder(tiny, vocab).step(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long),
                                                   torch.tensor([[0, 1]]), None)
    assert logits.shape == (1, vocab + 16) and logits.dtype == torch.float32
    assert bool(torch.isinf(logits[:, vocab:]).all()) and bool(torch.isfinite(logits[:, :vocab]).all())
    assert cache.get_seq_length() == 2


def test_score_samples_keeps_order_under_length_sorted_batches(tiny, toy_tokenizer):
    from aligndistil_cli.model.sampling import Sample, score_samples

    tok = toy_tokenizer
    rows = prompt_rows(tok, 7)
    samples = [Sample(None, p, [5 + i] * (1 + (5 * i) % 7) + [EOS], "", True) for i, p in enumerate(rows)]
    got = score_samples(tiny, tok, samples, batch_size=3)
    for s, value in zip(samples, got):
        # By hand, one sample at a time in float64: sum of log-softmax at the response positions.
        seq = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = tiny(seq).logits[0].double()
        logits[:, len(tok):] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        start = len(s.prompt_ids)
        expected = sum(logp[start - 1 + k, t].item() for k, t in enumerate(s.response_ids))
        assert value == pytest.approx(expected, abs=1e-4)
