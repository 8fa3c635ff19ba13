"""sft: supervised fine-tuning on prompt/response pairs (loss on response tokens only)."""

from __future__ import annotations

from pathlib import Path

from aligndistil_cli.config.stages import SftConfig
from aligndistil_cli.data.encode import collate, data_input, encode_rows, load_data
from aligndistil_cli.eval.monitor import make_monitor
from aligndistil_cli.model.loading import head_logps, hub_options, load_student, load_tokenizer, pick_device, save_model
from aligndistil_cli.model.packing import MIN_PADDING, collate_for
from aligndistil_cli.model.packing import enable as enable_padding_free
from aligndistil_cli.rundir.artifacts import fingerprint_model, input_record, prepare_output
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.loop import seed_everything, step_batches, total_steps, train


def run(config: SftConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    rows, data_stats = load_data(config, "sft")
    tokenizer = load_tokenizer(config.model, **hub_options(config))
    model = load_student(config.model, device, config)
    vocab = len(tokenizer)
    examples, truncated = encode_rows(tokenizer, rows, "response", config, data_stats)
    out = prepare_output(Path(config.out), "sft", config.force, checkpoint.scratch(config.resume))
    pack = collate_for(enable_padding_free(model, config.padding_free, "sft"), MIN_PADDING)

    def loss_fn(chunk):
        batch = pack(collate(chunk, tokenizer.pad_token_id).to(device))
        # Token-mean negative log-likelihood over response tokens: one group, one weight-gradient accumulator.
        total = head_logps(model, batch, vocab, config.chunk_size)[0][0]
        n_tokens = batch.num_positions.sum()
        return -total / n_tokens, {"response_tokens_mean": n_tokens.item() / len(chunk)}

    n_steps = total_steps(len(examples), config.batch_size, config.epochs, config.max_steps)
    lengths = [len(e.prompt) + len(e.response) for e in examples] if config.group_by_length else None
    steps = step_batches(examples, config.batch_size, config.epochs, config.seed, config.max_steps, lengths)
    monitor = make_monitor(config, tokenizer, config.model, device)
    # The loss is a token mean: micro-batches (and ranks) are weighted by their response tokens.
    summary = train(model, steps, n_steps, loss_fn, config, out, "sft", monitor,
                    weight=lambda chunk: sum(len(e.response) for e in chunk))
    save_model(model, tokenizer, out)
    inputs = {"model": input_record("model", config.model, fingerprint_model(config.model)),
              "data": data_input(config)}
    finalize(out, "sft", config, inputs, {**summary, "examples": len(examples), "truncated": truncated, "data": data_stats})
    return out
