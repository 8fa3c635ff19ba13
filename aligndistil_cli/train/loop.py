"""The one training loop every training stage shares, plus progress and metrics.

A stage supplies its batches and a loss function; the loop owns the optimizer,
the schedule, clipping, logging and the non-finite guard. There is no mode
switch in here: what differs between SFT, DPO and distillation is the loss.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from aligndistil_cli.config.groups import Tracking
from aligndistil_cli.core.console import progress, stderr
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import config_dict, sha256_json
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.parallel.distributed import rank_micro_batches
from aligndistil_cli.rundir.artifacts import json_line, portable_config
from aligndistil_cli.train import checkpoint, tracking

# Fields that may differ between a run and its resumption.
RESUME_FREE = ("resume", "force", "save_every", "keep_checkpoints", "log_every", "device", "fsdp_cpu_offload",
               "shard_teachers", "checkpoint_format", "report_to", "run_name", "project", "push_to_hub", "hub_private")

LossFn = Callable[[object], tuple[torch.Tensor, dict]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def total_steps(num_items: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    steps = math.ceil(num_items / batch_size) * epochs
    return min(steps, max_steps) if max_steps else steps


def epoch_orders(num_items: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """A fresh shuffle per epoch, from a generator seeded by (seed, epoch)."""
    for epoch in range(epochs if epochs else 1):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        yield torch.randperm(num_items, generator=gen).tolist()


GROUP_BATCHES = 32


def group_by_length(order: list[int], lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """Sort each window of GROUP_BATCHES batches by length, then shuffle the batches.

    Batches then hold sequences of similar length (little padding) while the
    data order stays random at the scale of a window.
    """
    window = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [i for b in perm for i in batches[b]]


def step_batches(items: list, batch_size: int, epochs: int, seed: int, max_steps: int | None,
                 lengths: list[int] | None = None) -> Iterator[list]:
    """Yield one list of items per optimizer step, over shuffled epochs, at most max_steps.

    With lengths, batches are grouped by length (group_by_length).
    """
    produced = 0
    for epoch, order in enumerate(epoch_orders(len(items), epochs, seed)):
        if lengths is not None:
            order = group_by_length(order, lengths, batch_size, seed * 1000 + epoch)
        for start in range(0, len(order), batch_size):
            if max_steps and produced >= max_steps:
                return
            yield [items[i] for i in order[start : start + batch_size]]
            produced += 1






def accumulate(loss_fn: LossFn, batch: list, n: int, precision: str, device, model=None,
               weight: Callable[[list], float] = len) -> tuple[torch.Tensor, dict]:
    """Forward + backward over this rank's micro-batches; each loss is weighted by its share of the global batch.

    weight(micro) is what the micro-batch's loss is a mean over (sequences by
    default, tokens for a token mean; the number of sequences is up to the
    stage when loss_fn drops or adds some); shares are taken of the sum over all
    ranks, so N ranks compute the loss and gradient of one process. A metric
    loss_fn returns is a mean over the micro-batch's sequences, or a
    (mean, count) pair for a mean over count other things (tokens, positions);
    each is averaged over the global batch with those weights. The loss runs
    inside the model's forward (fsdp.redirect). Returns the global loss and
    metrics, reduced over ranks.
    """
    from aligndistil_cli.model.loading import autocast

    micros = rank_micro_batches(batch, n)
    # weight runs on every micro-batch, padding too, and before any forward: a weight that samples
    # (on-policy) then runs as many collectives on every rank, all with the step's starting weights.
    weights = [float(weight(m)) * live for m, live in micros]
    sizes = [float(len(m)) if live else 0.0 for m, live in micros]
    whole, sequences = distributed.all_reduce_sum(torch.tensor([sum(weights), sum(sizes)], dtype=torch.float64)).tolist()
    # FSDP averages gradients over ranks, but each rank's loss is already its share of the global loss.
    scale = distributed.world_size() if model is not None and fsdp.is_sharded(model) else 1
    total = 0.0
    extras: dict[str, float] = {}
    counted: dict[str, list[float]] = {}  # the (mean, count) metrics: [sum of mean * count, sum of counts]
    for (micro, live), w, size in zip(micros, weights, sizes):
        share = w / whole
        with autocast(precision, device):
            loss, extra = fsdp.redirect(model, loss_fn, micro)
        # Under several ranks every rank must run every backward; the reduced loss carries the verdict.
        if not torch.isfinite(loss) and distributed.world_size() == 1:
            return loss.detach(), extra
        (loss * (share * scale)).backward()
        total += loss.item() * share
        for k, v in extra.items():
            if isinstance(v, tuple):
                sums = counted.setdefault(k, [0.0, 0.0])
                sums[0] += v[0] * v[1] * live
                sums[1] += v[1] * live
            else:
                extras[k] = extras.get(k, 0.0) + v * (size / sequences)
    if distributed.world_size() > 1:
        keys, pairs = sorted(extras), sorted(counted)
        flat = [total] + [extras[k] for k in keys] + [x for k in pairs for x in counted[k]]
        summed = distributed.all_reduce_sum(torch.tensor(flat, dtype=torch.float64)).tolist()
        total, extras = summed[0], dict(zip(keys, summed[1 : 1 + len(keys)]))
        counted = {k: summed[1 + len(keys) + 2 * i : 3 + len(keys) + 2 * i] for i, k in enumerate(pairs)}
    extras.update({k: num / max(den, 1e-30) for k, (num, den) in counted.items()})
    return torch.tensor(total), extras


def lr_lambda(total: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_ratio of the peak."""
    warmup = int(total * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return f


class MetricsWriter:
    """metrics.jsonl: one JSON object per logged step, flushed as it goes.

    On resume the file is cut back to the checkpoint's step first, so the
    finished file equals that of an uninterrupted run. Every record written
    also goes to sink (the --report-to trackers); previous_last_step is the
    last step the interrupted run had written.
    """

    def __init__(self, path: Path, resume_step: int = 0, sink: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.sink = sink
        self.previous_last_step = 0
        kept = []
        if resume_step and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    break
                self.previous_last_step = max(self.previous_last_step, record.get("step", 0))
                if record.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        self.f = open(self.path, "w", encoding="utf-8")
        self.f.writelines(kept)

    def write(self, record: dict) -> None:
        self.f.write(json_line(record))
        self.f.flush()
        if self.sink is not None:
            self.sink(record)

    def close(self) -> None:
        self.f.close()


class _Discard:
    """The metrics writer of ranks other than 0, which write no files."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@torch.no_grad()
def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every weight is finite, on every rank (a sharded parameter is checked by the rank holding each part).

    A sum is finite when every element is, unless it overflows: the sums go first (a twentieth of the cost of
    checking each element on CPU), and only a non-finite one has every element looked at.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    suspect = not torch.isfinite(torch.stack([t.sum() for t in local]).sum())
    bad = suspect and not all(torch.isfinite(t).all() for t in local)
    return distributed.all_reduce_max(float(bad)) == 0


def _nonfinite(what: str, out: Path, hint: str) -> UserError:
    """The one line a run stopped by a non-finite loss, gradient or weight ends with; nothing is finalised."""
    saved = checkpoint.latest(out)
    return UserError(f"{what}; stopping. " + (f"The last good checkpoint, {saved}, is intact (--resume). " if saved
                                              else "No checkpoint was written yet. ") + hint)


def _resume_point(resume: bool, out: Path, model, optimizer, schedule, config_hash: str, inputs: dict, desc: str) -> int:
    if not resume:
        return 0
    found = checkpoint.latest(out)
    if found is None:
        stderr.print(f"{desc}: --resume given but {out}/checkpoints has no complete checkpoint; starting at step 0")
        return 0
    step = checkpoint.load(found, model, optimizer, schedule, config_hash, inputs)
    stderr.print(f"{desc}: resuming from {found} (step {step})")
    return step


def train(model, steps: Iterator, n_steps: int, loss_fn: LossFn, cfg, out: Path, desc: str,
          monitor: Callable | None = None, weight: Callable[[list], float] = len) -> dict:
    """Optimise model over `steps` (one batch per optimizer step); return summary metrics.

    cfg is a training stage's config (config.groups.TRAINING). Writes out/metrics.jsonl and, every
    cfg.save_every steps, a checkpoint that `--resume` continues from: the
    batches before it are skipped, not recomputed. monitor(model) -> metrics
    runs every cfg.eval_every steps and at the end (monitor.py). weight(micro)
    is what loss_fn's loss is a mean over (accumulate).

    Under torchrun the model is sharded with FSDP2 (by modeling.load_student, or
    here, in place); every rank runs its share of each batch and only rank 0 writes files.
    """
    from aligndistil_cli.model.loading import bf16_enabled, pick_device

    device = pick_device(cfg.device)  # where the model computes (under offload its parameters rest on the CPU)
    fsdp.shard(model, bf16_enabled(cfg.precision, device), cfg.fsdp_cpu_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(n_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    # Paths relative to OUT's parent (the run root), so that a moved run directory still resumes.
    config_hash = sha256_json(portable_config({k: v for k, v in config_dict(cfg).items() if k not in RESUME_FREE},
                                              Path(out).parent))
    inputs = checkpoint.input_fingerprints(cfg)
    sharded = cfg.checkpoint_format == "sharded"
    if sharded and cfg.save_every:
        distributed.check_shared_dir(out, "--out")  # every rank writes its own shards of each checkpoint there
    first = _resume_point(cfg.resume, out, model, optimizer, schedule, config_hash, inputs, desc)
    writer = MetricsWriter(out / "metrics.jsonl", first) if distributed.is_main() else _Discard()
    trackers = tracking.start(Tracking.of(cfg), out, config_dict(cfg), first, getattr(writer, "previous_last_step", 0))
    writer.sink = trackers.log
    model.train()
    start = time.perf_counter()
    recent: list[float] = []
    last: dict = {}
    skipped = 0
    try:
        with progress(desc, n_steps) as advance:
            advance(first)
            for step, batch in enumerate(itertools.islice(steps, first, None), start=first + 1):
                optimizer.zero_grad(set_to_none=True)
                loss, extra = accumulate(loss_fn, batch, cfg.grad_accum, cfg.precision, device, model, weight)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    skipped += 1
                    what = "loss" if not torch.isfinite(loss) else "gradient"
                    if skipped > cfg.skip_nonfinite:
                        raise _nonfinite(f"{desc}: non-finite {what} at step {step}", out,
                                         "--skip-nonfinite N tolerates N such steps.")
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    advance(info=f"skipped non-finite {what} ({skipped})")
                    continue
                optimizer.step()
                if not weights_finite(params):
                    raise _nonfinite(f"{desc}: the weights became non-finite at step {step} (loss {loss.item():.4g}, "
                                     f"lr {schedule.get_last_lr()[0]:.3g})", out, "Try a lower --lr.")
                schedule.step()
                recent = (recent + [loss.item()])[-20:]
                last = {"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
                        "grad_norm": grad_norm.item(), "elapsed_s": round(time.perf_counter() - start, 3), **extra}
                if monitor is not None and (step % cfg.eval_every == 0 or step == n_steps):
                    last.update(fsdp.redirect(model, monitor, model))
                if step % cfg.log_every == 0 or step == n_steps or "eval_reward" in last:
                    writer.write(last)
                if cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                    checkpoint.save(out, step, model, optimizer, schedule, config_hash, cfg.keep_checkpoints,
                                    inputs, sharded)
                # Throughputs a stage reports (on-policy: rollout and training tokens/s) show beside the loss.
                rates = "".join(f"  {k.removesuffix('_tokens_per_s')} {v:,.0f} tok/s"
                                for k, v in extra.items() if k.endswith("_tokens_per_s"))
                advance(info=f"loss {sum(recent) / len(recent):.4f}{rates}")
    finally:
        writer.close()
        trackers.close()
    model.eval()
    return {"steps": last.get("step", first), "final_loss": last.get("loss"), "resumed_from": first,
            "nonfinite_skipped": skipped, "train_seconds": round(time.perf_counter() - start, 2)}
