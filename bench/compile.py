"""--compile measured: SFT steps with eager vs torch.compile'd decoder layers, side by side.

Two copies of one random-init student (bench.run's preset shape, same weights), each trained by the
sft stage's loss (head_logps, fused) on the same batch; the first steps of the compiled copy include
compilation and are reported apart. Steady-state steps run round-robin.
Usage: python -m bench.compile [--preset cpu|gpu|1.5b] [--device auto|cpu|cuda] [--steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from aligndistil_cli.model.loading import compile_layers, quiet_transformers

from . import write_result
from .run import PRESETS, QUICK, ROOT, autocast, build_model, make_batch, pick, sft_loss, sync


def step_fn(model, batch, vocab, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        with autocast(device):
            loss = sft_loss(model, batch, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU seconds leave out other jobs on a shared machine."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=5, help="timed steady-state steps per side")
    ap.add_argument("--quick", action="store_true", help="bench.run's --quick batch")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile.json"))
    args = ap.parse_args()
    quiet_transformers()
    device = pick(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = {**PRESETS[preset], **(QUICK if args.quick else {})}
    batch = make_batch(p, device)
    dtype_note = "float32 + bf16 autocast" if device.type == "cuda" else "float32"
    eager = build_model(p, 0, torch.float32, device, p.get("checkpointing", False))
    compiled = build_model(p, 0, torch.float32, device, p.get("checkpointing", False))
    compile_layers(compiled)
    fns = {"eager": step_fn(eager, batch, p["vocab"], device), "compiled": step_fn(compiled, batch, p["vocab"], device)}
    first = {"eager": [timed(fns["eager"], device)], "compiled": [timed(fns["compiled"], device)]}
    for name in fns:  # a second warm-up step: the compiled backward may compile again
        first[name].append(timed(fns[name], device))
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.steps):
        for name, fn in fns.items():
            wall, used = timed(fn, device)
            times[name].append(wall)
            cpu[name].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    res = {"preset": preset, "quick": args.quick, "device": str(device), "dtype": dtype_note,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
           "first_two_steps_s": first, "times_s": times, "median_s": med, "compiled / eager": med["compiled"] / med["eager"],
           "cpu_times_s": cpu, "median_cpu_s": med_cpu, "compiled / eager, CPU time": med_cpu["compiled"] / med_cpu["eager"]}
    print(f"SFT step, preset {preset}{' (quick)' if args.quick else ''}, {device}: first two steps eager "
          f"{sum(w for w, _ in first['eager']):.1f} s, compiled {sum(w for w, _ in first['compiled']):.1f} s "
          f"(compilation included); "
          f"median of {args.steps}: eager {med['eager'] * 1e3:.0f} ms, compiled {med['compiled'] * 1e3:.0f} ms; "
          f"compiled / eager {res['compiled / eager']:.3f} (CPU time {res['compiled / eager, CPU time']:.3f}); "
          f"load average {res['load_average'][0]:.1f}")
    write_result(args.out, res)


if __name__ == "__main__":
    main()
