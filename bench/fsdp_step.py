"""FSDP2 on one device against the plain path: the step time of an SFT step (issue 11).

    python3 -m torch.distributed.run --nproc-per-node 1 -m bench.fsdp_step [--preset gpu|cpu] [--quick] \
        [--out bench/results-fsdp.json]

Under torchrun with world size 1, two copies of the bench model (same seed)
train side by side: one plain, one sharded with the project's fsdp.shard. Both
go through training.accumulate (the sharded one through forward redirection)
and AdamW, timed round-robin. Reports the median step times and their ratio
(target: FSDP2 / plain <= 1.05).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from aligndistil_cli.model.loading import sequence_logps
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.train.loop import accumulate
from bench import write_result
from bench.run import CHUNK, PRESETS, QUICK, build_model, device_name, make_batch, summary, time_interleaved

TARGET = 1.05


@dataclass
class BenchConfig:
    """What every rank must agree on (distributed.session compares its hash across ranks)."""

    device: str
    preset: str
    quick: bool


def step_fn(model, batch, vocab: int, precision: str, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def loss_fn(micro):
        return -sequence_logps(model, micro[0], vocab, CHUNK).sum() / micro[0].loss_mask.sum(), {}

    def step():
        optimizer.zero_grad(set_to_none=True)
        accumulate(loss_fn, [batch], 1, precision, device, model)
        optimizer.step()

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="A smaller batch and fewer steps (a smoke test).")
    parser.add_argument("--out", type=Path, default=Path("bench/results-fsdp.json"))
    args = parser.parse_args(argv)
    if not distributed.launched():
        raise SystemExit("run under torchrun: python3 -m torch.distributed.run --nproc-per-node 1 -m bench.fsdp_step")
    p = {**PRESETS[args.preset], **(QUICK if args.quick else {})}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with distributed.session(BenchConfig(device, args.preset, args.quick)):
        device = distributed.device(device)
        precision = "bf16" if device.type == "cuda" else "fp32"
        plain, sharded = (build_model(p, 0, torch.float32, device) for _ in range(2))
        fsdp.shard(sharded, bf16=device.type == "cuda")
        batch = make_batch(p, device)
        steps = {name: step_fn(m, batch, p["vocab"], precision, device)
                 for name, m in (("plain", plain), ("fsdp2", sharded))}
        timed = summary(time_interleaved(steps, p["warmup"], p["steps"], device))
    median = timed["median_s"]
    result = {"device": device_name(device), "torch": torch.__version__, "preset": args.preset, "quick": args.quick,
              **timed, "ratio_fsdp2_over_plain": median["fsdp2"] / median["plain"], "target": TARGET}
    if distributed.is_main():
        write_result(args.out, result)
        print(f"{result['device']}: plain {median['plain']:.4f} s, FSDP2 {median['fsdp2']:.4f} s per step, "
              f"ratio {result['ratio_fsdp2_over_plain']:.3f} (target <= {TARGET})")
    return result


if __name__ == "__main__":
    main()
