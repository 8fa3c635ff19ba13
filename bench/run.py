"""Side-by-side benchmark of AlignDistil training from the teacher cache.

One run, one student, one set of tokens:
  1. step time (forward + backward + AdamW), tokens/s and (CUDA) MFU of SFT (the fused log-prob pass,
     and side by side the checkpointed path it replaced), DPO, distill-from-cache (the distill
     stage's own loss: fused head + KL over the teacher rebuilt from a "hidden" cache, and from a
     "logits" cache) and a live-teacher step (two teacher forwards, full [B,T,V] float32 logits,
     naive loss);
  2. peak memory of the loss alone at V=151,936, T=2,048: fused/chunked vs naive;
  3. teacher-cache bytes per token of each format (teacher.bytes_per_position);
  4. precompute throughput: the precompute stage's own teacher_for_batch ("hidden" format)
     vs two plain forward passes.
Usage: python -m bench.run [--device auto|cpu|cuda] [--preset cpu|gpu|1.5b] [--quick] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from aligndistil_cli.data.encode import Encoded, collate
from aligndistil_cli.losses.functions import dpo_loss, reverse_kl
from aligndistil_cli.losses.fused import fused_head_kl_loss, position_weights
from aligndistil_cli.model.loading import (
    final_hidden,
    head_logps,
    output_head,
    quiet_transformers,
    response_hidden,
    sequence_ids,
)
from aligndistil_cli.stages.dpo import policy_logps
from aligndistil_cli.teacher.cache import STORE_DTYPES
from aligndistil_cli.teacher.compose import TeacherSpec, bytes_per_position, logq_fn
from aligndistil_cli.teacher.live import teacher_for_batch, teacher_heads
from bench import write_result
from bench.reference import aligndistil_loss, compose_teacher, token_logps_from_hidden

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=32_000, batch=4, prompt=64,
                response=192, warmup=2, steps=5, mem_h=64, mem_t=2048, mem_v=151_936),
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936, batch=4, prompt=256,
                response=768, warmup=3, steps=10, mem_h=896, mem_t=2048, mem_v=151_936),
    # Qwen2.5-1.5B's shape; gradient checkpointing as a 1.5B model needs at 4 x 2,048 tokens.
    "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151_936, batch=4, prompt=512,
                 response=1536, warmup=3, steps=10, mem_h=1536, mem_t=2048, mem_v=151_936, checkpointing=True),
    # A few seconds on CPU, every code path of the others (checkpointing too): the smoke run that keeps
    # bench/gpu_check.sh's entry points working in `make test` (tests/integration/test_bench_smoke.py).
    "smoke": dict(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=512, batch=2, prompt=8,
                  response=24, warmup=1, steps=1, mem_h=16, mem_t=128, mem_v=512, checkpointing=True),
}
# Dense bf16 peak FLOP/s (no sparsity) by the CUDA device name, for MFU; first match wins.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12),
             ("L40S", 362e12))
# --quick also shrinks the loss-memory vocabulary (V=151,936 takes ~2 min on 2 CPU cores); the row says which V.
QUICK = dict(batch=2, prompt=32, response=96, warmup=1, steps=2, mem_v=16_384)
CHUNK = 128  # the training stages' default --chunk-size
CACHE_H, CACHE_V, TOPK, SCALAR_BYTES = 1536, 151_936, 64, 12
RATIOS = {"sft / sft (checkpointed)": ("sft", "sft (checkpointed)"), "distill / sft": ("distill", "sft"),
          "distill (logits cache) / sft": ("distill (logits cache)", "sft"), "distill / live": ("distill", "live")}
TARGETS = {"sft / sft (checkpointed)": 0.75, "distill (logits cache) / sft": 1.05, "distill / sft": 1.15,
           "distill / live": 0.6, "chunked / naive": 0.1}
TEACHER_KW = dict(variant="aligndistil", beta=0.1, kl_coef=0.1, alpha_scale=20.0, alpha_eps=1e-3, temperature=1.0)
SPEC = TeacherSpec(**TEACHER_KW)


def build_model(p: dict, seed: int, dtype: torch.dtype, device: torch.device, checkpointing: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      intermediate_size=p["intermediate"], tie_word_embeddings=True, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_examples(p: dict, seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, p["vocab"], (p["batch"], p["prompt"] + p["response"]), generator=gen).tolist()
    return [Encoded(r[: p["prompt"]], r[p["prompt"]:]) for r in ids]


def make_batch(p: dict, device: torch.device, seed: int = 0):
    """Random prompt/response ids through the project's own collate, so the masks are the real ones."""
    return collate(make_examples(p, seed), pad_id=0).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def time_interleaved(fns: dict, warmup: int, n: int, device: torch.device) -> tuple[dict, dict]:
    """Run the functions round-robin (drift hits all alike); wall and process CPU seconds of each timed round.

    CPU seconds are this process's (all its threads): on a shared machine they do not count the time
    other processes held the cores, so with one thread they are the steadier measure of the work.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(warmup + n):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if rnd >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return times, cpu


def summary(timed: tuple[dict, dict]) -> dict:
    times, cpu = timed
    return {"times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()}, "cpu_times_s": cpu,
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}}


def sft_loss(student, batch, vocab):
    """The sft stage's loss: one fused head pass (fused_token_logps), one group."""
    return -head_logps(student, batch, vocab, CHUNK)[0][0] / batch.loss_mask.sum()


