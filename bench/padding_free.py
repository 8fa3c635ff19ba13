"""train-dpo steps with padded vs padding-free (packed) batches, side by side on bench.trl_dpo's model and data.

Three copies of one random-init model (same weights), the same length-grouped batches in the same order, each
step timed in wall and process CPU seconds, the sides alternating: padded, padding-free (each sequence packed
whole) and padding-free with each pair's prompt stored once (what train-dpo runs). Prints the time per real
token of each packed side over the padded one. Usage: python -m bench.padding_free [--steps 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from aligndistil_cli.data.encode import collate, encode
from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.model.loading import quiet_transformers
from aligndistil_cli.model.packing import collate_for, enable
from aligndistil_cli.stages.dpo import policy_logps
from aligndistil_cli.train.loop import step_batches

from . import write_result
from .trl_dpo import HP, ROOT, SHAPE, build_model, build_tokenizer, synthetic_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "padding_free.json"))
    args = ap.parse_args()
    quiet_transformers()
    tok = build_tokenizer(SHAPE["vocab_size"])
    rows = synthetic_pairs(200, SHAPE["vocab_size"], HP["seed"])
    pairs = [tuple(encode(tok, r["prompt"], r[k], HP["max_length"], HP["max_prompt_length"])
                   for k in ("chosen", "rejected")) for r in rows]
    lengths = [max(len(c.prompt) + len(c.response), len(r.prompt) + len(r.response)) for c, r in pairs]
    batches = list(step_batches(pairs, HP["batch"], 1, HP["seed"], args.warmup + args.steps, lengths))
    sides = {}
    for name, packed, shared in (("padded", False, False), ("padding-free", True, False),
                                 ("padding-free, shared prompts", True, True)):
        model = build_model()
        model.train()
        assert enable(model, packed, "bench") == packed
        sides[name] = (model, collate_for(packed, pairs=shared), torch.optim.AdamW(model.parameters(), lr=HP["lr"]))
    zeros = torch.zeros(HP["batch"])
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    real = 0
    for i, batch in enumerate(batches):
        for name, (model, pack, opt) in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            pc, pr = policy_logps(model, batch, tok.pad_token_id, len(tok), HP["chunk_size"], torch.device("cpu"), pack)
            dpo_loss(pc, pr, zeros[: len(batch)], zeros[: len(batch)], beta=HP["beta"]).backward()
            opt.step()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        if i >= args.warmup:
            real += int(collate([c for c, _ in batch] + [r for _, r in batch], tok.pad_token_id).attention_mask.sum())
    res = {"steps": args.steps, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "wall_s": wall,
           "cpu_s": cpu, "real_tokens": real}
    print(f"train-dpo step, {args.steps} timed steps, {real} real tokens (load average {res['load_average'][0]:.1f}):")
    for name in list(sides)[1:]:
        res[f"{name} / padded, wall"] = sum(wall[name]) / sum(wall["padded"])
        res[f"{name} / padded, CPU time"] = sum(cpu[name]) / sum(cpu["padded"])
        print(f"  time per real token, {name} / padded: wall {res[f'{name} / padded, wall']:.3f}, "
              f"CPU time {res[f'{name} / padded, CPU time']:.3f}")
    write_result(args.out, res)


if __name__ == "__main__":
    main()
