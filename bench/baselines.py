"""Step time of train-dpo's losses, --loss dpo | simpo | tdpo1 | tdpo2, on one machine, and what TDPO's live
reference costs against caching it.

Each step is forward + backward + AdamW through the stage's own loss code (stages.dpo: policy_logps with
dpo_loss or simpo_loss; tdpo_terms with tdpo_loss, the frozen reference run live inside the step, as the
stage runs it), the variants round-robin on the same pairs, the batch packed as the stage packs it.
DPO's reference log-probs are precomputed (the stage caches them), so they are not in its step.
Also reported: the reference's forward alone (what a cache of its hidden states would save per step),
its weights' bytes (what the live reference holds in memory) and a hidden-state cache's bytes per
response token (the disk it would take instead); on CUDA, each step's peak memory.

Usage: python -m bench.baselines [--device auto|cpu|cuda] [--preset toy|cpu|gpu|smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

import torch

from aligndistil_cli.data.encode import Encoded, collate
from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.losses.preference import simpo_loss, tdpo_kl_weights, tdpo_loss
from aligndistil_cli.model.loading import output_head, response_hidden
from aligndistil_cli.model.packing import MIN_PADDING, collate_for, enable
from aligndistil_cli.stages.dpo import policy_logps, tdpo_terms
from bench import write_result
from bench.run import autocast, build_model, summary, sync, time_interleaved

ROOT = Path(__file__).resolve().parents[1]
# pairs per step; prompt and response tokens (chosen and rejected responses each `response` long)
PRESETS = {
    # the embedded task's model (init-toy's default) and its batch of 32 pairs
    "toy": dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=256, vocab=96, real_vocab=64, pairs=32,
                prompt=16, response=24, warmup=2, steps=20),
    # bench.run's cpu preset shape: a real-sized vocabulary, where TDPO's per-token KL costs most
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=32_000, real_vocab=32_000, pairs=2,
                prompt=64, response=192, warmup=1, steps=5),
    # Qwen2.5-1.5B's shape in bf16 autocast with gradient checkpointing; 2 pairs of 1,024 + 1,024 tokens
    "gpu": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151_936, real_vocab=151_665,
                pairs=2, prompt=1024, response=1024, warmup=2, steps=8, checkpointing=True),
    "smoke": dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=512, real_vocab=500, pairs=2,
                  prompt=8, response=12, warmup=1, steps=1),
}
BETA, SIMPO_BETA, SIMPO_GAMMA, TDPO_ALPHA = 0.1, 2.5, 1.25, 0.5
CHUNK = 128  # the training stages' default --chunk-size


def make_pairs(p: dict, seed: int = 0) -> list[tuple[Encoded, Encoded]]:
    """Random pairs whose chosen and rejected share their prompt (so the shared-prompt packing applies)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, p["real_vocab"], (n,), generator=gen).tolist()

    return [(Encoded(prompt := ids(p["prompt"]), ids(p["response"])), Encoded(prompt, ids(p["response"])))
            for _ in range(p["pairs"])]


def steps(p: dict, policy, ref, pairs, device) -> tuple[dict, object]:
    """(name -> one optimizer step through that loss, the reference's forward alone on the step's batch)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    packed = enable(policy, True, "bench policy") and enable(ref, True, "bench reference")
    batching = dict(pad_id=0, vocab=p["real_vocab"], chunk_size=CHUNK, device=device,
                    pack=collate_for(packed, MIN_PADDING, pairs=True))
    ref_head = tuple(t.float() if t is not None else None for t in output_head(ref))
    with torch.no_grad(), autocast(device):  # what the stage caches before training
        rc, rr = (x.detach() for x in policy_logps(ref, pairs, **batching))

    def dpo():
        pc, pr = policy_logps(policy, pairs, **batching)
        return dpo_loss(pc, pr, rc, rr, beta=BETA)

    def simpo():
        return simpo_loss(*policy_logps(policy, pairs, **batching, average=True), beta=SIMPO_BETA, gamma=SIMPO_GAMMA)

    def tdpo(version: str):
        terms = tdpo_terms(policy, ref, ref_head, pairs, kl_weights=tdpo_kl_weights(version, TDPO_ALPHA), **batching)
        return tdpo_loss(**terms, beta=BETA, alpha=TDPO_ALPHA, version=version)

    def step(loss_fn):
        def run():
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
        return run

    batch = batching["pack"](collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id=0)).to(device)

    def ref_forward():
        with torch.no_grad(), autocast(device):
            response_hidden(ref, batch)

    return {"dpo": step(dpo), "simpo": step(simpo), "tdpo1": step(lambda: tdpo("tdpo1")),
            "tdpo2": step(lambda: tdpo("tdpo2"))}, ref_forward


def peak_memory(fns: dict, device) -> dict:
    """Peak CUDA memory allocated during one more step of each (bytes); empty on CPU."""
    if device.type != "cuda":
        return {}
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated()
    return peaks


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "baselines.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "toy")
    p = PRESETS[preset]
    policy = build_model(p, 0, torch.float32, device, p.get("checkpointing", False)).train()
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the stage loads it
    ref = build_model(p, 0, ref_dtype, device).eval().requires_grad_(False)
    pairs = make_pairs(p)
    fns, ref_forward = steps(p, policy, ref, pairs, device)
    timed = summary(time_interleaved({**fns, "tdpo reference forward": ref_forward}, p["warmup"], p["steps"], device))
    median = timed["median_cpu_s" if device.type == "cpu" else "median_s"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "preset": preset, "shape": p, "device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "commit": commit(),
        "measure": "median CPU seconds of this process" if device.type == "cpu" else "median wall seconds",
        **timed,
        "ratio_to_dpo": {k: median[k] / median["dpo"] for k in fns},
        "tdpo2 reference forward share": median["tdpo reference forward"] / median["tdpo2"],
        "reference_weight_bytes": sum(t.numel() * t.element_size() for t in ref.parameters()),
        "hidden_cache_bytes_per_response_token_bf16": p["hidden"] * 2,
        "peak_memory_bytes": peak_memory(fns, device),
    }
    write_result(args.out, result)
    print(f"{preset} preset on {result['device']}, {result['threads']} threads, load {result['load_average']}, "
          f"commit {result['commit']} ({result['measure']})")
    for name in fns:
        memory = result["peak_memory_bytes"].get(name)
        print(f"  {name:6s} {median[name] * 1e3:9.1f} ms  x{result['ratio_to_dpo'][name]:.2f} of dpo"
              + (f"  peak {memory / 2**30:.2f} GiB" if memory else ""))
    print(f"  tdpo reference forward alone: {median['tdpo reference forward'] * 1e3:.1f} ms "
          f"({result['tdpo2 reference forward share']:.0%} of a tdpo2 step); reference weights "
          f"{result['reference_weight_bytes'] / 2**20:.1f} MiB; a hidden-state cache "
          f"{result['hidden_cache_bytes_per_response_token_bf16']} B per response token")


if __name__ == "__main__":
    main()