def sft_checkpointed_loss(student, batch, vocab):
    """The SFT loss before the fused pass: token_logps_from_hidden, each chunk checkpointed."""
    weight, bias = output_head(student)
    logps = token_logps_from_hidden(response_hidden(student, batch), batch.targets[batch.loss_mask], weight, bias,
                                    vocab, CHUNK)
    return -logps.sum() / batch.loss_mask.sum()


def dpo_step_loss(student, pairs, ref, vocab, device):
    """train-dpo's loss: the batch's sequences as chosen (first half) and rejected (second half)."""
    pc, pr = policy_logps(student, pairs, 0, vocab, CHUNK, device)
    return dpo_loss(pc, pr, ref, ref)


def distill_loss(student, batch, vocab, cache, fmt):
    """What distill.cached_teacher_loss does, on cache fields already resident on the device."""
    weight, bias = output_head(student)
    fields, heads = cache[fmt]
    w = position_weights(fields["coef"], sequence_ids(batch), batch.loss_mask.shape[0])
    teacher = logq_fn(fmt, fields, heads, SPEC, vocab, batch.input_ids.device)
    return fused_head_kl_loss(response_hidden(student, batch), weight, bias, w, teacher, vocab, CHUNK)[0]


def live_loss(student, teachers, batch, vocab):
    """The official recipe: full [B,T,V] float32 logits of all three models, naive loss."""
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    with torch.no_grad():
        z_dpo, z_rev = (t(**kw).logits.float() for t in teachers)
        teacher_lp, coef, _ = compose_teacher(z_dpo, z_rev, vocab_size=vocab, **TEACHER_KW)
        del z_dpo, z_rev
    return aligndistil_loss(student(**kw).logits.float(), teacher_lp, coef, batch.loss_mask)


def train_step(loss_fn, optimizer, device):
    def step():
        with autocast(device):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_steps(p, student, teachers, batch, cache, device, only: list[str] | None = None) -> dict:
    vocab, opt = p["vocab"], torch.optim.AdamW(student.parameters(), lr=1e-5)
    student.train()
    examples, half = make_examples(p), p["batch"] // 2
    pairs, ref = list(zip(examples[:half], examples[half:])), torch.zeros(half, device=device)
    fns = {"sft": train_step(lambda: sft_loss(student, batch, vocab), opt, device),
           "sft (checkpointed)": train_step(lambda: sft_checkpointed_loss(student, batch, vocab), opt, device),
           "dpo": train_step(lambda: dpo_step_loss(student, pairs, ref, vocab, device), opt, device),
           "distill": train_step(lambda: distill_loss(student, batch, vocab, cache, "hidden"), opt, device),
           "distill (logits cache)": train_step(lambda: distill_loss(student, batch, vocab, cache, "logits"), opt,
                                                device),
           "live": train_step(lambda: live_loss(student, teachers, batch, vocab), opt, device)}
    fns = {k: v for k, v in fns.items() if only is None or k in only}
    res = summary(time_interleaved(fns, p["warmup"], p["steps"], device))
    med, low = res["median_s"], res["min_s"]
    pairs = {name: (a, b) for name, (a, b) in RATIOS.items() if a in med and b in med}
    res["ratios"] = {name: med[a] / med[b] for name, (a, b) in pairs.items()}
    res["ratios_of_minima"] = {name: low[a] / low[b] for name, (a, b) in pairs.items()}
    cpu = res["median_cpu_s"]
    res["ratios_of_cpu_time"] = {name: cpu[a] / cpu[b] for name, (a, b) in pairs.items()}
    flops = step_flops(p, student, batch)
    tokens = int(batch.attention_mask.sum())
    peak = peak_flops(device)
    res["tokens_per_step"] = tokens
    res["tokens_per_s"] = {k: tokens / v for k, v in med.items()}
    res["model_flops_per_step"] = flops
    res["peak_bf16_flops"] = peak
    res["mfu"] = {k: flops[k] / v / peak for k, v in med.items()} if peak else None
    res["model_flops_per_step"] = {k: flops[k] for k in med}
    return res


