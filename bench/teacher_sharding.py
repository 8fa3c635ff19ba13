"""Teachers held whole on every rank (replicated) against sharded over the ranks (--shard-teachers), issue 11.

    python -m bench.teacher_sharding [--rounds 2] [--steps 6] [--quick] [--out bench/results/teacher_sharding.json]

Every launch runs 2 gloo ranks under torchrun (OMP_NUM_THREADS=1), with a
random-init Llama student sharded by FSDP2 (as on-policy distill does under
torchrun) and two random-init teachers of the same shape, held whole or
sharded by fsdp.shard_frozen.

Time: one launch holds both teacher sets (the same weights) and runs, round
robin for --steps rounds (so that load from other processes hits all alike),
for each set:
  - an on-policy distill step: training.accumulate over the rollout batch with
    on_policy's loss (precompute.teacher_for_batch live, distill.teacher_loss),
    gradient clipping and AdamW; sampling is left out (it runs the student alone);
  - a precompute batch: teacher_for_batch on the rank's share, format hidden.
Wall and process CPU time, medians; the ratio sharded / replicated.

Memory: one launch per mode, the modes alternating, --rounds each. Per rank:
the teacher parameter bytes held (exact, from the local shards, after the
forwards), the bytes of the whole float32 output heads kept beside them (a
copy only where the teachers are sharded, on CPU), VmRSS before the timed step
and the VmHWM high-water over it (reset first, so it leaves out the loading
of the full models before sharding; not ru_maxrss, which would hold that and
the torchrun agent's high-water mark, inherited across fork + exec).

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

from aligndistil_cli.data.encode import collate
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.teacher.live import teacher_for_batch, teacher_heads
from aligndistil_cli.teacher.objective import teacher_loss
from aligndistil_cli.train.loop import accumulate
from bench import write_result
from bench.run import SPEC, make_examples

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
    """One rank of one launch (under torchrun): build, shard, time, and (rank 0) write what every rank saw.

    mode "both" holds both teacher sets and alternates their steps (timing); "replicated" or "sharded"
    holds one (memory).
    """
    p = QUICK if quick else SHAPE
    modes = ("replicated", "sharded") if mode == "both" else (mode,)
    with distributed.session(WorkerConfig(mode, steps, quick)):
        device = torch.device("cpu")
        student = fsdp.shard(llama(p, 0).train(), bf16=False)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        examples = make_examples(p)
        share = collate(distributed.share(examples), 0).to(device)
        teachers, heads, fns = {}, {}, {}
        for m in modes:
            teachers[m] = {"dpo": llama(p, 1), "rev": llama(p, 2)}  # the same weights in both modes
            for t in teachers[m].values():
                t.requires_grad_(False)
                if m == "sharded":
                    fsdp.shard_frozen(t)
            heads[m] = teacher_heads(teachers[m])
            fns[f"distill_step ({m})"] = distill_step(student, optimizer, examples, teachers[m], heads[m], p["vocab"],
                                                      device)
            fns[f"precompute_batch ({m})"] = (lambda t=teachers[m], h=heads[m]: teacher_for_batch(
                t, h, share, SPEC, "hidden", p["vocab"], torch.float32, 64))
        for fn in fns.values():  # warm-up (FSDP's lazy init, the allocator)
            fn()
        release_freed_memory()
        rss_before = process_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(steps):  # round-robin: load from other processes hits every variant alike
            for name, fn in fns.items():
                distributed.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
        record = {"rank": distributed.rank(), "times_s": times, "cpu_times_s": cpu,
                  "rss_before_steps_bytes": rss_before * 1024, "peak_rss_steps_bytes": process_kb("VmHWM") * 1024,
                  **{f"{key} ({m})": value for m in modes for key, value in teacher_memory(teachers[m], heads[m]).items()}}
        ranks = distributed.gather_objects(record)
        if distributed.is_main():
            out.write_text(json.dumps({"mode": mode, "world_size": distributed.world_size(), "ranks": ranks}))


def distill_step(student, optimizer, examples: list, teachers: dict, heads: dict, vocab: int, device):
    """One on-policy distill step on a fixed rollout batch: on_policy.run's loss, accumulate, clipping, AdamW."""

    def loss_fn(chunk):
        batch = collate(chunk, 0).to(device)
        fields = teacher_for_batch(teachers, heads, batch, SPEC, "hidden", vocab, torch.float32, host=False)
        return teacher_loss(student, batch, fields, heads, "hidden", SPEC, vocab, 128)

    def step():
        optimizer.zero_grad(set_to_none=True)
        accumulate(loss_fn, examples, 1, "fp32", device, student)
        torch.nn.utils.clip_grad_norm_(list(student.parameters()), 1.0)
        optimizer.step()

    return step


