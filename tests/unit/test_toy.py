"""Unit tests for aligndistil_cli.data.toy: the gold reward's rules and the tokenizer/model round trip.

Gold-reward values are worked out by hand from the rules in toy.py's docstring.
"""

from __future__ import annotations

import random

import pytest

from aligndistil_cli.data import toy
from aligndistil_cli.data.toy import gold_reward


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the pizza was good .", 1.0),
        ("the pizza was very good .", 2.0),               # very doubles
        ("the pizza was not bad .", 0.5),                 # not: -1 * -0.5
        ("the pizza was not great .", -1.0),              # not: 2 * -0.5
        ("the pizza was not very good .", -1.0),          # 1 * 2 * -0.5
        ("i did not like the staff .", -0.5),             # like = +1, negated
        ("i loved the pizza . the soup was bad .", 0.5),  # (2 + -1) / 2
        ("i did not like the soup . the pizza was good .", 0.25),  # not stays in its sentence: (-0.5 + 1) / 2
        ("great great great .", 2.0),                     # 6 clipped to 2
        ("awful terrible hated .", -2.0),                 # -6 clipped to -2
        ("the pizza was very great .", 2.0),              # 4 clipped to 2
        ("the pizza was okay .", 0.0),                    # okay has no value
        ("the pizza was good . the soup was", 0.5),       # text after the last "." is a sentence: (1 + 0) / 2
        ("the pizza was good . <eos>", 1.0),              # EOS text is ignored
        ("", 0.0),
        ("   ", 0.0),
        (". . .", 0.0),
    ],
)
def test_gold_reward_hand_values(text, expected):
    assert gold_reward(text) == pytest.approx(expected)


def test_gold_reward_long_answer_is_not_better():
    one = "the pizza was good ."
    assert gold_reward(" ".join([one] * 5)) == pytest.approx(1.0)  # mean, not sum


def test_gold_reward_in_range_for_sampled_responses():
    rng = random.Random(1234)
    prompts = toy.all_prompts()
    rewards = [gold_reward(toy.sample_response(rng, rng.choice(prompts))) for _ in range(2000)]
    assert all(-2.0 <= r <= 2.0 for r in rewards)
    # the task is not degenerate: both signs and both extremes occur
    assert min(rewards) == -2.0 and max(rewards) == 2.0


def test_vocabulary_special_ids():
    vocab = toy.vocabulary()
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_prompt_split_is_deterministic_and_disjoint():
    train, heldout = toy.split_prompts(seed=0)
    assert len(train) + len(heldout) == 7 * 16 * 15  # days x ordered pairs of distinct items
    assert not set(train) & set(heldout)
    assert toy.split_prompts(seed=0) == (train, heldout)


TEXTS = [
    "we visited on monday . write a review about the pizza and the staff .",
    "the pizza was very good . i did not like the staff .",
    "i loved the soup",
    "overall it was okay . i will come back .",
]


def test_tokenizer_and_model_round_trip(tmp_path, toy_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = toy_tokenizer
    config = toy.model_config(len(tok), 32, 1, 2, 64, 32)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    tok2 = AutoTokenizer.from_pretrained(out)
    model2 = AutoModelForCausalLM.from_pretrained(out)

    assert len(tok2) == len(tok) == len(toy.vocabulary())
    assert (tok2.pad_token_id, tok2.bos_token_id, tok2.eos_token_id) == (0, 1, 2)
    vocab = toy.vocabulary()
    for text in TEXTS:
        expected = [1] + [vocab[w] for w in text.split()]  # BOS, then one id per word, no EOS
        assert tok(text).input_ids == expected
        assert tok2(text).input_ids == expected
        assert tok2(text, add_special_tokens=False).input_ids == expected[1:]
        assert tok2.decode(tok2(text).input_ids, skip_special_tokens=True) == text
        assert tok2.decode(expected[1:] + [2], skip_special_tokens=True) == text
    # unknown words map to <unk> (id 3) instead of failing
    assert tok2("the zebra").input_ids == [1, vocab["the"], 3]

    # the embedding is padded past the tokenizer to a multiple of 32
    assert model2.config.vocab_size > len(tok2)
    assert model2.config.vocab_size % 32 == 0
    assert model2.get_input_embeddings().weight.shape[0] == model2.config.vocab_size
    assert model2.get_output_embeddings().weight.shape[0] == model2.config.vocab_size
    assert (model2.config.bos_token_id, model2.config.eos_token_id, model2.config.pad_token_id) == (1, 2, 0)

    # the reloaded weights are the saved ones
    ids = torch.tensor([tok(TEXTS[0]).input_ids])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, model2.eval()(ids).logits)


@pytest.mark.parametrize("vocab_size, expected", [(60, 64), (64, 96), (1, 32)])
def test_model_config_padding(vocab_size, expected):
    assert toy.model_config(vocab_size, 32, 1, 2, 64, 32).vocab_size == expected
