"""train-dpo / train-reverse-dpo: DPO against reference log-probs computed once, or a baseline (--loss).

The reference log-probs of every pair are computed before training, cached
as safetensors keyed by (reference weights, tokenizer, data, lengths), and
reused by the reverse run, which swaps chosen and rejected. Training steps run
only the policy, on chosen and rejected concatenated into one forward pass.

The reference is a frozen copy of the initial model, loaded only when the cache
lacks its log-probs and freed before the policy loads. Under torchrun both are
sharded and only rank 0 reads the weights, so no other rank holds a whole copy.

--loss simpo needs no reference at all. --loss tdpo1|tdpo2 needs the reference's
whole distribution at every response position: the frozen reference runs live on
the step's batch (its hidden states), and its head is applied chunk by chunk inside
the policy's fused head pass (losses.fused.fused_token_logps_kl). docs/guide.md says why
live rather than cached.
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
from aligndistil_cli.losses.fused import fused_token_logps_kl, head_logits
from aligndistil_cli.losses.preference import TDPO_VERSIONS, simpo_loss, tdpo_kl_weights, tdpo_loss
from aligndistil_cli.model.loading import (
    bf16_enabled,
    head_logps,
    hub_options,
    load_student,
    load_teacher,
    load_tokenizer,
    output_head,
    pick_device,
    response_hidden,
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


def policy_logps(model, pairs, pad_id: int, vocab: int, chunk_size: int, device, pack=collate_for(False),
                 average: bool = False):
    """(chosen [B], rejected [B]) for the DPO loss: differentiable, from one fused head pass; with average,
    each sequence's mean over its response tokens instead of its sum (SimPO's 1/|y| log pi(y|x)).

    The head's gradient is gathered per pair (chosen +1, rejected -1): DPO's gradient depends on a
    pair only through chosen - rejected, so one weight-gradient accumulator per pair suffices, half of
    one per sequence. chosen is rebuilt as that margin plus the detached rejected sum: its value is
    exact, and only chosen - rejected carries a gradient, so use it in losses of the margin only.
    """
    batch = pack(collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)).to(device)
    seq = sequence_ids(batch)
    n = len(pairs)
    lengths = torch.bincount(seq, minlength=2 * n).float() if average else torch.ones(2 * n, device=seq.device)
    coefs = torch.where(seq < n, 1.0, -1.0) / lengths[seq]
    margin, logps = head_logps(model, batch, vocab, chunk_size, seq % n, coefs, n)
    per_seq = torch.zeros(2 * n, dtype=torch.float32, device=logps.device).index_add_(0, seq, logps) / lengths
    rejected = per_seq[n:]
    return margin + rejected, rejected


class ReferenceHead:
    """The reference's log-probs at a batch's response positions, one chunk at a time, from its hidden
    states [N, H] and its head; each target's log-prob is kept on the way (u's reference term).

    The head runs in float32 with autocast off: the reference is the target of TDPO's KL, and its
    logits rounded to bf16 would move it (as they would a teacher's, teacher.compose.exact_float32)."""

    def __init__(self, hidden: torch.Tensor, head: tuple, targets: torch.Tensor, vocab: int):
        self.hidden, self.head, self.targets, self.vocab = hidden.float(), head, targets, vocab
        self.target_logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)

    def __call__(self, start: int, end: int) -> torch.Tensor:
        with torch.autocast(self.hidden.device.type, enabled=False):
            log_q = torch.log_softmax(head_logits(self.hidden[start:end], *self.head, self.vocab), dim=-1)
        self.target_logps[start:end] = log_q.gather(1, self.targets[start:end].unsqueeze(1)).squeeze(1)
        return log_q