def teacher_memory(teachers: dict, heads: dict) -> dict:
    return {"teacher_param_bytes": sum(fsdp.local_bytes(m) for m in teachers.values()),
            "teacher_sharded": all(fsdp.is_sharded(m) for m in teachers.values()),
            "extra_head_bytes": extra_head_bytes(heads, teachers),
            "teacher_full_param_bytes": sum(p.numel() * p.element_size() for m in teachers.values()
                                            for p in m.parameters())}


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
    parser.add_argument("--rounds", type=int, default=2, help="Memory launches of each mode, alternating.")
    parser.add_argument("--steps", type=int, default=6, help="Timed rounds of the four variants in the timing launch.")
    parser.add_argument("--quick", action="store_true", help="A tiny model (a smoke test, not a measurement).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "teacher_sharding.json")
    parser.add_argument("--worker", choices=("replicated", "sharded", "both"), help=argparse.SUPPRESS)
    parser.add_argument("--launch-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.quick, args.launch_out)
        return None
    memory = [launch(mode, 1, args.quick) for _ in range(args.rounds) for mode in ("replicated", "sharded")]
    timing = launch("both", args.steps, args.quick)
    result = {"device": f"cpu ({os.cpu_count()} cores), 2 gloo ranks, OMP_NUM_THREADS=1", "torch": torch.__version__,
              "shape": QUICK if args.quick else SHAPE, "rounds": args.rounds, "steps": args.steps, "quick": args.quick,
              "memory_launches": memory, "timing_launch": timing, "computed_qwen_teachers": computed_memory(),
              "memory": memory_summary(memory), "timing": timing_summary(timing)}
    write_result(args.out, result)
    mib = 2**20
    for mode, s in result["memory"].items():
        print(f"{mode:>10}: teacher params {s['teacher_param_bytes_per_rank'][0] / mib:.1f} MiB/rank "
              f"(+ {s['extra_head_bytes_per_rank'][0] / mib:.1f} MiB whole heads), RSS before the steps "
              f"{s['rss_before_steps_bytes_per_rank'][0] / mib:.0f} MiB, peak over them "
              f"{s['peak_rss_steps_bytes_per_rank'][0] / mib:.0f} MiB (rank 0)")
    for name, s in result["timing"].items():
        print(f"{name}: replicated {s['replicated_wall_s']:.3f} s, sharded {s['sharded_wall_s']:.3f} s (wall, median); "
              f"sharded / replicated {s['ratio_wall']:.3f} wall, {s['ratio_cpu']:.3f} process CPU time")
    return result


def memory_summary(launches: list[dict]) -> dict:
    """Per mode and rank: teacher bytes (exact, the same every launch) and the medians of the RSS figures."""
    out = {}
    for mode in ("replicated", "sharded"):
        runs = [x["ranks"] for x in launches if x["mode"] == mode]
        out[mode] = {
            **{f"{k}_per_rank": [r[f"{k} ({mode})"] for r in runs[0]] for k in ("teacher_param_bytes", "extra_head_bytes")},
            **{f"{k}_per_rank": [statistics.median(ranks[r][k] for ranks in runs) for r in range(len(runs[0]))]
               for k in ("rss_before_steps_bytes", "peak_rss_steps_bytes")}}
    return out


def timing_summary(launch_: dict) -> dict:
    """distill step and precompute batch: rank 0's medians (the ranks wait for each other) and sharded / replicated."""
    rank0 = launch_["ranks"][0]
    out = {}
    for name in ("distill_step", "precompute_batch"):
        wall = {m: statistics.median(rank0["times_s"][f"{name} ({m})"]) for m in ("replicated", "sharded")}
        cpu = {m: statistics.median(rank0["cpu_times_s"][f"{name} ({m})"]) for m in ("replicated", "sharded")}
        out[name] = {"replicated_wall_s": wall["replicated"], "sharded_wall_s": wall["sharded"],
                     "replicated_cpu_s": cpu["replicated"], "sharded_cpu_s": cpu["sharded"],
                     "ratio_wall": wall["sharded"] / wall["replicated"], "ratio_cpu": cpu["sharded"] / cpu["replicated"]}
    return out


if __name__ == "__main__":
    main()
