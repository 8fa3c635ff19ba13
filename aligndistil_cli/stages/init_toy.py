"""init-toy: write the embedded task's data and a randomly initialised model.

Outputs: sft.jsonl (prompt/response), prompts.jsonl (training prompts),
heldout_prompts.jsonl, and model/ (Llama config + word-level tokenizer, with
embedding rows padded past the tokenizer so padded-vocabulary masking is
exercised on every run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligndistil_cli.config.stages import InitToyConfig
from aligndistil_cli.data import toy
from aligndistil_cli.model.loading import quiet_transformers, save_model
from aligndistil_cli.rundir.artifacts import prepare_output
from aligndistil_cli.rundir.finish import finalize


def run(config: InitToyConfig) -> Path:
    from transformers import LlamaForCausalLM

    quiet_transformers()
    out = prepare_output(Path(config.out), "init-toy", config.force)
    train_prompts, heldout = toy.split_prompts(config.seed)
    toy.write_jsonl(out / "sft.jsonl", toy.sft_rows(train_prompts, config.num_sft, config.seed))
    toy.write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    toy.write_jsonl(out / "heldout_prompts.jsonl", [{"prompt": p} for p in heldout])

    tokenizer = toy.build_tokenizer()
    torch.manual_seed(config.seed)
    cfg = toy.model_config(len(tokenizer), config.hidden_size, config.num_layers, config.num_heads,
                           config.intermediate_size, config.pad_vocab_to)
    model = LlamaForCausalLM(cfg)
    save_model(model, tokenizer, out / "model")
    metrics = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
        "embedding_rows": cfg.vocab_size,
        "train_prompts": len(train_prompts),
        "heldout_prompts": len(heldout),
        "sft_examples": config.num_sft,
    }
    finalize(out, "init-toy", config, inputs={}, metrics=metrics)
    return out
