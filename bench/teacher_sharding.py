"""Teachers held whole on every rank (replicated) against sharded over the ranks (--shard-teachers), issue 11.

    python -m bench.teacher_sharding [--rounds 3] [--steps 3] [--quick] [--out bench/results/teacher_sharding.json]

Launches 2 gloo ranks with torchrun (OMP_NUM_THREADS=1) once per mode, the two
modes alternating, --rounds times each. Each launch builds two random-init
Llama teachers and a student of the same shape, shards the student with FSDP2
(as on-policy distill does under torchrun) and the teachers with
fsdp.shard_frozen (sharded mode only), then times, alternating step by step:
  - an on-policy distill step: training.accumulate over the rollout batch with
    on_policy's loss (precompute.teacher_for_batch live, distill.teacher_loss),
    gradient clipping and AdamW, sampling left out (it runs the student alone);
  - a precompute batch: teacher_for_batch on the rank's share, format hidden.
Per rank it records the teacher parameter bytes it holds (exact, from the
local shards, after the timed forwards), the bytes of the whole float32 output
heads kept beside them (a copy only where the teachers are sharded, on CPU),
and memory: VmRSS before the timed steps and the VmHWM high-water over them
(reset first, so it leaves out the loading of the full models before
sharding; not ru_maxrss, which would hold that and the torchrun agent's
high-water mark, inherited across fork + exec).

It also writes the teachers' memory per GPU for Qwen2.5-1.5B and -7B at 1, 2,
4 and 8 GPUs, COMPUTED (not measured) from their configs on the meta device.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024, vocab=8192, batch=4, prompt=32, response=96)
QUICK = dict(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=256, vocab=2048, batch=2, prompt=16, response=32)
# Qwen2.5 configs (config.json on the Hub): hidden, intermediate, layers, heads, kv heads, vocabulary, tied.
QWEN = {"Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151_936, True),
        "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152_064, False)}
GB = 1e9


@dataclass
class WorkerConfig:
    """What every rank must agree on (distributed.session compares its hash across ranks)."""

    mode: str
    steps: int
    quick: bool
    device: str = "cpu"


def llama(p: dict, seed: int, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      intermediate_size=p["intermediate"], tie_word_embeddings=tied, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def process_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so that VmRSS counts what is live (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def extra_head_bytes(heads: dict, models: dict) -> int:
    """Bytes of the whole float32 heads that are not a model parameter's own storage (a copy, gathered or cast)."""
    own = {(p.to_local() if hasattr(p, "to_local") else p).data_ptr() for m in models.values() for p in m.parameters()}
    return sum(t.numel() * t.element_size() for head in heads.values() for t in head
               if t is not None and t.data_ptr() not in own)


def worker(mode: str, steps: int, quick: bool, out: Path) -> None:
    """One rank of one launch (under torchrun): build, shard, time, and (rank 0) write what every rank saw."""
    from aligndistil_cli import distributed, fsdp
    from aligndistil_cli.data import collate
    from aligndistil_cli.stages.distill import teacher_loss
    from aligndistil_cli.stages.precompute import teacher_for_batch, teacher_heads
    from aligndistil_cli.training import accumulate
    from bench.run import SPEC, make_examples

    p = QUICK if quick else SHAPE
    with distributed.session(WorkerConfig(mode, steps, quick)):
        device = torch.device("cpu")
        teachers = {"dpo": llama(p, 1), "rev": llama(p, 2)}
        for m in teachers.values():
            m.requires_grad_(False)
            if mode == "sharded":
                fsdp.shard_frozen(m)
        student = fsdp.shard(llama(p, 0).train(), bf16=False)
        heads = teacher_heads(teachers)
        vocab = p["vocab"]
        examples = make_examples(p)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

        def loss_fn(chunk):  # on_policy.run's loss, on a fixed rollout batch
            batch = collate(chunk, 0).to(device)
            fields = teacher_for_batch(teachers, heads, batch, SPEC, "hidden", vocab, torch.float32, host=False)
            return teacher_loss(student, batch, fields, heads, "hidden", SPEC, vocab, 128)

        def distill_step():
            optimizer.zero_grad(set_to_none=True)
            accumulate(loss_fn, examples, 1, "fp32", device, student)
            torch.nn.utils.clip_grad_norm_(list(student.parameters()), 1.0)
            optimizer.step()

        share = collate(distributed.share(examples), 0).to(device)

        def precompute_batch():
            teacher_for_batch(teachers, heads, share, SPEC, "hidden", vocab, torch.float32, 64)

        distill_step(), precompute_batch()  # warm-up (FSDP's lazy init, allocator)
        release_freed_memory()
        rss_before = process_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        times: dict[str, list[float]] = {"distill_step": [], "precompute_batch": []}
        for _ in range(steps):
            for name, fn in (("distill_step", distill_step), ("precompute_batch", precompute_batch)):
                distributed.barrier()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        record = {"rank": distributed.rank(), "times_s": times,
                  "teacher_param_bytes": sum(fsdp.local_bytes(m) for m in teachers.values()),
                  "teacher_sharded": all(fsdp.is_sharded(m) for m in teachers.values()),
                  "extra_head_bytes": extra_head_bytes(heads, teachers),
                  "teacher_full_param_bytes": sum(p.numel() * p.element_size()
                                                  for m in teachers.values() for p in m.parameters()),
                  "rss_before_steps_bytes": rss_before * 1024, "peak_rss_steps_bytes": process_kb("VmHWM") * 1024}
        ranks = distributed.gather_objects(record)
        if distributed.is_main():
            out.write_text(json.dumps({"mode": mode, "world_size": distributed.world_size(), "ranks": ranks}))


