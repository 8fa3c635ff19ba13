"""A tokenizer is used as its directory saved it (tokenizer_file.as_saved), whatever class transformers picks.

transformers 5 loads a tokenizer saved next to a qwen2 config.json as Qwen2Tokenizer, which rebuilds its own
pre-tokeniser: the embedded task's word-level tokenizer then encodes its words as other tokens. The expected
ids are the toy vocabulary's, never computed by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligndistil_cli.data import toy
from aligndistil_cli.model.loading import load_tokenizer
from aligndistil_cli.model.tokenizer_file import as_saved

TEXT = "we visited on monday ."
WARNING = "encodes text differently from its tokenizer.json"


def expected_ids() -> list[int]:
    vocab = toy.vocabulary()
    return [vocab["<bos>"]] + [vocab[w] for w in TEXT.split()]


def tiny(config_class, **extra):
    return config_class(vocab_size=len(toy.vocabulary()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, **extra)


def saved_next_to(path: Path, config) -> Path:
    config.save_pretrained(path)
    toy.build_tokenizer().save_pretrained(path)
    return path


def transformers_alone(path: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(TEXT).input_ids


def test_a_tokenizer_next_to_a_qwen2_config_encodes_as_saved(tmp_path, capsys):
    from transformers import Qwen2Config

    path = saved_next_to(tmp_path, tiny(Qwen2Config))
    tok = load_tokenizer(path)
    assert tok(TEXT).input_ids == expected_ids()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    # Warned exactly when transformers alone gets it wrong (transformers 5 does, 4 read tokenizer.json).
    assert (WARNING in capsys.readouterr().err) == (transformers_alone(path) != expected_ids())


def test_a_tokenizer_transformers_loads_faithfully_is_kept(tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig

    path = saved_next_to(tmp_path, tiny(LlamaConfig))
    tok = AutoTokenizer.from_pretrained(path)
    assert as_saved(tok, str(path)) is tok
    assert load_tokenizer(path)(TEXT).input_ids == expected_ids()
    assert WARNING not in capsys.readouterr().err


def test_the_reward_model_reads_its_tokenizer_as_saved(tmp_path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from aligndistil_cli.eval.scoring import RewardModelScorer

    config = tiny(Qwen2Config, num_labels=1, pad_token_id=toy.vocabulary()["<pad>"])
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    toy.build_tokenizer().save_pretrained(tmp_path)
    assert RewardModelScorer(tmp_path, torch.device("cpu")).tokenizer(TEXT).input_ids == expected_ids()