def model_flops(p: dict, nonembed: int, seq_lens: list[int], head_positions: int, backward: bool) -> float:
    """FLOPs of one pass counted the standard way: 2 (forward) or 6 (forward + backward) x non-embedding
    parameters x tokens, causal attention (QK^T and AV over the pairs each query attends to) and the output
    head at the positions that reach it. Recomputation (gradient checkpointing) is not counted."""
    mult = 6 if backward else 2
    head_dim = p["hidden"] // p["heads"]
    attn = 2 * p["layers"] * p["heads"] * head_dim * sum(t * (t + 1) for t in seq_lens)  # 4 x pairs x d, forward
    return mult * nonembed * sum(seq_lens) + attn * mult // 2 + mult * p["hidden"] * p["vocab"] * head_positions


def step_flops(p: dict, student, batch) -> dict[str, float]:
    """Model FLOPs of each step: the student forward + backward, plus what the step runs of the teachers."""
    emb = student.get_input_embeddings().weight
    nonembed = sum(q.numel() for q in student.parameters()) - emb.numel()  # tied: the head is the embedding
    lens = batch.attention_mask.sum(1).tolist()
    n, tokens = int(batch.loss_mask.sum()), sum(lens)
    student_n = model_flops(p, nonembed, lens, n, True)
    teacher_heads = 2 * 2 * p["hidden"] * p["vocab"] * n  # "hidden" cache: both teachers' heads, forward
    live = model_flops(p, nonembed, lens, tokens, True) + 2 * model_flops(p, nonembed, lens, tokens, False)
    return {"sft": student_n, "sft (checkpointed)": student_n, "dpo": student_n, "distill": student_n + teacher_heads,
            "distill (logits cache)": student_n, "live": live}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def loss_peak(variant: str, device: torch.device, T: int, V: int, H: int) -> dict:
    """Peak bytes above the inputs (hidden, head, teacher log-probs) for one loss forward + backward."""
    torch.manual_seed(0)
    hidden = torch.randn(T, H, device=device).requires_grad_()
    weight = (torch.randn(V, H, device=device) * H**-0.5).requires_grad_()
    teacher = torch.empty(T, V, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for s in range(0, T, 64):  # in row blocks, so building the input leaves no large earlier peak
        teacher[s : s + 64] = torch.log_softmax(torch.randn(teacher[s : s + 64].shape, device=device), -1)
    w = position_weights(torch.full((T,), 0.1, device=device), torch.zeros(T, dtype=torch.long, device=device), 1)
    base = _mem_now(device)
    with autocast(device):
        if variant == "naive":
            kl = reverse_kl(F.linear(hidden, weight).float(), teacher)
        else:
            kl = None
        loss = (w * kl).sum() if kl is not None else \
            fused_head_kl_loss(hidden, weight, None, w, lambda s, e: teacher[s:e], None, CHUNK)[0]
    loss.backward()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_bytes("VmHWM")
    return {"variant": variant, "peak_bytes": peak - base, "baseline_bytes": base, "T": T, "V": V, "H": H,
            "method": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS, fresh subprocess"}


def _proc_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _mem_now(device: torch.device) -> int:
    """Baseline just before the loss. CPU: VmRSS, with the VmHWM high-water mark reset to it. Not
    ru_maxrss: Linux carries a parent's RSS high-water mark across fork + exec into the child."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_bytes("VmRSS")


def bench_memory(device: torch.device, H: int, T: int, V: int) -> dict:
    out: dict = {}
    for variant in ("chunked", "naive"):
        if device.type == "cuda":
            out[variant] = loss_peak(variant, device, T, V, H)
            torch.cuda.empty_cache()
        else:  # a fresh process per variant: clean allocator state, nothing of the other variant resident
            cmd = [sys.executable, "-m", "bench.run", "--device", "cpu", "--mem-probe", variant,
                   "--mem-shape", f"{T},{V},{H}"]
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    out["chunked / naive"] = out["chunked"]["peak_bytes"] / out["naive"]["peak_bytes"]
    return out


def cache_bytes() -> dict:
    """Bytes per cached position of each format at H = 1,536, V = 151,936 (two teachers)."""
    sizes = {f"logits {name}": bytes_per_position("logits", CACHE_V, CACHE_H, 2, dt.itemsize, TOPK)
             for name, dt in STORE_DTYPES.items()}
    sizes["hidden bfloat16"] = bytes_per_position("hidden", CACHE_V, CACHE_H, 2, 2, TOPK)
    sizes[f"topk k={TOPK} float32"] = bytes_per_position("topk", CACHE_V, CACHE_H, 2, 4, TOPK)
    return {"H": CACHE_H, "V": CACHE_V, "per_token": sizes}


def precompute_batch(teachers, batch, vocab: int, store_name: str, fmt: str) -> dict[str, torch.Tensor]:
    """The precompute stage's own per-batch work (to the host, as it writes shards)."""
    models = dict(zip(("dpo", "rev"), teachers))
    return teacher_for_batch(models, teacher_heads(models), batch, SPEC, fmt, vocab, STORE_DTYPES[store_name])


def bench_precompute(p, teachers, batch, store, device) -> tuple[dict, dict]:
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    @torch.no_grad()
    def forwards(body_only: bool):
        for m in teachers:
            final_hidden(m, batch.input_ids, batch.attention_mask) if body_only else m(**kw)

    fns = {"precompute": lambda: precompute_batch(teachers, batch, p["vocab"], store, "hidden"),
           "two plain forwards": lambda: forwards(False), "two body-only forwards": lambda: forwards(True)}
    res, tokens = summary(time_interleaved(fns, 1, p["steps"], device)), batch.input_ids.numel()
    med = res["median_s"]
    res.update({"tokens_per_batch": tokens, "tokens_per_s": {k: tokens / v for k, v in med.items()},
                "precompute / plain": med["precompute"] / med["two plain forwards"],
                "precompute / body": med["precompute"] / med["two body-only forwards"]})
    heads = {name: output_head(m) for name, m in zip(("dpo", "rev"), teachers)}
    cache = {fmt: ({k: v.to(device) for k, v in precompute_batch(teachers, batch, p["vocab"], store, fmt).items()},
                   heads) for fmt in ("hidden", "logits")}
    return res, cache


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), platform.processor() or "cpu")
    return f"{name} ({torch.get_num_threads()} threads)"


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    def ratio(name, value):
        return (name, f"{value:.3f}", f"<= {TARGETS[name]}", "yes" if value <= TARGETS[name] else "no")

    st, mem, pc, cb = r["steps"], r["memory"], r["precompute"], r["cache_bytes_per_token"]
    out = [(f"{k} step, median of {len(st['times_s'][k])}", f"{v * 1e3:.1f} ms", "reported", "-")
           for k, v in st["median_s"].items()]
    out += [(f"{k} tokens/s", f"{v:,.0f}", "reported", "-") for k, v in st["tokens_per_s"].items()]
    out += [(f"{k} MFU", f"{v:.1%}" if st["mfu"] else "not measured (no bf16 peak for this device)", "reported", "-")
            for k, v in (st["mfu"] or {"all steps": 0}).items()]
    out += [ratio(k, v) for k, v in st["ratios"].items()]
    out += [(f"{k}, ratio of minima", f"{v:.3f}", "reported", "-") for k, v in st["ratios_of_minima"].items()]
    out += [(f"{k}, ratio of median CPU times", f"{v:.3f}", "reported", "-")
            for k, v in st["ratios_of_cpu_time"].items()]
    if mem is None:
        return out
    out += [(f"loss peak {k} (T={mem[k]['T']}, V={mem[k]['V']}, H={mem[k]['H']})",
             f"{mem[k]['peak_bytes'] / 2**20:,.0f} MiB", "reported", "-") for k in ("chunked", "naive")]
    out.append(ratio("chunked / naive", mem["chunked / naive"]))
    out += [(f"cache bytes/token {k} (H={cb['H']}, V={cb['V']})", f"{v:,}", "reported", "-")
            for k, v in cb["per_token"].items()]
    out += [(f"{k} tokens/s", f"{v:,.0f}", "reported", "-") for k, v in pc["tokens_per_s"].items()]
    out += [(f"{k} (time ratio)", f"{pc[k]:.3f}", "reported", "-") for k in ("precompute / plain", "precompute / body")]
    return out


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = r["model"]
    table = Table(title=f"aligndistil bench, preset {r['preset']}{' (quick)' if r['quick'] else ''}: {r['device_name']}, "
                        f"torch {r['torch']}, H={m['hidden']} L={m['layers']} V={m['vocab']}, "
                        f"batch {m['batch']}x{m['prompt'] + m['response']}")
    for col in ("figure", "measured", "target", "met"):
        table.add_column(col)
    for row in rows(r):
        table.add_row(*row)
    Console().print(table)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller batch and loss-memory V (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--only", default=None, help="comma-separated steps to time (e.g. 'sft,sft (checkpointed)'); "
                    "skips the precompute, memory and cache-size parts")
    ap.add_argument("--mem-probe", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--mem-shape", default="2048,151936,64", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def pick(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda given but CUDA is not available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))


def run(args) -> dict:
    device, t_start = pick(args.device), time.perf_counter()
    cuda, preset = device.type == "cuda", args.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = {**PRESETS[preset], **(QUICK if args.quick else {})}
    store_name = "bfloat16" if cuda else "float32"  # the cache's storage dtype for this run
    batch = make_batch(p, device)
    teachers = [build_model(p, seed, torch.bfloat16 if cuda else torch.float32, device).eval() for seed in (1, 2)]
    student = build_model(p, 0, torch.float32, device, p.get("checkpointing", False))
    only = [v.strip() for v in args.only.split(",")] if args.only else None
    if only is None:
        pre, cache = bench_precompute(p, teachers, batch, store_name, device)  # resident on the device
    else:  # --only: no precompute timing; the cache fields only if a distill step is asked for
        pre = None
        heads = {name: output_head(m) for name, m in zip(("dpo", "rev"), teachers)}
        cache = {fmt: ({k: v.to(device) for k, v in precompute_batch(teachers, batch, p["vocab"], store_name,
                                                                      fmt).items()}, heads)
                 for fmt in ("hidden", "logits") if any(v.startswith("distill") for v in only)}
    steps = bench_steps(p, student, teachers, batch, cache, device, only)
    del teachers, student, cache
    memory = bench_memory(device, p["mem_h"], p["mem_t"], p["mem_v"]) if only is None else None
    shape = {k: v for k, v in p.items() if k not in ("warmup", "steps", "checkpointing") and not k.startswith("mem_")}
    r = {"preset": preset, "quick": args.quick, "device": str(device), "device_name": device_name(device),
         "torch": torch.__version__, "python": platform.python_version(),
         "model": {**shape, "arch": "Qwen2ForCausalLM, random init", "tie_word_embeddings": True, "attn": "sdpa",
                   "student_dtype": "float32" + (" + bf16 autocast" if cuda else ""),
                   "gradient_checkpointing": p.get("checkpointing", False),
                   "teacher_dtype": "bfloat16" if cuda else "float32", "cache_dtype": store_name},
         "warmup": p["warmup"], "timed_steps": p["steps"], "chunk_size": CHUNK, "steps": steps, "memory": memory,
         "cache_bytes_per_token": cache_bytes(), "precompute": pre, "targets": TARGETS}
    measured = {**steps["ratios"], **({"chunked / naive": memory["chunked / naive"]} if memory else {})}
    r["met"] = {k: measured[k] <= t for k, t in TARGETS.items() if k in measured}
    r["load_average"] = os.getloadavg()
    r["wall_s"] = round(time.perf_counter() - t_start, 1)
    return r


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.mem_probe:
        T, V, H = (int(x) for x in args.mem_shape.split(","))
        print(json.dumps(loss_peak(args.mem_probe, pick(args.device), T, V, H)))
        return None
    quiet_transformers()
    r = run(args)
    print_table(r)
    write_result(args.out, r)
    print(f"wall time {r['wall_s']} s; results written to {args.out}")
    return r


if __name__ == "__main__":
    main()
