"""The sampler's KV caches (kv_cache.py): every cache's next-token logits against plain full forwards.

Each check steps sampling.ModelDecoder over a left-padded batch, drops and reorders rows
mid-way, and compares every row's logits at every step with the model run on that row's
tokens alone: no padding, no cache, one full forward. Sampled tokens are compared across
caches and with the uncached reference sampler of test_sampling.py.
"""

from __future__ import annotations

import pytest
import torch

from aligndistil_cli.model import kv_cache
from aligndistil_cli.model.sampling import ModelDecoder, decode, generate, left_pad, prompt_keys, step_uniforms
from tests.unit.test_sampling import EOS, PAD, prompt_rows, reference_sample

CACHES = ("dynamic", "static", "preallocated")
PROMPTS = [[5, 9, 11], [7, 8, 9, 10, 12, 13, 14], [20, 21, 22, 23, 24], [30]]


def full_forward_logits(model, tokens: list[int]) -> torch.Tensor:
    """[V] next-token logits after `tokens`: one sequence, no padding, no cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()


@torch.no_grad()
def max_step_error(model, kind: str, steps: int = 6, drop_at: int = 3, mask_shift: int = 0) -> float:
    """Largest |logit difference| between the cached, padded, batched decoder and full forwards.

    Row b is fed PROMPTS[b] and then a fixed continuation; after step drop_at the batch keeps
    rows [3, 0, 2] (row 1 dropped, order changed) through decoder.select. mask_shift rolls the
    attention mask (a deliberate bug, to show that the check fails)."""
    gen = torch.Generator().manual_seed(3)
    cont = torch.randint(3, 40, (len(PROMPTS), steps), generator=gen).tolist()
    decoder = ModelDecoder(model, None, kind, max_new_tokens=steps + 1)
    ids, prompt_mask = left_pad(PROMPTS, PAD, "cpu")
    length = ids.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(PROMPTS), steps)], dim=1).roll(mask_shift, dims=1)
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits, state = decoder.step(ids, mask[:, :length], position, None)
    rows = list(range(len(PROMPTS)))
    worst = max((logits[i] - full_forward_logits(model, PROMPTS[r])).abs().max().item() for i, r in enumerate(rows))
    position = position[:, -1:]
    for t in range(steps):
        if t == drop_at:
            keep = torch.tensor([3, 0, 2])
            state = decoder.select(state, keep)
            rows = [rows[k] for k in keep.tolist()]
            mask, position = mask[keep], position[keep]
        new = torch.tensor([[cont[r][t]] for r in rows])
        position = position + 1
        logits, state = decoder.step(new, mask[:, : length + t + 1], position, state)
        for i, r in enumerate(rows):
            expected = full_forward_logits(model, PROMPTS[r] + cont[r][: t + 1])
            worst = max(worst, (logits[i] - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", CACHES)
def test_each_step_matches_a_full_forward(tiny, kind):
    assert max_step_error(tiny, kind) < 1e-5


@pytest.mark.parametrize("kind", CACHES)
def test_the_check_fails_on_a_mask_off_by_one(tiny, kind):
    # Rolling the mask by one column exposes a pad slot and hides a real token in every padded row.
    assert max_step_error(tiny, kind, mask_shift=1) > 1e-3


def test_the_check_fails_on_a_cache_written_one_slot_off(tiny, monkeypatch):
    layer_class = kv_cache.preallocated_layer()
    update = layer_class.update

    def shifted(self, key_states, value_states, *args, **kwargs):
        keys, _ = update(self, key_states, value_states)
        if keys.shape[-2] > len(PROMPTS[1]):  # after the prefill: the newest key lands one slot early
            self.key_buffer[:, :, keys.shape[-2] - 2] = key_states[:, :, -1]
        return self.keys, self.values

    monkeypatch.setattr(layer_class, "update", shifted)
    assert max_step_error(tiny, "preallocated") > 1e-3


def test_static_cache_masks_unwritten_slots_without_the_attention_mask(tiny):
    # The mask says 1 over every slot not written yet: the causal mask by cache position must still hide them.
    decoder = ModelDecoder(tiny, None, "static", max_new_tokens=8)
    ids, mask = left_pad(PROMPTS, PAD, "cpu")
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    wide = torch.cat([mask, mask.new_ones(len(PROMPTS), 7)], dim=1)
    _, state = decoder.step(ids, mask, position, None)
    logits, _ = decoder.step(torch.full((len(PROMPTS), 1), 17), wide, position[:, -1:] + 1, state)
    for b, p in enumerate(PROMPTS):
        assert (logits[b] - full_forward_logits(tiny, p + [17])).abs().max().item() < 1e-5


def test_caches_preallocate_what_the_loop_needs(tiny):
    for kind in ("static", "preallocated"):
        decoder = ModelDecoder(tiny, None, kind, max_new_tokens=5)
        ids, mask = left_pad(PROMPTS, PAD, "cpu")
        _, state = decoder.step(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None)
        layer = state.layers[0]
        width = layer.keys.shape[-2] if kind == "static" else layer.key_buffer.shape[-2]
        assert width == ids.shape[1] + 5 - 1, kind
    with pytest.raises(ValueError, match="max_new_tokens"):
        ModelDecoder(tiny, None, "static")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        kv_cache.resolve("paged")


def test_all_draws_at_once_equal_draws_one_step_at_a_time():
    keys = prompt_keys(4, range(9))
    table = step_uniforms(keys, torch.arange(30))
    assert table.shape == (9, 30)
    for t in range(30):
        assert torch.equal(table[:, t], step_uniforms(keys, t))


# --------------------------------------------------------------------------- sampled tokens


@pytest.mark.parametrize("kind", ["static", "preallocated"])  # dynamic: test_sampling.py
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_generate_matches_uncached_unpadded_sampling(tiny, toy_tokenizer, kind, temperature, top_p):
    tok = toy_tokenizer
    rows = prompt_rows(tok, 12)
    max_new = 24
    samples = generate(tiny, tok, rows, rows, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                       batch_size=5, seed=11, kv_cache=kind)
    keys = prompt_keys(11, range(12))
    for i, s in enumerate(samples):
        assert s.response_ids == reference_sample(tiny, len(tok), rows[i], keys[i], max_new, temperature, top_p)
    lengths = {len(s.response_ids) for s in samples if s.finished}
    assert len(lengths) >= 3 and any(not s.finished for s in samples), "rows should end at varied steps and at the cap"


@pytest.mark.parametrize("kind", CACHES)
def test_samples_do_not_depend_on_batch_size(tiny, toy_tokenizer, kind):
    tok = toy_tokenizer
    rows = prompt_rows(tok, 16)
    run = lambda **kw: [s.response_ids for s in generate(tiny, tok, rows, rows, max_new_tokens=30, seed=5,
                                                         kv_cache=kind, **kw)]
    full = run(batch_size=16)
    assert run(batch_size=3) == full and run(batch_size=7) == full
    assert [s.response_ids for s in generate(tiny, tok, rows, rows, max_new_tokens=30, seed=5, batch_size=16,
                                             kv_cache="dynamic")] == full


@pytest.mark.parametrize("kind", CACHES)
def test_rows_kept_or_checked_late_draw_the_same_tokens(tiny, toy_tokenizer, kind):
    rows = prompt_rows(toy_tokenizer, 10)
    keys = prompt_keys(2, range(10))
    vocab = len(toy_tokenizer)
    run = lambda **kw: decode(ModelDecoder(tiny, vocab, kind, 20), rows, keys, eos_id=EOS, pad_id=PAD,
                              max_new_tokens=20, top_p=0.9, **kw)
    base = run()
    assert run(drop_finished=False) == base and run(check_every=7) == base
    assert any(done for _, done in base) and any(not done for _, done in base)


def test_kv_cache_option_is_the_same_in_every_sampling_stage():
    import dataclasses

    from aligndistil_cli.config.stages import DistillConfig, EvaluateConfig, MakePrefsConfig
    from aligndistil_cli.core.errors import ConfigError

    fields = {cls: {f.name: f for f in dataclasses.fields(cls)}["kv_cache"]
              for cls in (MakePrefsConfig, EvaluateConfig, DistillConfig)}
    assert {f.default for f in fields.values()} == {"auto"}
    assert {f.metadata["choices"] for f in fields.values()} == {kv_cache.KV_CACHES}
    assert fields[DistillConfig].metadata["help"] == "On-policy: " + fields[MakePrefsConfig].metadata["help"]
    with pytest.raises(ConfigError, match="'kv_cache' must be one of auto, dynamic, static, preallocated"):
        MakePrefsConfig(out="o", model="m", data="d", kv_cache="paged")
    assert kv_cache.resolve("auto") == "dynamic"
