"""train-dpo / train-reverse-dpo: DPO against reference log-probs computed once.

The reference log-probs of every pair are computed before training, cached
as safetensors keyed by (reference weights, tokenizer, data, lengths), and
reused by the reverse run, which swaps chosen and rejected. Training steps run
only the policy, on chosen and rejected concatenated into one forward pass.

The reference is a frozen copy of the initial model, loaded only when the cache
lacks its log-probs and freed before the policy loads. Under torchrun both are
sharded and only rank 0 reads the weights, so no other rank holds a whole copy.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from aligndistil_cli.config.stages import DpoConfig
from aligndistil_cli.core.console import progress
from aligndistil_cli.core.hashing import sha256_json
from aligndistil_cli.data.encode import collate, data_fingerprint, data_input, encode_pairs, load_data
from aligndistil_cli.eval.monitor import make_monitor
from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.model.loading import (
    head_logps,
    hub_options,
    load_student,
    load_teacher,
    load_tokenizer,
    pick_device,
    save_model,
    sequence_ids,
    sequence_logps,
)
from aligndistil_cli.model.packing import MIN_PADDING, collate_for
from aligndistil_cli.model.packing import enable as enable_padding_free
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.rundir.artifacts import (
    default_mode,
    fingerprint_model,
    fingerprint_tokenizer,
    input_record,
    prepare_output,
    writing,
)
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.loop import seed_everything, step_batches, total_steps, train

REF_CACHE_VERSION = 1


def pair_logps(model, pairs, pad_id: int, vocab: int, chunk_size: int, device,
               pack=collate_for(False)) -> tuple[torch.Tensor, torch.Tensor]:
    """[B], [B] summed response log-probs of chosen and rejected, in one forward pass.

    pack: collate_for(..., pairs=True) or the padded batch as it is. Packed on the host, then moved:
    pack_shared's plan is built from Python lists, which would sync a device once per tensor read."""
    batch = pack(collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)).to(device)
    logps = sequence_logps(model, batch, vocab, chunk_size)
    return logps[: len(pairs)], logps[len(pairs) :]


def policy_logps(model, pairs, pad_id: int, vocab: int, chunk_size: int, device, pack=collate_for(False)):
    """(chosen [B], rejected [B]) for the DPO loss: differentiable, from one fused head pass.

    The head's gradient is gathered per pair (chosen +1, rejected -1): DPO's gradient depends on a
    pair only through chosen - rejected, so one weight-gradient accumulator per pair suffices, half of
    one per sequence. chosen is rebuilt as that margin plus the detached rejected sum: its value is
    exact, and only chosen - rejected carries a gradient, so use it in losses of the margin only.
    """
    batch = pack(collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)).to(device)
    seq = sequence_ids(batch)
    n = len(pairs)
    coefs = torch.where(seq < n, 1.0, -1.0)
    margin, logps = head_logps(model, batch, vocab, chunk_size, seq % n, coefs, n)
    per_seq = torch.zeros(2 * n, dtype=torch.float32, device=logps.device).index_add_(0, seq, logps)
    rejected = per_seq[n:]
    return margin + rejected, rejected


@torch.no_grad()
def reference_logps(model, pairs, pad_id, vocab, chunk_size, batch_size, device, pack=collate_for(False),
                    spare: list | None = None) -> dict[str, torch.Tensor]:
    """{"chosen": [B], "rejected": [B]} summed response log-probs of pairs, batch_size pairs a forward pass.

    A sharded model's every forward is a collective: then every rank runs as many
    batches as the busiest one, past its own a throwaway one on spare (pairs of
    any rank's share; this rank's may have none).
    """
    starts = range(0, len(pairs), batch_size)
    runs = int(distributed.all_reduce_max(len(starts))) if fsdp.is_sharded(model) else len(starts)
    chosen, rejected = [], []
    with progress("reference log-probs", len(pairs)) as advance:
        for i in range(runs):
            part = pairs[starts[i] : starts[i] + batch_size] if i < len(starts) else spare
            c, r = fsdp.redirect(model, pair_logps, model, part, pad_id, vocab, chunk_size, device, pack)
            if i < len(starts):
                chosen.append(c.cpu())
                rejected.append(r.cpu())
                advance(len(c))
    return {"chosen": torch.cat(chosen or [torch.zeros(0)]), "rejected": torch.cat(rejected or [torch.zeros(0)])}


def load_reference(config: DpoConfig, device, stage: str) -> tuple[object, Callable]:
    """The reference (the initial model, frozen, in float32 as the policy's master weights) and its batch packer.

    Under torchrun it is sharded as a teacher is: it gathers one group at a time, its head for the head pass.
    """
    model = load_teacher(config.model, device, torch.float32, config.attn_implementation, shard=True,
                         **hub_options(config))
    return model, collate_for(enable_padding_free(model, config.padding_free, f"{stage} reference"), MIN_PADDING,
                              pairs=True)


