"""--eval-every: gold reward and KL to the initial model on a few prompts, during training.

The records land in metrics.jsonl (eval_reward, eval_kl, eval_length) at
those steps, so curves of reward and KL against step can be drawn.
"""

from __future__ import annotations

from typing import Callable

import torch

from aligndistil_cli.data.encode import encode_prompts, load_data, truncate
from aligndistil_cli.eval.scoring import make_scorer
from aligndistil_cli.model.loading import hub_options, load_model
from aligndistil_cli.model.sampling import generate, score_samples


def make_monitor(config, tokenizer, reference: str, device: torch.device) -> Callable | None:
    """A callback model -> metrics, or None when --eval-every is off."""
    if not config.eval_every or not config.eval_prompts:
        return None
    rows, stats = load_data(config, "prompts", config.eval_prompts)
    rows, ids = encode_prompts(tokenizer, rows[: config.eval_num_prompts], config, stats)
    prompts = [r["prompt"] for r in rows]
    ids = [truncate(tokenizer, i, [], config.max_length, config.max_prompt_length)[0].prompt for i in ids]
    ref_model = load_model(reference, device, **hub_options(config)).eval()
    scorer = make_scorer(config.reward_model, config.chat_template, device)

    def monitor(model) -> dict:
        model.eval()
        # generate() reseeds the global generator; fork it so training runs the same with or without checks.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            samples = generate(model, tokenizer, prompts, ids, max_new_tokens=config.eval_max_new_tokens,
                               seed=config.seed, desc="eval", device=device)
        own = score_samples(model, tokenizer, samples, device=device)
        ref = score_samples(ref_model, tokenizer, samples)
        model.train()
        rewards = scorer.score(samples)
        return {"eval_reward": sum(rewards) / len(rewards),
                "eval_kl": sum(o - r for o, r in zip(own, ref)) / len(own),
                "eval_length": sum(len(s.response_ids) for s in samples) / len(samples)}

    return monitor
