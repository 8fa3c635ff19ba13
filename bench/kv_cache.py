"""Decode with a dynamic vs a static (or preallocated) KV cache, side by side, on the embedded task's shapes and a bigger one.

Each variant samples the same prompts with the same per-prompt random streams through
sampling.decode; every variant must return the same tokens (checked). Variants run in turn,
their order rotated each repetition, after one untimed warm-up round. Prints tokens/s and
each variant's time over the dynamic cache's (ratio of summed wall times), and writes
bench/results/kv_cache.json.

Usage: python -m bench.kv_cache [--device cpu|cuda] [--reps 3] [--shapes tiny-prefs,tiny-eval,cpu-512]
       [--against OLD_SAMPLING_PY] [--variants NAME,...]

--against times another sampling.py's decode loop (e.g. `git show BASE:aligndistil_cli/sampling.py`)
with its own dynamic-cache decoder beside ours, to measure the loop's own per-token work.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

from aligndistil_cli.model.loading import quiet_transformers
from aligndistil_cli.model.sampling import ModelDecoder, decode, prompt_keys
from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
EOS, PAD = 2, 0

# tiny-*: pipelines/tiny.yaml's model (init-toy: hidden 128, 4 layers, 4 heads, intermediate 256, the toy
# vocabulary padded to 64) at make-prefs' batch (512) and evaluate's default batch (128), 48 new tokens,
# EOS drawn with probability 1/16 per step (the SFT model's answers average 16 tokens). cpu-512: a bigger model.
SHAPES = {
    "tiny-prefs": dict(hidden=128, layers=4, heads=4, intermediate=256, vocab=64, batch=512, new=48,
                       prompt=(8, 24), mean_length=16),
    "tiny-eval": dict(hidden=128, layers=4, heads=4, intermediate=256, vocab=64, batch=128, new=48,
                      prompt=(8, 24), mean_length=16),
    "cpu-512": dict(hidden=512, layers=8, heads=8, intermediate=1408, vocab=32000, batch=32, new=128,
                    prompt=(32, 64), mean_length=64),
    # The smoke run of `make test` (tests/integration/test_bench_smoke.py), not timed for any decision.
    "smoke": dict(hidden=16, layers=1, heads=2, intermediate=32, vocab=64, batch=4, new=8, prompt=(4, 8),
                  mean_length=4),
}


def build(shape: dict, device) -> tuple[torch.nn.Module, list[list[int]]]:
    """A random Llama whose head has a bias on EOS, so answers end after mean_length tokens on average."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         intermediate_size=shape["intermediate"], max_position_embeddings=512,
                         eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(shape["hidden"], shape["vocab"], bias=True)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)
        head.bias.zero_()
        # The other logits are near 0: p(EOS) = e^b / (V - 1 + e^b) = 1 / mean_length.
        head.bias[EOS] = math.log((shape["vocab"] - 1) / (shape["mean_length"] - 1))
    model.lm_head = head
    model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    lo, hi = shape["prompt"]
    prompts = [torch.randint(3, shape["vocab"], (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(shape["batch"])]
    return model, prompts


def load_sampling(path: str):
    """Another version of sampling.py, imported inside this package so its relative imports resolve."""
    spec = importlib.util.spec_from_file_location("aligndistil_cli._bench_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def variants(model, shape: dict, against) -> dict:
    """name -> a function that decodes the shape's prompts once and returns decode's output."""
    vocab, new = shape["vocab"], shape["new"]
    common = dict(eos_id=EOS, pad_id=PAD, max_new_tokens=new, device=next(model.parameters()).device)

    def ours(kv_cache: str, **kw):
        return lambda prompts, keys: decode(ModelDecoder(model, vocab, kv_cache, new), prompts, keys, **common, **kw)

    out = {
        "dynamic": ours("dynamic"),
        "static": ours("static"),
        "preallocated": ours("preallocated"),
        "static, rows kept": ours("static", drop_finished=False),
        "dynamic, host check every 8 steps": ours("dynamic", check_every=8),
    }
    if against is not None:
        out["base loop, dynamic"] = lambda prompts, keys: against.decode(against.ModelDecoder(model, vocab), prompts,
                                                                         keys, **common)
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_shape(name: str, shape: dict, device, reps: int, against, only) -> dict:
    model, prompts = build(shape, device)
    keys = prompt_keys(0, range(len(prompts)))
    fns = variants(model, shape, against)
    if only:
        fns = {k: f for k, f in fns.items() if k == "dynamic" or k in only}
    names = list(fns)
    outputs, wall, cpu = {}, {k: [] for k in names}, {k: [] for k in names}
    warmup_s = {}
    for rep in range(reps + 1):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for k in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            result = fns[k](prompts, keys)
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep == 0:
                warmup_s[k] = dt
                outputs[k] = result
            else:
                wall[k].append(dt)
                cpu[k].append(dc)
    reference = outputs["dynamic"]
    same = {k: outputs[k] == reference for k in names}
    tokens = sum(len(ids) for ids, _ in reference)
    res = {"shape": shape, "generated_tokens": tokens, "mean_response_length": tokens / len(prompts),
           "eos_rate": sum(done for _, done in reference) / len(prompts), "same_tokens_as_dynamic": same,
           "warmup_s": warmup_s, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": {}, "ratio_to_dynamic": {},
           "cpu_ratio_to_dynamic": {}}
    for k in names:
        res["tokens_per_s"][k] = tokens * reps / sum(wall[k])
        res["ratio_to_dynamic"][k] = sum(wall[k]) / sum(wall["dynamic"])
        res["cpu_ratio_to_dynamic"][k] = sum(cpu[k]) / sum(cpu["dynamic"])
    if "base loop, dynamic" in names:
        res["dynamic_over_base_loop"] = sum(wall["dynamic"]) / sum(wall["base loop, dynamic"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(k for k in SHAPES if k != "smoke"))
    ap.add_argument("--against", default=None, help="Another sampling.py whose decode loop to time beside ours.")
    ap.add_argument("--variants", default=None, help="Comma-separated variant names to time (default: all); "
                    "dynamic is always timed, as the reference.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_cache.json"))
    args = ap.parse_args()
    quiet_transformers()
    device = torch.device(args.device)
    against = load_sampling(args.against) if args.against else None
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps,
           "against": args.against, "load_average": list(os.getloadavg()), "shapes": {}}
    for name in args.shapes.split(","):
        r = run_shape(name, SHAPES[name], device, args.reps, against,
                      args.variants.split(",") if args.variants else None)
        res["shapes"][name] = r
        print(f"{name}: batch {r['shape']['batch']}, {r['generated_tokens']} tokens "
              f"(mean length {r['mean_response_length']:.1f})")
        for k, ratio in r["ratio_to_dynamic"].items():
            print(f"  {k:36s} {r['tokens_per_s'][k]:9.0f} tok/s   ÷ dynamic {ratio:.3f} wall, "
                  f"{r['cpu_ratio_to_dynamic'][k]:.3f} CPU   same tokens: {r['same_tokens_as_dynamic'][k]}")
        if "dynamic_over_base_loop" in r:
            print(f"  dynamic ÷ base loop: {r['dynamic_over_base_loop']:.3f}", flush=True)
        # After every shape, so that a run cut short by a time limit keeps the shapes it finished.
        res["load_average_end"] = list(os.getloadavg())
        write_result(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
