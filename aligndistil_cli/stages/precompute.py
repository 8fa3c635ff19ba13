"""precompute: run the DPO and reverse-DPO models (and the reference when the
variant needs it) once over prompt + chosen, and store the teacher.

Only response positions go through the output heads, in chunks of positions;
the teacher is composed in float32 (teacher.py, losses.compose_teacher_full).

Under torchrun every rank computes the same shard plan; rank r writes every
world-size-th shard, and rank 0 writes the index and manifest once all shards
are in place. The teacher models are held whole on every rank, or sharded
over the ranks with --shard-teachers; then every forward is a collective, so
every rank runs as many batches as the busiest one (a rank with fewer runs
throwaway batches) and the shards are the same either way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from aligndistil_cli.config.stages import CacheLayout, PrecomputeConfig
from aligndistil_cli.core.console import progress, say, stderr
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import sha256_json
from aligndistil_cli.data.encode import collate, data_input, encode_rows, load_data
from aligndistil_cli.eval.report import health_line
from aligndistil_cli.model.loading import (
    bf16_enabled,
    hub_options,
    load_model,
    load_teacher,
    load_tokenizer,
    pick_device,
    response_hidden,
)
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.rundir.artifacts import (
    content_key,
    fingerprint_model,
    input_record,
    prepare_output,
    recorded_path,
    writing,
)
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.teacher.cache import (
    HEADS,
    STORE_DTYPES,
    ShardRecord,
    plan_shards,
    shard_is_done,
    write_index,
    write_shard,
)
from aligndistil_cli.teacher.compose import (
    LOGITS_MAX_BYTES_PER_TOKEN,
    TeacherSpec,
    bytes_per_position,
    check_head_reproduces,
)
from aligndistil_cli.teacher.health import HEALTH_ROWS, teacher_health
from aligndistil_cli.teacher.live import check_same_tokenizers, teacher_for_batch, teacher_heads
from aligndistil_cli.train.loop import seed_everything

SHAPE_SETTINGS = ("format", "top_k", "dtype", "max_length", "max_prompt_length")




def teacher_spec(config, eos_id: int | None) -> TeacherSpec:
    """The teacher of a config with TeacherFields; eos_id is kept un-extrapolated under --no-extrapolate-eos."""
    names = [f.name for f in dataclasses.fields(TeacherSpec) if f.name != "keep_eos"]
    return TeacherSpec(**{n: getattr(config, n) for n in names}, keep_eos=None if config.extrapolate_eos else eos_id)


def choose_format(config: CacheLayout, vocab: int, hidden: int, n_models: int) -> str:
    """auto -> logits while it stays small, hidden otherwise; refuse logits when it is huge."""
    itemsize = STORE_DTYPES[config.dtype].itemsize
    logits_bytes = bytes_per_position("logits", vocab, hidden, n_models, itemsize, config.top_k)
    if config.format == "auto":
        return "logits" if logits_bytes <= LOGITS_MAX_BYTES_PER_TOKEN else "hidden"
    if config.format == "logits" and logits_bytes > LOGITS_MAX_BYTES_PER_TOKEN:
        raise UserError(f"--format logits would store {logits_bytes / 1024:.0f} KB per token for a vocabulary of "
                        f"{vocab}; use --format hidden (exact, {n_models * hidden * itemsize / 1024:.1f} KB/token) "
                        f"or --format topk")
    if config.format == "topk" and config.top_k >= vocab:
        raise UserError(f"--top-k {config.top_k} must be smaller than the vocabulary ({vocab})")
    return config.format






def save_heads(path: Path, heads: dict, dtype: torch.dtype) -> None:
    """Each teacher's output head (teacher_heads; float32 holds the load dtype's values exactly), once per cache
    (format "hidden")."""
    tensors = {f"{name}.{part}": t.detach().to(dtype).cpu().contiguous()
               for name, head in heads.items() for part, t in zip(("weight", "bias"), head) if t is not None}
    with writing(path):
        save_file(tensors, str(path))


def check_heads(models: dict, heads: dict, labels: dict, batch, vocab: int) -> None:
    """The hidden format is only exact if head(h) is each model's logits: checked once, on real data."""
    for name, m in models.items():
        check_head_reproduces(m, labels[name], batch, fsdp.redirect(m, response_hidden, m, batch), heads[name], vocab)


