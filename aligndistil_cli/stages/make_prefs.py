"""make-prefs: sample k responses per prompt, score them, keep best vs worst.

Pairs are (highest, lowest) score; prompts whose samples all score the same
are skipped and counted. This is the DPO paper's controlled-sentiment recipe.
"""

from __future__ import annotations

from pathlib import Path

from aligndistil_cli.config.stages import MakePrefsConfig
from aligndistil_cli.data.encode import data_input, encode_prompts, load_data
from aligndistil_cli.data.sources import is_conversational
from aligndistil_cli.data.toy import write_jsonl
from aligndistil_cli.eval.scoring import make_scorer
from aligndistil_cli.model.loading import hub_options, load_model, load_tokenizer, pick_device
from aligndistil_cli.model.sampling import generate
from aligndistil_cli.parallel import distributed
from aligndistil_cli.rundir.artifacts import fingerprint_model, input_record, prepare_output
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.train.loop import seed_everything


def best_vs_worst(prompt: str, texts: list[str], scores: list[float]) -> dict | None:
    """The (highest, lowest) scored pair, or None when there is no strict preference."""
    hi = max(range(len(texts)), key=lambda i: scores[i])
    lo = min(range(len(texts)), key=lambda i: scores[i])
    if scores[hi] == scores[lo] or texts[hi] == texts[lo]:
        return None
    return {"prompt": prompt, "chosen": texts[hi], "rejected": texts[lo],
            "score_chosen": scores[hi], "score_rejected": scores[lo]}


def as_row(pair: dict, conversational: bool) -> dict:
    """A pair in the layout of its prompt: strings for a prompt the data gave as a string, else messages, so that
    --chat-template auto renders the pair as it rendered the prompt the responses were sampled for."""
    if not conversational:
        return {**pair, "prompt": pair["prompt"][0]["content"]}
    return {**pair, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def run(config: MakePrefsConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    rows, data_stats = load_data(config, "prompts")
    tokenizer = load_tokenizer(config.model, **hub_options(config))
    rows, ids = encode_prompts(tokenizer, rows, config, data_stats)
    rows, ids = rows[: config.max_prompts], ids[: config.max_prompts]
    prompts = [r["prompt"] for r in rows]
    model = load_model(config.model, device, **hub_options(config))
    out = prepare_output(Path(config.out), "make-prefs", config.force)
    repeated = [p for p in prompts for _ in range(config.num_samples)]
    repeated_ids = [p for p in ids for _ in range(config.num_samples)]
    samples = generate(model, tokenizer, repeated, repeated_ids, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, top_p=config.top_p, batch_size=config.batch_size,
                       seed=config.seed, desc="make-prefs", split=True,
                       kv_cache=config.kv_cache)
    scorer = make_scorer(config.reward_model, config.chat_template, device)
    scores = distributed.split_map(scorer.score, samples)
    pairs, skipped = [], 0
    k = config.num_samples
    for i, prompt in enumerate(prompts):
        # An empty response (EOS first) cannot be a training target.
        group = [(s.text, sc) for s, sc in zip(samples[i * k : (i + 1) * k], scores[i * k : (i + 1) * k]) if s.text.strip()]
        pair = best_vs_worst(prompt, [t for t, _ in group], [sc for _, sc in group]) if len(group) >= 2 else None
        if pair is None:
            skipped += 1
            continue
        pairs.append(as_row(pair, is_conversational(rows[i])))
    if distributed.is_main():
        write_jsonl(out / "pairs.jsonl", pairs)
    margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    metrics = {"prompts": len(prompts), "pairs": len(pairs), "skipped_ties": skipped,
               "mean_margin": sum(margins) / max(1, len(margins)),
               "mean_sample_score": sum(scores) / len(scores), "scorer": scorer.name, "data": data_stats}
    inputs = {"model": input_record("model", config.model, fingerprint_model(config.model)),
              "data": data_input(config)}
    finalize(out, "make-prefs", config, inputs, metrics)
    return out