def launch(mode: str, steps: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launch.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "bench.teacher_sharding", "--worker", mode, "--steps", str(steps), "--launch-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd + ["--quick"] * quick, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the {mode} launch failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def shard_bytes(shape: tuple, world: int, itemsize: int) -> int:
    """Bytes of rank 0's FSDP2 shard of a parameter: dim 0 split in world chunks (torch.chunk: the first largest)."""
    rows, rest = shape[0], 1
    for d in shape[1:]:
        rest *= d
    return -(-rows // world) * rest * itemsize


def computed_memory() -> dict:
    """Teachers' memory per GPU (GB) for on-policy distillation's two bf16 teachers, COMPUTED from the configs.

    replicated: both teachers' bf16 parameters + their float32 heads (teacher_heads casts them once).
    sharded: rank 0's bf16 shards + the float32 heads, whole on every rank; during a forward one teacher
    also holds gathered groups: the embedding (with a tied head, for the whole forward) and a layer.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = {}
    for name, (h, inter, layers, heads, kv, vocab, tied) in QWEN.items():
        cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = Qwen2ForCausalLM(cfg)
        params = list(model.parameters())
        head = model.get_output_embeddings().weight.numel() * 4
        layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
        embed = model.get_input_embeddings().weight.numel() * 2
        row = {"parameters": sum(p.numel() for p in params), "tied": tied,
               "replicated_gb": 2 * (sum(p.numel() for p in params) * 2 + head) / GB,
               "float32_heads_gb": 2 * head / GB, "layer_gb": layer / GB,
               "gathered_in_a_forward_gb": (embed + layer) / GB}
        row["sharded_gb"] = {n: 2 * (sum(shard_bytes(tuple(p.shape), n, 2) for p in params) + head) / GB
                             for n in (1, 2, 4, 8)}
        out[name] = row
    return out


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Launches of each mode, alternating.")
    parser.add_argument("--steps", type=int, default=3, help="Timed distill steps and precompute batches per launch.")
    parser.add_argument("--quick", action="store_true", help="A tiny model (a smoke test, not a measurement).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "teacher_sharding.json")
    parser.add_argument("--worker", choices=("replicated", "sharded"), help=argparse.SUPPRESS)
    parser.add_argument("--launch-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.quick, args.launch_out)
        return None
    launches = [launch(mode, args.steps, args.quick) for _ in range(args.rounds) for mode in ("replicated", "sharded")]
    result = {"device": "cpu, 2 gloo ranks, OMP_NUM_THREADS=1", "cores": os.cpu_count(), "torch": torch.__version__,
              "shape": QUICK if args.quick else SHAPE, "rounds": args.rounds, "steps": args.steps, "quick": args.quick,
              "launches": launches, "computed_qwen_teachers": computed_memory()}
    summary = {}
    for mode in ("replicated", "sharded"):
        runs = [x for x in launches if x["mode"] == mode]
        rank0 = [x["ranks"][0] for x in runs]
        summary[mode] = {
            "teacher_param_bytes_per_rank": [r["teacher_param_bytes"] for r in runs[0]["ranks"]],
            "extra_head_bytes_per_rank": [r["extra_head_bytes"] for r in runs[0]["ranks"]],
            "peak_rss_steps_bytes_per_rank": [statistics.median(x["ranks"][r]["peak_rss_steps_bytes"] for x in runs)
                                              for r in range(2)],
            "rss_before_steps_bytes_per_rank": [statistics.median(x["ranks"][r]["rss_before_steps_bytes"]
                                                                  for x in runs) for r in range(2)],
            # per launch, the median over its timed steps (rank 0; the ranks wait for each other)
            **{f"{k}_median_s": [statistics.median(r["times_s"][k]) for r in rank0]
               for k in ("distill_step", "precompute_batch")}}
    rep, sh = summary["replicated"], summary["sharded"]
    ratios = {k: statistics.median(s / r for s, r in zip(sh[f"{k}_median_s"], rep[f"{k}_median_s"]))
              for k in ("distill_step", "precompute_batch")}
    result.update(summary=summary, ratio_sharded_over_replicated=ratios,
                  teacher_bytes_ratio=sh["teacher_param_bytes_per_rank"][0] / rep["teacher_param_bytes_per_rank"][0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    for mode, s in summary.items():
        print(f"{mode:>10}: teacher params {s['teacher_param_bytes_per_rank'][0] / mib:.1f} MiB/rank "
              f"(+ {s['extra_head_bytes_per_rank'][0] / mib:.1f} MiB whole heads), RSS before the steps "
              f"{s['rss_before_steps_bytes_per_rank'][0] / mib:.0f} MiB, peak over them "
              f"{s['peak_rss_steps_bytes_per_rank'][0] / mib:.0f} MiB (rank 0), distill step "
              f"{statistics.median(s['distill_step_median_s']):.3f} s, precompute batch "
              f"{statistics.median(s['precompute_batch_median_s']):.3f} s")
    print(f"sharded / replicated: teacher bytes {result['teacher_bytes_ratio']:.3f}, distill step "
          f"{ratios['distill_step']:.3f}, precompute batch {ratios['precompute_batch']:.3f}")
    return result


if __name__ == "__main__":
    main()