def cached_reference_logps(config: DpoConfig, tokenizer, pairs, device, stage: str) -> tuple[dict, Path]:
    """Load the reference log-probs for these pairs, computing and caching them once.

    The reference model is loaded only to compute them, and freed after. Under
    torchrun each rank scores its share of the pairs, the shares are gathered in
    order, and rank 0 writes the cache.
    """
    key = sha256_json({
        "version": REF_CACHE_VERSION, "model": fingerprint_model(config.model),
        "tokenizer": fingerprint_tokenizer(tokenizer), "data": data_fingerprint(config),
        "max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
    })[:32]
    cache_dir = Path(config.ref_cache) if config.ref_cache else Path(config.out).resolve().parent / "ref-cache"
    path = cache_dir / f"ref-logps-{key}.safetensors"
    cached = distributed.broadcast_object(load_file(str(path)) if distributed.is_main() and path.is_file() else None)
    if cached is not None and cached["chosen"].shape[0] == len(pairs):
        return cached, path
    model, pack = load_reference(config, device, stage)
    mine = reference_logps(model, distributed.share(pairs), tokenizer.pad_token_id, len(tokenizer),
                           config.chunk_size, config.batch_size, device, pack, spare=pairs[:1])
    # FSDP's hooks hold the sharded model in reference cycles: collected now, before the policy loads.
    del model
    gc.collect()
    parts = distributed.gather_objects(mine)
    logps = {k: torch.cat([part[k] for part in parts]) for k in mine}
    if distributed.is_main():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with writing(path):
            save_file(logps, str(tmp), metadata={"key": key})
        default_mode(tmp)
        tmp.replace(path)
    distributed.barrier()
    return logps, path


def run(config: DpoConfig) -> Path:
    stage = "train-reverse-dpo" if config.reverse else "train-dpo"
    seed_everything(config.seed)
    device = pick_device(config.device)
    rows, data_stats = load_data(config, "pairs")
    tokenizer = load_tokenizer(config.model, **hub_options(config))
    vocab = len(tokenizer)
    pairs, truncated = encode_pairs(tokenizer, rows, config, data_stats)
    out = prepare_output(Path(config.out), stage, config.force, checkpoint.scratch(config.resume))
    ref, ref_path = cached_reference_logps(config, tokenizer, pairs, device, stage)
    model = load_student(config.model, device, config)
    # Each pair's prompt once, where packing removes enough work (packing.pack_shared).
    pack = collate_for(enable_padding_free(model, config.padding_free, stage), MIN_PADDING, pairs=True)
    # Reverse DPO is DPO on swapped pairs with the same reference: swap the data, not the loop.
    ref_chosen, ref_rejected = (ref["rejected"], ref["chosen"]) if config.reverse else (ref["chosen"], ref["rejected"])
    items = [((r, c) if config.reverse else (c, r), i) for i, (c, r) in enumerate(pairs)]

    def loss_fn(chunk):
        idx = torch.tensor([i for _, i in chunk])
        pc, pr = policy_logps(model, [p for p, _ in chunk], tokenizer.pad_token_id, vocab, config.chunk_size, device,
                              pack)
        rc, rr = ref_chosen[idx].to(device), ref_rejected[idx].to(device)
        loss = dpo_loss(pc, pr, rc, rr, beta=config.beta)
        with torch.no_grad():
            reward_c, reward_r = config.beta * (pc - rc), config.beta * (pr - rr)
        return loss, {"reward_chosen": reward_c.mean().item(), "reward_rejected": reward_r.mean().item(),
                      "reward_accuracy": (reward_c > reward_r).float().mean().item(),
                      "margin": (reward_c - reward_r).mean().item()}

    n_steps = total_steps(len(items), config.batch_size, config.epochs, config.max_steps)
    lengths = [max(len(c.prompt) + len(c.response), len(r.prompt) + len(r.response)) for c, r in pairs]
    steps = step_batches(items, config.batch_size, config.epochs, config.seed, config.max_steps,
                         lengths if config.group_by_length else None)
    monitor = make_monitor(config, tokenizer, config.model, device)
    summary = train(model, steps, n_steps, loss_fn, config, out, stage, monitor)
    # The same batches again, without a model: the response tokens trained on, chosen and rejected.
    train_tokens = sum(len(c.response) + len(r.response)
                       for batch in step_batches(items, config.batch_size, config.epochs, config.seed, config.max_steps,
                                                 lengths if config.group_by_length else None)
                       for (c, r), _ in batch)
    save_model(model, tokenizer, out)
    inputs = {"model": input_record("model", config.model, fingerprint_model(config.model)),
              "data": data_input(config),
              "ref_logps": input_record("ref-logps", ref_path, ref_path.stem)}
    finalize(out, stage, config, inputs, {**summary, "train_tokens": train_tokens, "pairs": len(pairs),
                                          "truncated": truncated, "data": data_stats})
    return out
