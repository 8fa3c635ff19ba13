"""distill: train the student on the cached teacher (off-policy AlignDistil).

No teacher model is loaded. The cache is checked against the student's
tokenizer, the data and the sequence lengths before any step runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from aligndistil_cli.config.stages import DistillConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import collate, data_fingerprint, data_input, encode_rows, load_data
from aligndistil_cli.eval.monitor import make_monitor
from aligndistil_cli.model.loading import hub_options, load_student, load_tokenizer, pick_device, save_model
from aligndistil_cli.model.packing import MIN_PADDING, collate_for
from aligndistil_cli.model.packing import enable as enable_padding_free
from aligndistil_cli.rundir.artifacts import (
    fingerprint_data,
    fingerprint_model,
    input_record,
    prepare_output,
    tokenizer_difference,
    tokenizer_parts,
)
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.teacher.compose import TeacherSpec, float32_heads, realpha, spec_overrides
from aligndistil_cli.teacher.objective import FINAL_KL_ROWS, final_teacher_kl, report_final_kl, teacher_loss
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.loop import seed_everything, step_batches, total_steps, train


def check_cache(cache: TeacherCache, config: DistillConfig, tokenizer) -> None:
    """Refuse a cache built for other data, another tokenizer, other lengths or (when --dpo/--rev/--ref are
    given) other teacher models, naming the difference."""
    inputs = cache.manifest["inputs"]
    for name in ("dpo", "rev", "ref"):
        given = getattr(config, name)
        if given and name in inputs and fingerprint_model(given) != inputs[name]["fingerprint"]:
            raise UserError(f"teacher cache {cache.path} was built from another {name} model "
                            f"({inputs[name]['path']}), not {given}")
    if inputs["data"]["read_as"] != data_fingerprint(config):
        raise UserError(f"teacher cache {cache.path} {data_difference(cache.path, inputs['data'], config.data)}; "
                        "give the data it was computed on, or rerun precompute")
    mine = tokenizer_parts(tokenizer)
    if inputs["tokenizer"]["parts"] != mine:
        raise UserError(f"teacher cache {cache.path} was computed with a tokenizer that differs from the student's "
                        f"({config.student}) in: {tokenizer_difference(inputs['tokenizer']['parts'], mine)}")
    settings = cache.index["settings"]
    for key in ("max_length", "max_prompt_length"):
        if settings[key] != getattr(config, key):
            raise UserError(f"teacher cache {cache.path} has {key}={settings[key]} but distill was given {getattr(config, key)}")


def data_difference(cache: Path, recorded: dict, data: str) -> str:
    """How the data given to distill differs from the data a cache recorded (its input record)."""
    if fingerprint_data(data) == recorded["fingerprint"]:
        return f"was computed on {data} read with other settings (format, split, keys, chat template or bad rows)"
    # The recorded path, or the one relative to the cache (a moved run directory), is the one given: it changed.
    places = {os.path.realpath(recorded["path"])}
    if recorded.get("relpath"):
        places.add(os.path.realpath(Path(cache) / recorded["relpath"]))
    if os.path.realpath(data) in places:
        return f"was computed on {data}, whose content has changed since"
    return f"was computed on other data ({recorded['path']}), not {data}"




def cache_spec(cache: TeacherCache, config: DistillConfig, eos_id: int) -> TeacherSpec:
    """The cache's teacher, with r / eps / the alpha_t cap / the kept EOS overridden where the format allows it."""
    overrides = spec_overrides(config, eos_id)
    if overrides and cache.format != "hidden":
        raise UserError(f"teacher cache {cache.path} has format {cache.format!r}, which bakes the teacher in; "
                        "--alpha-scale/--alpha-eps/--alpha-max/--[no-]extrapolate-eos at distill time need a cache "
                        "with --format hidden")
    return dataclasses.replace(cache.spec, **overrides)


def cached_teacher_loss(model, cache: TeacherCache, spec: TeacherSpec, pad_id: int, vocab: int, device,
                        chunk_size: int, pack=collate_for(False)):
    """loss_fn([(row id, Encoded), ...]) -> (AlignDistil loss, metrics) against the cached teacher."""
    heads = float32_heads(cache.heads(device))

    def loss_fn(chunk):
        row_ids = [i for i, _ in chunk]
        batch = pack(collate([e for _, e in chunk], pad_id).to(device))
        fields = cache.fetch(row_ids)
        if spec != cache.spec:
            fields = realpha(fields, spec)
        if fields["coef"].shape[0] != int(batch.loss_mask.sum()):
            raise UserError(f"teacher cache {cache.path} does not match the tokenised data at rows {row_ids[:4]}...")
        return teacher_loss(model, batch, fields, heads, cache.format, spec, vocab, chunk_size)

    return loss_fn










def run(config: DistillConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    cache = TeacherCache(Path(config.cache))
    tokenizer = load_tokenizer(config.student, **hub_options(config))
    check_cache(cache, config, tokenizer)
    rows, data_stats = load_data(config, "pairs")
    examples, truncated = encode_rows(tokenizer, rows, "chosen", config, data_stats)
    if len(examples) != cache.num_rows:
        raise UserError(f"teacher cache {cache.path} has {cache.num_rows} rows, data {config.data} has {len(examples)}")
    spec = cache_spec(cache, config, tokenizer.eos_token_id)
    model = load_student(config.student, device, config)
    out = prepare_output(Path(config.out), "distill", config.force, checkpoint.scratch(config.resume))
    pack = collate_for(enable_padding_free(model, config.padding_free, "distill"), MIN_PADDING)
    loss_fn = cached_teacher_loss(model, cache, spec, tokenizer.pad_token_id, len(tokenizer), device, config.chunk_size,
                                  pack)
    items = list(enumerate(examples))
    n_steps = total_steps(len(items), config.batch_size, config.epochs, config.max_steps)
    lengths = [len(e.prompt) + len(e.response) for e in examples] if config.group_by_length else None
    steps = step_batches(items, config.batch_size, config.epochs, config.seed, config.max_steps, lengths)
    monitor = make_monitor(config, tokenizer, config.student, device)
    summary = train(model, steps, n_steps, loss_fn, config, out, "distill", monitor)
    # The same batches again, without a model: the tokens trained on (exact across --resume).
    train_tokens = sum(len(e.response) for batch in step_batches(items, config.batch_size, config.epochs,
                                                                 config.seed, config.max_steps, lengths)
                       for _, e in batch)
    probe = items[:FINAL_KL_ROWS]
    chunks = [probe[s : s + config.batch_size] for s in range(0, len(probe), config.batch_size)]
    final_kl = final_teacher_kl(model, loss_fn, chunks, config.precision, device)
    report_final_kl(out, summary["steps"], final_kl, train_tokens)
    save_model(model, tokenizer, out)
    inputs = {"student": input_record("model", config.student, fingerprint_model(config.student)),
              "cache": input_record("teacher-cache", config.cache, cache.index["settings_key"]),
              "data": data_input(config)}
    finalize(out, "distill", config, inputs, {**summary, "final_kl_teacher": final_kl, "train_tokens": train_tokens,
                                              "truncated": truncated, "data": data_stats})
    return out
