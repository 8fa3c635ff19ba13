"""distill: train the student on the cached teacher (off-policy AlignDistil).

No teacher model is loaded. The cache is checked against the student's
tokenizer, the data and the sequence lengths before any step runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import fingerprint_data, fingerprint_model, fingerprint_tokenizer, finalize, input_record, prepare_output
from ..cache import TeacherCache
from ..config import DistillConfig
from ..data import PAIR_FIELDS, collate, encode, load_rows
from ..errors import UserError
from ..losses import chunked_reverse_kl, position_weights
from ..modeling import load_model, load_tokenizer, output_head, pick_device, response_hidden, save_model, sequence_ids
from ..training import seed_everything, step_batches, total_steps, train


def check_cache(cache: TeacherCache, config: DistillConfig, tokenizer) -> None:
    """Refuse a cache built for other data, another tokenizer or other lengths, naming the difference."""
    inputs = cache.manifest["inputs"]
    if inputs["data"]["fingerprint"] != fingerprint_data(config.data):
        raise UserError(f"teacher cache {cache.path} was computed on other data "
                        f"({inputs['data']['path']}), not {config.data}")
    if inputs["tokenizer"]["fingerprint"] != fingerprint_tokenizer(tokenizer):
        raise UserError(f"teacher cache {cache.path} was computed with a different tokenizer than the student's ({config.student})")
    settings = cache.index["settings"]
    for key in ("max_length", "max_prompt_length"):
        if settings[key] != getattr(config, key):
            raise UserError(f"teacher cache {cache.path} has {key}={settings[key]} but distill was given {getattr(config, key)}")


def run(config: DistillConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    cache = TeacherCache(Path(config.cache))
    tokenizer = load_tokenizer(config.student)
    check_cache(cache, config, tokenizer)
    rows = load_rows(config.data, PAIR_FIELDS)
    examples = [encode(tokenizer, r["prompt"], r["chosen"], config.max_length, config.max_prompt_length) for r in rows]
    if len(examples) != cache.num_rows:
        raise UserError(f"teacher cache {cache.path} has {cache.num_rows} rows, data {config.data} has {len(examples)}")
    model = load_model(config.student, device)
    weight, bias = output_head(model)
    vocab = len(tokenizer)
    out = prepare_output(Path(config.out))

    def loss_fn(chunk):
        row_ids = [i for i, _ in chunk]
        batch = collate([e for _, e in chunk], tokenizer.pad_token_id).to(device)
        teacher = cache.fetch(row_ids)
        if teacher["coef"].shape[0] != int(batch.loss_mask.sum()):
            raise UserError(f"teacher cache {cache.path} does not match the tokenised data at rows {row_ids[:4]}...")
        logprobs = teacher["teacher_logprobs"]
        kl = chunked_reverse_kl(response_hidden(model, batch), lambda s, e: logprobs[s:e], weight, bias, vocab,
                                config.chunk_size)
        coef = teacher["coef"].to(device)
        loss = (position_weights(coef, sequence_ids(batch), len(chunk)) * kl).sum()
        return loss, {"kl_teacher": kl.mean().item(), "alpha_mean": teacher["alpha"].mean().item(),
                      "coef_mean": teacher["coef"].mean().item(), "tvd_mean": teacher["tvd"].mean().item()}

    items = list(enumerate(examples))
    n_steps = total_steps(len(items), config.batch_size, config.epochs, config.max_steps)
    steps = step_batches(items, config.batch_size, config.epochs, config.seed, config.max_steps)
    summary = train(model, steps, n_steps, loss_fn, config, out, "distill")
    save_model(model, tokenizer, out)
    inputs = {"student": input_record("model", config.student, fingerprint_model(config.student)),
              "cache": input_record("teacher-cache", config.cache, cache.index["settings_key"]),
              "data": input_record("data", config.data, fingerprint_data(config.data))}
    finalize(out, "distill", config, inputs, summary)
    return out
