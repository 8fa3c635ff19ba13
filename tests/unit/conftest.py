"""Fixtures shared by the sampling tests (test_sampling.py, test_kv_cache.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(toy_tokenizer):
    """A random tiny Llama whose head is nearly flat over the real tokens (so EOS comes at
    varied steps) and strongly favours the padded rows, which must never be sampled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(toy_tokenizer)
    config = LlamaConfig(vocab_size=vocab + 16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=toy_tokenizer.pad_token_id, eos_token_id=toy_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
        model.lm_head.weight[vocab:] = model.model.embed_tokens.weight[:16] * 50
    return model