def tdpo_terms(model, ref, ref_head: tuple, pairs, pad_id: int, vocab: int, chunk_size: int, device,
               kl_weights: tuple[float, float], pack=collate_for(False)) -> dict[str, torch.Tensor]:
    """tdpo_loss's inputs [B] each (policy and reference log-probs, sequential KLs of chosen and rejected), from
    one forward of each model and one fused head pass of the policy, in which the reference's head runs too.

    ref_head: the reference's (weight, bias) in float32. kl_weights: tdpo_kl_weights(version, alpha). As
    in policy_logps, one gradient accumulator per pair: with chosen +1, rejected -1 and these KL weights,
    each pair's fused sum has the gradient of TDPO's sigmoid argument / beta, which "chosen" carries (its
    value exact); every other term is detached, so use the result with tdpo_loss of the same version only.
    """
    batch = pack(collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)).to(device)
    seq, n = sequence_ids(batch), len(pairs)
    targets = batch.targets[batch.loss_mask]
    with torch.no_grad():
        reference = ReferenceHead(response_hidden(ref, batch), ref_head, targets, vocab)
    chosen = seq < n
    coefs = torch.where(chosen, 1.0, -1.0)
    kl_coefs = torch.where(chosen, *kl_weights)
    # The body first: under FSDP its forward gathers the (tied) head, which is sharded before it.
    hidden = response_hidden(model, batch)
    weight, bias = output_head(model)
    total, logps, kl = fused_token_logps_kl(hidden, targets, weight, bias, reference, seq % n, coefs, kl_coefs, n,
                                            vocab, chunk_size)

    def per_seq(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(2 * n, dtype=torch.float32, device=x.device).index_add_(0, seq, x)

    lp, ref_lp, seq_kl = per_seq(logps), per_seq(reference.target_logps), per_seq(kl)
    return {"policy_chosen_logps": total + (lp[:n] - total.detach()), "policy_rejected_logps": lp[n:],
            "ref_chosen_logps": ref_lp[:n], "ref_rejected_logps": ref_lp[n:], "chosen_kl": seq_kl[:n],
            "rejected_kl": seq_kl[n:]}


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


def reward_metrics(reward_c: torch.Tensor, reward_r: torch.Tensor) -> dict:
    """The step's metrics from the implicit rewards [B] of chosen and rejected (a loss's own rewards)."""
    return {"reward_chosen": reward_c.mean().item(), "reward_rejected": reward_r.mean().item(),
            "reward_accuracy": (reward_c > reward_r).float().mean().item(),
            "margin": (reward_c - reward_r).mean().item()}


def dpo_step(config: DpoConfig, model, batching: dict, ref: dict):
    """DPO's loss_fn over chunks of (pair, index) items; batching: policy_logps' pad_id, vocab, chunk_size, device
    and pack; ref: the cached reference log-probs of every pair."""
    # Reverse DPO is DPO on swapped pairs with the same reference: swap the data, not the loop.
    ref_chosen, ref_rejected = (ref["rejected"], ref["chosen"]) if config.reverse else (ref["chosen"], ref["rejected"])

    def loss_fn(chunk):
        idx = torch.tensor([i for _, i in chunk])
        pc, pr = policy_logps(model, [p for p, _ in chunk], **batching)
        rc, rr = ref_chosen[idx].to(batching["device"]), ref_rejected[idx].to(batching["device"])
        loss = dpo_loss(pc, pr, rc, rr, beta=config.beta)
        with torch.no_grad():
            return loss, reward_metrics(config.beta * (pc - rc), config.beta * (pr - rr))

    return loss_fn


def simpo_step(config: DpoConfig, model, batching: dict):
    """SimPO's loss_fn: reward beta * (1/|y|) log pi(y|x), no reference."""

    def loss_fn(chunk):
        ac, ar = policy_logps(model, [p for p, _ in chunk], **batching, average=True)
        loss = simpo_loss(ac, ar, beta=config.beta, gamma=config.simpo_gamma)
        with torch.no_grad():
            return loss, reward_metrics(config.beta * ac, config.beta * ar)

    return loss_fn


def tdpo_step(config: DpoConfig, model, batching: dict, ref_model):
    """TDPO1's or TDPO2's loss_fn, with the frozen reference run live on every micro-batch."""
    ref_head = tuple(t.float() if t is not None else None for t in output_head(ref_model))  # once, not per step
    kl_weights = tdpo_kl_weights(config.loss, config.tdpo_alpha)

    def loss_fn(chunk):
        terms = tdpo_terms(model, ref_model, ref_head, [p for p, _ in chunk], kl_weights=kl_weights, **batching)
        loss = tdpo_loss(**terms, beta=config.beta, alpha=config.tdpo_alpha, version=config.loss)
        with torch.no_grad():
            metrics = reward_metrics(config.beta * (terms["policy_chosen_logps"] - terms["ref_chosen_logps"]),
                                     config.beta * (terms["policy_rejected_logps"] - terms["ref_rejected_logps"]))
        # sequential KL(ref || pi) per response: TDPO keeps the chosen one from growing (TDPO2 stops its gradient)
        return loss, {**metrics, "kl_chosen": terms["chosen_kl"].mean().item(),
                      "kl_rejected": terms["rejected_kl"].mean().item()}

    return loss_fn


def load_live_reference(config: DpoConfig, device):
    """TDPO's frozen reference, run live on every micro-batch: the --model weights (a LoRA run's base), whole on
    every rank, in bf16 where the precision says so (as the live teachers are)."""
    dtype = torch.bfloat16 if bf16_enabled(config.precision, device) else torch.float32
    return load_teacher(config.model, device, dtype, config.attn_implementation, False, **hub_options(config))


def pair_packing(model, ref_model, config: DpoConfig, stage: str):
    """Each pair's prompt once (packing.pack_shared) where packing removes enough work; TDPO's reference runs
    the same packed rows, so both models must take them."""
    packed = enable_padding_free(model, config.padding_free, stage)
    if ref_model is not None:
        packed = enable_padding_free(ref_model, packed, f"{stage} (reference)") and packed
    return collate_for(packed, MIN_PADDING, pairs=True)


def run(config: DpoConfig) -> Path:
    stage = "train-reverse-dpo" if config.reverse else "train-dpo"
    seed_everything(config.seed)
    device = pick_device(config.device)
    rows, data_stats = load_data(config, "pairs")
    tokenizer = load_tokenizer(config.model, **hub_options(config))
    vocab = len(tokenizer)
    pairs, truncated = encode_pairs(tokenizer, rows, config, data_stats)
    out = prepare_output(Path(config.out), stage, config.force, checkpoint.scratch(config.resume))
    inputs = {"model": input_record("model", config.model, fingerprint_model(config.model)), "data": data_input(config)}
    if config.loss == "dpo":  # before the policy loads: the reference is freed by then
        ref, ref_path = cached_reference_logps(config, tokenizer, pairs, device, stage)
        inputs["ref_logps"] = input_record("ref-logps", ref_path, ref_path.stem)
    model = load_student(config.model, device, config)
    ref_model = load_live_reference(config, device) if config.loss in TDPO_VERSIONS else None
    pack = pair_packing(model, ref_model, config, stage)
    batching = {"pad_id": tokenizer.pad_token_id, "vocab": vocab, "chunk_size": config.chunk_size, "device": device,
                "pack": pack}
    if config.loss == "dpo":
        loss_fn = dpo_step(config, model, batching, ref)
    elif ref_model is None:
        loss_fn = simpo_step(config, model, batching)
    else:
        loss_fn = tdpo_step(config, model, batching, ref_model)
    items = [((r, c) if config.reverse else (c, r), i) for i, (c, r) in enumerate(pairs)]
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
    finalize(out, stage, config, inputs, {**summary, "train_tokens": train_tokens, "pairs": len(pairs),
                                          "truncated": truncated, "data": data_stats})
    return out
