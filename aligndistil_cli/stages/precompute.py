"""precompute: run the DPO and reverse-DPO models (and the reference when the
variant needs it) once over prompt + chosen, and store the composed teacher.

Only response positions go through the output heads, in chunks of positions,
and the teacher is composed in float32 (losses.compose_teacher_full).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import (fingerprint_data, fingerprint_model, fingerprint_tokenizer, finalize, input_record,
                         prepare_output, sha256_json)
from ..cache import STORE_DTYPES, plan_shards, shard_is_done, write_index, write_shard
from ..config import PrecomputeConfig
from ..data import PAIR_FIELDS, collate, encode, load_rows
from ..errors import UserError
from ..losses import NEEDS_REFERENCE, compose_teacher_full, head_logits
from ..modeling import load_model, load_tokenizer, output_head, pick_device, response_hidden
from ..training import progress, seed_everything

TEACHER_SETTINGS = ("variant", "beta", "kl_coef", "alpha_scale", "alpha_eps", "temperature", "format",
                    "dtype", "max_length", "max_prompt_length")
POSITION_CHUNK = 1024


def check_same_tokenizers(named: dict[str, object]) -> str:
    """All models must share one tokenizer; return its fingerprint or name the odd one out."""
    prints = {name: fingerprint_tokenizer(tok) for name, tok in named.items()}
    first_name, first = next(iter(prints.items()))
    for name, fp in prints.items():
        if fp != first:
            raise UserError(f"tokenizer of {name} differs from that of {first_name}; all models must share one tokenizer")
    return first


@torch.no_grad()
def teacher_for_batch(models: dict, batch, config: PrecomputeConfig, vocab: int) -> dict[str, torch.Tensor]:
    """Composed teacher at the batch's response positions, chunk by chunk of positions."""
    hidden = {name: response_hidden(m, batch) for name, m in models.items()}
    heads = {name: output_head(m) for name, m in models.items()}
    out: dict[str, list[torch.Tensor]] = {"teacher_logprobs": [], "coef": [], "alpha": [], "tvd": []}
    n = next(iter(hidden.values())).shape[0]
    for s in range(0, n, POSITION_CHUNK):
        logits = {name: head_logits(h[s : s + POSITION_CHUNK], *heads[name], vocab) for name, h in hidden.items()}
        teacher = compose_teacher_full(
            logits["dpo"], logits["rev"], ref_logits=logits.get("ref"), variant=config.variant, beta=config.beta,
            kl_coef=config.kl_coef, alpha_scale=config.alpha_scale, alpha_eps=config.alpha_eps,
            temperature=config.temperature, vocab_size=vocab,
        )
        out["teacher_logprobs"].append(torch.log_softmax(teacher.logits, -1).to(STORE_DTYPES[config.dtype]).cpu())
        for key in ("coef", "alpha", "tvd"):
            out[key].append(getattr(teacher, key).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def run(config: PrecomputeConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    names = {"dpo": config.dpo, "rev": config.rev}
    if config.variant in NEEDS_REFERENCE:
        names["ref"] = config.ref
    tokenizers = {name: load_tokenizer(path) for name, path in names.items()}
    tok_fp = check_same_tokenizers({f"{n} ({p})": tokenizers[n] for n, p in names.items()})
    tokenizer = tokenizers["dpo"]
    vocab = len(tokenizer)
    rows = load_rows(config.data, PAIR_FIELDS)
    examples = [encode(tokenizer, r["prompt"], r["chosen"], config.max_length, config.max_prompt_length) for r in rows]
    inputs = {name: input_record("model", path, fingerprint_model(path)) for name, path in names.items()}
    inputs["data"] = input_record("data", config.data, fingerprint_data(config.data))
    inputs["tokenizer"] = {"kind": "tokenizer", "fingerprint": tok_fp}
    settings = {k: getattr(config, k) for k in TEACHER_SETTINGS}
    settings_key = sha256_json({"settings": settings, "inputs": {k: v["fingerprint"] for k, v in inputs.items()}})

    bytes_per_position = vocab * STORE_DTYPES[config.dtype].itemsize + 12
    plans = plan_shards([len(e.response) for e in examples], bytes_per_position, int(config.shard_mb * 2**20))
    out = prepare_output(Path(config.out))
    planned = {p.name for p in plans}
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in planned:
            stale.unlink()
    todo = [p for p in plans if not shard_is_done(out / p.name, p, settings_key)]
    models = {name: load_model(path, device).eval() for name, path in names.items()} if todo else {}
    with progress("precompute", sum(p.row_end - p.row_start for p in todo)) as advance:
        for plan in todo:
            parts = []
            for s in range(plan.row_start, plan.row_end, config.batch_size):
                chunk = examples[s : min(s + config.batch_size, plan.row_end)]
                parts.append(teacher_for_batch(models, collate(chunk, tokenizer.pad_token_id).to(device), config, vocab))
                advance(len(chunk))
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            lengths = torch.tensor([len(e.response) for e in examples[plan.row_start : plan.row_end]])
            tensors["row_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            write_shard(out / plan.name, plan, settings_key, tensors)

    shards = [{"file": p.name, "row_start": p.row_start, "row_end": p.row_end, "positions": p.positions} for p in plans]
    write_index(out, {"format": config.format, "vocab_size": vocab, "store_dtype": config.dtype,
                      "rows": len(examples), "positions": sum(p.positions for p in plans),
                      "settings": settings, "settings_key": settings_key, "shards": shards})
    metrics = {"rows": len(examples), "positions": sum(p.positions for p in plans), "shards": len(plans),
               "shards_reused": len(plans) - len(todo)}
    finalize(out, "precompute", config, inputs, metrics)
    return out
