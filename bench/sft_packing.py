"""SFT steps on the embedded toy task: padded vs packed rows, and packed with the earlier per-sequence attention.

The toy SFT batches of pipelines/tiny.yaml (64 sequences of ~31 tokens, length-grouped, 1.6% padding) on
three copies of one random-init toy model, the same batches in the same order, alternating step by step,
timed in process CPU time. "packed" is today's packing.varlen_sdpa_forward (one masked sdpa call per layer
over the row's sequences gathered into a batch); "packed, per-sequence sdpa" is the implementation it
replaced, one sdpa call per sequence, kept here only as the comparison.
Usage: OMP_NUM_THREADS=1 python -m bench.sft_packing [--steps 20] [--warmup 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

from aligndistil_cli.config.files import build_config
from aligndistil_cli.config.stages import InitToyConfig, SftConfig
from aligndistil_cli.data.encode import collate, encode_rows, load_data
from aligndistil_cli.model.loading import head_logps, load_model, load_tokenizer, quiet_transformers
from aligndistil_cli.model.packing import collate_for, enable
from aligndistil_cli.stages import init_toy
from aligndistil_cli.train.loop import step_batches
from bench import write_result

ROOT = Path(__file__).resolve().parents[1]
PER_SEQUENCE = "bench_per_sequence_sdpa"


def per_sequence_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, attention_plan=None,
                      **kwargs):
    """The replaced attention: causal sdpa once per packed sequence (plain sdpa on padded batches)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    index, valid, _ = attention_plan
    starts = index[:, 0].tolist()
    bounds = [*starts, starts[-1] + int(valid[-1].sum())]
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout,
                                   scaling, **kwargs)[0] for s, e in itertools.pairwise(bounds)]
    return torch.cat(outs, dim=1), None


def main() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft_packing.json"))
    args = ap.parse_args()
    quiet_transformers()
    AttentionInterface.register(PER_SEQUENCE, per_sequence_sdpa)
    AttentionMaskInterface.register(PER_SEQUENCE, sdpa_mask)
    with tempfile.TemporaryDirectory() as tmp:
        toy = init_toy.run(build_config(InitToyConfig, {"out": f"{tmp}/toy", "num_sft": 6000, "hidden_size": 128,
                                                        "num_layers": 4, "num_heads": 4, "intermediate_size": 256}))
        cfg = build_config(SftConfig, {"model": str(toy / "model"), "data": str(toy / "sft.jsonl"), "out": "-",
                                       "max_length": 64, "max_prompt_length": 32})
        rows, stats = load_data(cfg, "sft")
        tok = load_tokenizer(cfg.model)
        examples, _ = encode_rows(tok, rows, "response", cfg, stats)
        sides = {}
        for name in ("padded", "packed", "packed, per-sequence sdpa"):
            model = load_model(cfg.model, torch.device("cpu"))
            packed = enable(model, name != "padded", "bench")
            if name == "packed, per-sequence sdpa":
                model.set_attn_implementation(PER_SEQUENCE)
            sides[name] = (model, collate_for(packed), torch.optim.AdamW(model.parameters(), lr=1e-3))
    lengths = [len(e.prompt) + len(e.response) for e in examples]
    batches = list(step_batches(examples, 64, 1, 0, args.warmup + args.steps, lengths))
    cpu = {k: [] for k in sides}
    slots = real = 0
    for i, batch in enumerate(batches):
        for name, (model, pack, opt) in sides.items():
            c0 = time.process_time()
            b = pack(collate(batch, tok.pad_token_id))
            loss = -head_logps(model, b, len(tok))[0][0] / b.num_positions.sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                cpu[name].append(time.process_time() - c0)
        if i >= args.warmup:
            padded = collate(batch, tok.pad_token_id).attention_mask
            slots, real = slots + padded.numel(), real + int(padded.sum())
    res = {"steps": args.steps, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "cpu_s": cpu,
           "padding_share": 1 - real / slots,
           **{f"{k} / padded, CPU time": sum(v) / sum(cpu["padded"]) for k, v in cpu.items() if k != "padded"}}
    print(f"toy SFT step, {args.steps} timed steps, {res['padding_share']:.1%} padding: CPU time packed / padded "
          f"{res['packed / padded, CPU time']:.3f}, per-sequence sdpa / padded "
          f"{res['packed, per-sequence sdpa / padded, CPU time']:.3f} (load average {res['load_average'][0]:.1f})")
    write_result(args.out, res)


if __name__ == "__main__":
    main()