def shard_parts(todo: list, examples: list, batch_size: int, lockstep: bool, teacher: Callable,
                advance: Callable) -> Iterator[tuple]:
    """(plan, [teacher(rows, first) of each batch]) for each shard plan of todo, batch_size rows a batch.

    lockstep (sharded teachers, whose every forward is a collective): every
    rank runs as many batches as the busiest one, whose work may differ (every
    N-th shard, some already done on a rerun); past its own batches a rank runs
    throwaway ones. first is True for the rank's first batch, real or throwaway.
    """
    batches = [(p, s, min(s + batch_size, p.row_end)) for p in todo for s in range(p.row_start, p.row_end, batch_size)]
    runs = int(distributed.all_reduce_max(len(batches))) if lockstep else len(batches)
    parts = []
    for i in range(runs):
        if i >= len(batches):
            teacher(examples[:batch_size], i == 0)  # computed and discarded: pairs up with the others' forwards
            continue
        plan, start, end = batches[i]
        parts.append(teacher(examples[start:end], i == 0))
        advance(end - start)
        if end == plan.row_end:
            yield plan, parts
            parts = []


def shard_tensors(parts: list[dict], examples: list) -> dict[str, torch.Tensor]:
    """One shard's tensors: the batches' fields concatenated, plus row_offsets into them."""
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    lengths = torch.tensor([len(e.response) for e in examples])
    tensors["row_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return tensors


def reference_path(config: PrecomputeConfig) -> str | None:
    """The reference of the health check: --ref, else the model the DPO model was trained from (its manifest)."""
    if config.ref:
        return config.ref
    manifest = Path(config.dpo) / "manifest.json"
    record = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {}).get("model") \
        if manifest.is_file() else None
    return str(recorded_path(record, manifest.parent)) if record else None


def check_health(config: PrecomputeConfig, models: dict, heads: dict, spec: TeacherSpec, examples: list, tokenizer,
                 device, dtype: torch.dtype) -> dict | None:
    """The teacher health check (health.py) on the first chosen responses, printed to stderr: precompute's
    user hears that the teacher would not stop before spending a distillation on it."""
    ref = reference_path(config)
    if "ref" not in models and ref:
        ref_model = load_model(ref, device, dtype, config.attn_implementation, **hub_options(config)).eval()
        models, heads = {**models, "ref": ref_model}, {**heads, **teacher_heads({"ref": ref_model})}
    health = teacher_health(models, heads, spec, examples[:HEALTH_ROWS], tokenizer.pad_token_id, len(tokenizer),
                            tokenizer.eos_token_id, config.batch_size, device)
    if health:
        say(health_line(health))
        if health["warning"]:
            stderr.print(f"[yellow]{health['warning']}[/yellow]", highlight=False)
    return health


