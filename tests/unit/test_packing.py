"""Padding-free batches: packing by hand, and losses and gradients equal to the padded path."""

from __future__ import annotations

import pytest
import torch

from aligndistil_cli.data.encode import Encoded, collate
from aligndistil_cli.model.packing import enable, pack

VOCAB = 37  # the models below have 40 embedding rows: three padded ones


def tiny_model(attn: str = "sdpa", seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation=attn, **extra)
    return LlamaForCausalLM(cfg)


def examples(seed: int, n: int) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(1, VOCAB, (k,), generator=gen).tolist()
    return [Encoded(ids(int(torch.randint(1, 6, (1,), generator=gen))), ids(int(torch.randint(2, 9, (1,), generator=gen))))
            for _ in range(n)]


def test_pack_by_hand():
    batch = collate([Encoded([5, 6], [7, 2]), Encoded([8], [9, 9, 2])], pad_id=0)
    packed = pack(batch)
    assert packed.input_ids.tolist() == [[5, 6, 7, 2, 8, 9, 9, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.seq_index.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert packed.cu_seqlens.tolist() == [0, 4, 8]
    # Positions 1, 2 (predicting 7, 2) of row 0 and 0, 1, 2 (predicting 9, 9, 2) of row 1.
    assert packed.loss_mask.tolist() == [[False, True, True, False, True, True, True, False]]
    assert packed.targets[packed.loss_mask].tolist() == [7, 2, 9, 9, 2]
    assert packed.num_positions.tolist() == [2, 3]


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_same(loss_a, grads_a, loss_b, grads_b):
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pack_shared_by_hand():
    from aligndistil_cli.model.packing import pack_shared, pair_groups

    # Pair 0 shares the prompt [5, 6, 7]; pair 1's prompts differ from their second token on.
    chosen = [Encoded([5, 6, 7], [8, 2]), Encoded([4, 3], [9, 2])]
    rejected = [Encoded([5, 6, 7], [9, 9, 2]), Encoded([4, 1, 1], [2])]
    batch = collate(chosen + rejected, pad_id=0)
    packed = pack_shared(batch, pair_groups(batch))
    # Pair 0 stores [5, 6] once (the last prompt token 7 predicts each response's first token, so it
    # stays in both); pair 1 shares [4].
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 2, 7, 9, 9, 2, 4, 3, 9, 2, 1, 1, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1, 2, 3, 1, 2, 3]]
    assert packed.cu_seqlens.tolist() == [0, 9, 16]
    assert packed.num_seqs == 4
    loss = packed.loss_mask[0]
    assert packed.targets[0][loss].tolist() == [8, 2, 9, 9, 2, 9, 2, 2]
    assert packed.seq_index[0][loss].tolist() == [0, 0, 2, 2, 2, 1, 1, 3]
    assert packed.num_positions.tolist() == [2, 2, 3, 1]
    index, take, mask = packed.attention_plan()
    # Each sequence gathers its pair's shared prefix and its own tokens, never the other response's;
    # a shared token takes its output from its group's first sequence.
    assert index.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 5, 6, 7, 8], [9, 10, 11, 12, 9, 9], [9, 13, 14, 15, 9, 9]]
    assert take.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 19, 20, 21]
    assert mask[1, 0].tolist()[3] == [True, True, True, True, False, False]
    assert mask[2, 0].tolist()[5] == [True, True, True, True, False, False]  # a padded slot: no empty row


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("prompts", ["same", "different"])
@pytest.mark.parametrize("shared", [False, True])
def test_dpo_loss_and_gradients_equal_padded(checkpointing, prompts, shared):
    from aligndistil_cli.losses.functions import dpo_loss
    from aligndistil_cli.model.packing import PackedBatch, collate_for
    from aligndistil_cli.stages.dpo import policy_logps

    model = tiny_model()
    if checkpointing:  # the recomputed forward must see the sequence bounds too
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    chosen, rejected = examples(1, 4), examples(2, 4)
    # "different": prompts that share only their first token, or nothing (truncated pairs can differ so).
    pairs = [(c, Encoded(c.prompt if prompts == "same" else c.prompt[:i % 2] + r.prompt, r.response))
             for i, (c, r) in enumerate(zip(chosen, rejected))]
    ref_c, ref_r = torch.tensor([-20.0, -15.0, -30.0, -9.0]), torch.tensor([-18.0, -16.0, -25.0, -12.0])

    def loss(packed: bool):
        pack = collate_for(packed, pairs=shared)
        if packed:
            assert isinstance(pack(collate([c for c, _ in pairs] + [r for _, r in pairs], 0)), PackedBatch)
        pc, pr = policy_logps(model, pairs, 0, VOCAB, 5, torch.device("cpu"), pack)
        value = dpo_loss(pc, pr, ref_c, ref_r, beta=0.3)
        return value, grads_of(model, value)

    padded = loss(False)
    assert enable(model, True, "test")
    assert_same(*padded, *loss(True))