def run(config: PrecomputeConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    models_of = TeacherSpec(config.variant, config.beta, config.kl_coef, config.alpha_scale, config.alpha_eps,
                            config.temperature).models
    paths = {"dpo": config.dpo, "rev": config.rev, "ref": config.ref}
    names = {name: paths[name] for name in models_of}
    tokenizers = {name: load_tokenizer(path, **hub_options(config)) for name, path in names.items()}
    tok_record = check_same_tokenizers({f"{n} ({p})": tokenizers[n] for n, p in names.items()})
    tokenizer = tokenizers["dpo"]
    vocab = len(tokenizer)
    spec = teacher_spec(config, tokenizer.eos_token_id)
    rows, data_stats = load_data(config, "pairs")
    examples, truncated = encode_rows(tokenizer, rows, "chosen", config, data_stats)
    dtype = torch.bfloat16 if bf16_enabled(config.precision, device) else torch.float32
    models = {name: load_teacher(path, device, dtype, config.attn_implementation, config.shard_teachers,
                                 **hub_options(config))
              for name, path in names.items()}
    heads = teacher_heads(models)
    hidden_size = heads["dpo"][0].shape[1]
    fmt = choose_format(CacheLayout.of(config), vocab, hidden_size, len(models))
    inputs = {name: input_record("model", path, fingerprint_model(path)) for name, path in names.items()}
    inputs["data"] = data_input(config)
    inputs["tokenizer"] = tok_record
    settings = {**dataclasses.asdict(spec), **{k: getattr(config, k) for k in SHAPE_SETTINGS}, "format": fmt}
    # Content only, no paths: a moved run directory keeps its shards.
    settings_key = sha256_json({"settings": settings, "inputs": content_key(inputs)})

    itemsize = STORE_DTYPES[config.dtype].itemsize
    per_position = bytes_per_position(fmt, vocab, hidden_size, len(models), itemsize, config.top_k)
    plans = plan_shards([len(e.response) for e in examples], per_position, int(config.shard_mb * 2**20))
    # Read on rank 0 before prepare_output empties checkpoints/, and shared: every rank checks its own shards.
    recorded = distributed.broadcast_object({} if config.force or not distributed.is_main()
                                            else ShardRecord.read(Path(config.out)))
    out = prepare_output(Path(config.out), "precompute", config.force, keep=("shard-*.safetensors",))
    distributed.check_shared_dir(out, "--out")  # every rank writes its own shards there
    planned = {p.name for p in plans}
    if distributed.is_main():
        for stale in out.glob("shard-*.safetensors"):
            if stale.name not in planned:
                stale.unlink()
        if fmt == "hidden":
            save_heads(out / HEADS, heads, STORE_DTYPES[config.dtype])
    record = ShardRecord(out, {k: v for k, v in recorded.items() if k in planned})
    mine = plans[distributed.rank() :: distributed.world_size()]
    todo = [p for p in mine if not shard_is_done(out / p.name, p, settings_key, record.hashes.get(p.name))]
    labels = {name: f"{name} model {names[name]}" for name in models}

    def teacher(rows: list, first: bool) -> dict:
        batch = collate(rows, tokenizer.pad_token_id).to(device)
        if first and fmt == "hidden":
            check_heads(models, heads, labels, batch, vocab)
        return teacher_for_batch(models, heads, batch, spec, fmt, vocab, STORE_DTYPES[config.dtype], config.top_k)

    lockstep = any(fsdp.is_sharded(m) for m in models.values())
    with progress("precompute", sum(p.row_end - p.row_start for p in todo)) as advance:
        for plan, parts in shard_parts(todo, examples, config.batch_size, lockstep, teacher, advance):
            write_shard(out / plan.name, plan, settings_key,
                        shard_tensors(parts, examples[plan.row_start : plan.row_end]), record)

    health = check_health(config, models, heads, spec, examples, tokenizer, device, dtype)
    # Held after the last forward (a sharded teacher's gathered layers are freed again); rank 0's, in the manifest.
    teacher_bytes = sum(fsdp.local_bytes(m) for m in models.values())
    reused = len(plans) - int(distributed.all_reduce_sum(torch.tensor(len(todo))).item())
    distributed.barrier()
    shards = [{"file": p.name, "row_start": p.row_start, "row_end": p.row_end, "positions": p.positions} for p in plans]
    positions = sum(p.positions for p in plans)
    if distributed.is_main():
        write_index(out, {"format": fmt, "vocab_size": vocab, "hidden_size": hidden_size, "models": list(models),
                          "rows": len(examples), "positions": positions, "bytes_per_position": per_position,
                          "settings": settings, "settings_key": settings_key, "shards": shards})
    metrics = {"format": fmt, "rows": len(examples), "positions": positions, "shards": len(plans),
               "shards_reused": reused, "bytes_per_position": per_position, "truncated": truncated,
               "teacher_param_bytes_per_rank": teacher_bytes, "data": data_stats, "health": health}
    finalize(out, "precompute", config, inputs, metrics)
    return out