def test_shared_prompt_reference_logps_equal_padded():
    """dpo.pair_logps (the reference cache) through pack_shared gives each sequence's own log-prob,
    computed here as a float64 forward of that sequence alone."""
    from aligndistil_cli.model.packing import collate_for
    from aligndistil_cli.stages.dpo import pair_logps

    model = tiny_model().eval()
    chosen, rejected = examples(3, 5), examples(4, 5)
    pairs = [(c, Encoded(c.prompt, r.response)) for c, r in zip(chosen, rejected)]
    assert enable(model, True, "test")
    with torch.no_grad():
        got_c, got_r = pair_logps(model, pairs, 0, VOCAB, 3, torch.device("cpu"), collate_for(True, pairs=True))
        alone = tiny_model().double().eval()
        want = []
        for e in [c for c, _ in pairs] + [r for _, r in pairs]:
            ids = torch.tensor([e.prompt + e.response])
            logits = alone(input_ids=ids).logits[0, :, :VOCAB].log_softmax(-1)
            p = len(e.prompt)
            want.append(sum(logits[p - 1 + j, t].item() for j, t in enumerate(e.response)))
    torch.testing.assert_close(torch.cat([got_c, got_r]).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_distill_loss_and_gradients_equal_padded():
    from aligndistil_cli.teacher.compose import TeacherSpec
    from aligndistil_cli.teacher.objective import teacher_loss

    model = tiny_model(seed=3)
    model.train()
    batch = collate(examples(4, 5), pad_id=0)
    n = int(batch.loss_mask.sum())
    gen = torch.Generator().manual_seed(5)
    fields = {"teacher_logprobs": torch.log_softmax(torch.randn(n, VOCAB, generator=gen), -1),
              "coef": torch.rand(n, generator=gen) + 0.1, "alpha": torch.ones(n), "tvd": torch.zeros(n)}
    spec = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)

    def loss(b):
        value, _ = teacher_loss(model, b, fields, {}, "logits", spec, VOCAB, 4)
        return value, grads_of(model, value)

    padded = loss(batch)
    assert enable(model, True, "test")
    assert_same(*padded, *loss(pack(batch)))


def test_sft_token_mean_equals_padded():
    from aligndistil_cli.model.loading import head_logps

    model = tiny_model(attn="eager", seed=6)  # eager is switched to the packed attention as well
    batch = collate(examples(7, 6), pad_id=0)

    def loss(b):
        value = -head_logps(model, b, VOCAB, 3)[0][0] / b.num_positions.sum()
        return value, grads_of(model, value)

    padded = loss(batch)
    assert enable(model, True, "test")
    assert_same(*padded, *loss(pack(batch)))


@pytest.mark.parametrize("attn, extra, why", [
    ("flex_attention", {}, "attention 'flex_attention' has no packed route"),
    ("sdpa", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}, "sliding-window"),
])
def test_unsupported_attention_falls_back_with_one_line(attn, extra, why, capsys):
    model = tiny_model(attn=attn, **extra)
    assert not enable(model, True, "sft")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "using padded batches" in err[0]
    assert model.config._attn_implementation == attn


def test_off_when_not_wanted():
    model = tiny_model()
    assert not enable(model, False, "sft") and model.config._attn_implementation == "sdpa"


def test_compile_layers_wraps_each_decoder_layer_and_keeps_names():
    from aligndistil_cli.model.loading import compile_layers, decoder_layers

    model = tiny_model()
    names = list(model.state_dict())
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    assert compile_layers(model) == 2  # lazy: nothing is compiled until a forward runs
    assert all(m._compiled_call_impl is not None for m in decoder_layers(model))
    assert list(model.state_dict()) == names, "checkpoints and save_pretrained see the same parameter names"


def test_only_batches_with_enough_padding_are_packed():
    from aligndistil_cli.model.packing import PackedBatch, collate_for, padding_fraction

    even = collate([Encoded([5, 6], [7, 8]), Encoded([9, 10], [11, 12])], pad_id=0)  # no padding
    uneven = collate([Encoded([5, 6], [7, 8, 9, 10, 11, 12]), Encoded([9], [11])], pad_id=0)  # 6 of 16 slots padded
    assert padding_fraction(even) == 0.0 and padding_fraction(uneven) == pytest.approx(6 / 16)
    pick = collate_for(True, 0.1)
    assert pick(even) is even
    assert isinstance(pick(uneven), PackedBatch)
    assert isinstance(collate_for(True)(even), PackedBatch)  # min_padding 0: always packed
    assert collate_for(False, 0.0)(uneven) is uneven
    # Pairs: storing a shared prompt once counts as removed work, as padding does.
    long_prompt = collate([Encoded([5, 6, 7, 8], [9, 2]), Encoded([5, 6, 7, 8], [10, 2])], pad_id=0)
    other_prompt = collate([Encoded([5, 6, 7, 8], [9, 2]), Encoded([4, 6, 7, 8], [10, 2])], pad_id=0)
    assert padding_fraction(long_prompt) == 0.0
    assert isinstance(collate_for(True, 0.1, pairs=True)(long_prompt), PackedBatch)  # 3 of 12 slots shared
    assert collate_for(True, 0.1, pairs=True)(other_prompt) is other_prompt
