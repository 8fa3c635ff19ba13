"""train-dpo step vs TRL DPOTrainer step, side by side in one process (target: time per real token <= 0.45 x TRL's).

Each side trains its own copy of one random-init LlamaForCausalLM (same weights) on the same synthetic pairs
(token ids checked equal), batch 8 pairs, max_length 256, same AdamW and clipping. Neither runs the reference
during steps: TRL has precompute_ref_log_probs=True; ours reads reference log-probs computed up front.
- aligndistil: training.train's step body around dpo.run's loss_fn (policy_logps + dpo_loss, collate included),
  batches from training.step_batches grouped by length and packed padding-free (packing.py), as dpo.run does.
  --padded: padded batches instead (--no-padding-free).
- TRL: DPOTrainer.train(), timed on_step_begin -> on_step_end by a TrainerCallback; our step runs inside its
  on_step_end, so the two alternate step by step and load drift hits both.
Timed: --steps per side after --warmup (default 3 + 22, the rest of epoch 1; each side has its own batch order).
The figure: time per real token over the whole timed window (sum of step times / sum of real tokens, each
side); medians and means of step times are printed beside it (length-grouped step times spread widely).
Usage: python -m bench.trl_dpo [--pairs 200] [--warmup 3] [--steps 22] [--trl-group-by-length] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from aligndistil_cli.data.encode import collate, encode
from aligndistil_cli.losses.functions import dpo_loss
from aligndistil_cli.model.loading import quiet_transformers
from aligndistil_cli.model.packing import MIN_PADDING, collate_for
from aligndistil_cli.model.packing import enable as enable_padding_free
from aligndistil_cli.stages.dpo import policy_logps, reference_logps
from aligndistil_cli.train.loop import accumulate, lr_lambda, step_batches
from bench import write_result

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=320, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5,
             intermediate_size=864, vocab_size=3260)
HP = dict(batch=8, max_length=256, max_prompt_length=64, lr=1e-4, beta=0.1, betas=(0.9, 0.95), weight_decay=0.0,
          grad_clip=1.0, warmup_ratio=0.1, min_lr_ratio=0.1, chunk_size=128, seed=0)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TARGET = 0.45  # time per real token, train-dpo / TRL


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def synthetic_pairs(n: int, vocab: int, seed: int) -> list[dict]:
    """Prompts of 40-63 words (+ BOS = up to 64 tokens), responses of 31-191 words (+ EOS = 32-192 tokens)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(k))
    return [{"prompt": words(rng.randint(40, 63)), "chosen": " " + words(rng.randint(31, 191)),
             "rejected": " " + words(rng.randint(31, 191))} for _ in range(n)]


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(HP["seed"])
    return LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=512, tie_word_embeddings=False,
                                        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2))


def ours(model, tokenizer, pairs, ref, n_steps, device, padding_free: bool):
    """(one_step(), per-step batch stats): the train-dpo step, batches in step_batches order."""
    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    packed = enable_padding_free(model, padding_free, "bench train-dpo")
    pack = collate_for(packed, MIN_PADDING, pairs=True)  # as dpo.run packs
    items = [((c, r), i) for i, (c, r) in enumerate(pairs)]
    stats: list[tuple[int, int, int]] = []  # (tokens through the body: padded or packed, real tokens, positions through the head)

    def loss_fn(chunk):  # dpo.run's loss_fn
        idx = torch.tensor([i for _, i in chunk])
        pc, pr = policy_logps(model, [p for p, _ in chunk], pad, vocab, HP["chunk_size"], device, pack)
        rc, rr = ref["chosen"][idx].to(device), ref["rejected"][idx].to(device)
        loss = dpo_loss(pc, pr, rc, rr, beta=HP["beta"])
        with torch.no_grad():
            reward_c, reward_r = HP["beta"] * (pc - rc), HP["beta"] * (pr - rr)
        return loss, {"reward_chosen": reward_c.mean().item(), "reward_rejected": reward_r.mean().item(),
                      "reward_accuracy": (reward_c > reward_r).float().mean().item(),
                      "margin": (reward_c - reward_r).mean().item()}  # the .item() syncs are part of the step

    lengths = [max(len(c.prompt) + len(c.response), len(r.prompt) + len(r.response)) for c, r in pairs]
    batches = step_batches(items, HP["batch"], 10**6, HP["seed"], n_steps, lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=HP["betas"], weight_decay=HP["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n_steps, HP["warmup_ratio"], HP["min_lr_ratio"]))
    model.train()

    def one_step():  # training.train's step body (minus the metrics.jsonl line and the progress bar)
        batch = next(batches)
        b = collate([p for (p, _), _ in batch] + [q for (_, q), _ in batch], pad)  # for the stats only, untimed
        body = pack(b).input_ids.numel()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, _extra = accumulate(loss_fn, batch, 1, "auto", device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, HP["grad_clip"])
        assert torch.isfinite(loss) and torch.isfinite(grad_norm)
        opt.step()
        sched.step()
        loss.item()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        stats.append((body, int(b.attention_mask.sum()), int(b.loss_mask.sum())))
        return dt, dc

    return one_step, stats


def run(args, out_dir: str) -> dict:
    import datasets
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    quiet_transformers()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing's rename in transformers 5
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = torch.device("cpu")
    tokenizer = build_tokenizer(SHAPE["vocab_size"])
    rows = synthetic_pairs(args.pairs, SHAPE["vocab_size"], HP["seed"])
    warmup, timed, load_start = args.warmup, args.steps, os.getloadavg()[0]
    assert warmup >= 1 and timed >= 1
    n_steps = warmup + timed

    policy_ours, policy_trl = build_model(), build_model()
    policy_trl.load_state_dict(policy_ours.state_dict())
    n_params = sum(p.numel() for p in policy_ours.parameters())
    pairs = [tuple(encode(tokenizer, r["prompt"], r[k], HP["max_length"], HP["max_prompt_length"])
                   for k in ("chosen", "rejected")) for r in rows]
    trl_stats: list[tuple[int, int, int]] = []
    our_step = None  # set once TRL's reference log-probs exist

    class Clock(TrainerCallback):
        step_s, wall_s, ours_s, step_cpu, ours_cpu, t_begin, c_begin, t_after = [], [], [], [], [], 0.0, 0.0, 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t_begin, self.c_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            now, cpu_now = time.perf_counter(), time.process_time()
            dt, dc = our_step()  # interleave: one train-dpo step right after each TRL step
            if state.global_step > warmup:  # wall: previous step end -> this one, collate + logging included
                self.step_s.append(now - self.t_begin)
                self.wall_s.append(now - self.t_after)
                self.ours_s.append(dt)
                self.step_cpu.append(cpu_now - self.c_begin)
                self.ours_cpu.append(dc)
            self.t_after = time.perf_counter()

    cfg = DPOConfig(output_dir=out_dir, precompute_ref_log_probs=True, per_device_train_batch_size=HP["batch"],
                    gradient_accumulation_steps=1, max_length=HP["max_length"], beta=HP["beta"],
                    learning_rate=HP["lr"], adam_beta1=HP["betas"][0], adam_beta2=HP["betas"][1],
                    weight_decay=HP["weight_decay"], max_grad_norm=HP["grad_clip"], optim="adamw_torch",
                    lr_scheduler_type="cosine", warmup_steps=HP["warmup_ratio"], max_steps=n_steps,
                    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[],
                    logging_steps=10**6, save_strategy="no", dataloader_num_workers=0, seed=HP["seed"],
                    disable_tqdm=True, remove_unused_columns=not args.trl_group_by_length,  # keeps "length"
                    train_sampling_strategy="group_by_length" if args.trl_group_by_length else "random")
    dataset = Dataset.from_list(rows)
    if args.trl_group_by_length:
        dataset = dataset.add_column("length", [max(len(c.prompt + c.response), len(r.prompt + r.response))
                                                for c, r in pairs])
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy_trl, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock := Clock()])
    precompute_s = time.perf_counter() - t0
    # Same tokens on both sides; TRL's reference log-probs (same initial weights) feed our side too, after a check
    # against stages.dpo.reference_logps on the first two batches.
    td = trainer.train_dataset
    assert [(c.prompt, c.response, r.prompt, r.response) for c, r in pairs] == \
        list(zip(td["prompt_ids"], td["chosen_ids"], td["prompt_ids"], td["rejected_ids"])), "token ids differ"
    ref = {"chosen": torch.tensor(td["ref_chosen_logps"]), "rejected": torch.tensor(td["ref_rejected_logps"])}
    n_check = 2 * HP["batch"]
    check = reference_logps(policy_ours.eval(), pairs[:n_check], tokenizer.pad_token_id, len(tokenizer),
                            HP["chunk_size"], HP["batch"], device)
    ref_diff = max((check[k] - ref[k][:n_check]).abs().max().item() for k in ("chosen", "rejected"))
    our_step, our_stats = ours(policy_ours, tokenizer, pairs, ref, n_steps, device, not args.padded)

    def counting_collator(examples, collator=trainer.data_collator):
        batch = collator(examples)
        ids = batch["input_ids"]  # on CPU TRL's fused head scores every position of the padded batch
        trl_stats.append((ids.numel(), int(batch["attention_mask"].sum()), ids.shape[0] * (ids.shape[1] - 1)))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()

    trl_stats = trl_stats[warmup:n_steps]  # the i-th collated batch is step i+1's (prefetch only shifts timing)
    our_stats = our_stats[warmup:]
    sums = lambda st: [sum(x[k] for x in st) for k in range(3)]
    per_batch = {k: dict(zip(("body_tokens", "real_tokens", "head_positions"), (v / len(st) for v in sums(st))))
                 for k, st in (("aligndistil", our_stats), ("trl", trl_stats))}
    times = {"aligndistil": clock.ours_s, "trl_step": clock.step_s, "trl_wall": clock.wall_s}
    res = {
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), torch threads {torch.get_num_threads()}, "
                  f"1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__},
        "model": {"class": "LlamaForCausalLM", **SHAPE, "parameters": n_params},
        "hyper": {**HP, "pairs": args.pairs, "warmup_steps": warmup, "timed_steps": timed,
                  "padding_free": policy_ours.config._attn_implementation != "sdpa",
                  "trl_train_sampling_strategy": cfg.train_sampling_strategy},
        "check": {"same_token_ids": True, "max_abs_ref_logp_diff": ref_diff, "pairs_checked": n_check,
                  "trl_gradient_checkpointing": trainer.model.is_gradient_checkpointing},
        "trl_precompute_s": precompute_s, "times_s": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "mean_s": {k: statistics.mean(v) for k, v in times.items()},
        "per_batch": per_batch,
        "real_tokens_per_s": {"aligndistil": sums(our_stats)[1] / sum(clock.ours_s),
                              "trl": sums(trl_stats)[1] / sum(clock.step_s)},
        # Process CPU seconds (all threads): on a shared machine they leave out the time other jobs held the cores.
        "cpu_times_s": {"aligndistil": clock.ours_cpu, "trl_step": clock.step_cpu},
        "real_tokens_per_cpu_s": {"aligndistil": sums(our_stats)[1] / sum(clock.ours_cpu),
                                  "trl": sums(trl_stats)[1] / sum(clock.step_cpu)},
    }
    res.update(ratio=res["median_s"]["aligndistil"] / res["median_s"]["trl_step"],
               ratio_mean=res["mean_s"]["aligndistil"] / res["mean_s"]["trl_step"],
               ratio_per_real_token=res["real_tokens_per_s"]["trl"] / res["real_tokens_per_s"]["aligndistil"],
               ratio_per_real_token_cpu=res["real_tokens_per_cpu_s"]["trl"] / res["real_tokens_per_cpu_s"]["aligndistil"])
    return {**res, "target_per_real_token": TARGET, "met": res["ratio_per_real_token"] <= TARGET}


def print_table(res: dict) -> None:
    m, pb, h = res["median_s"], res["per_batch"], res["hyper"]
    print(f"LlamaForCausalLM {res['model']['parameters'] / 1e6:.2f}M params, vocab {SHAPE['vocab_size']}; batch "
          f"{HP['batch']} pairs, max_length {HP['max_length']}; {res['device']}\n{res['versions']}; "
          f"{h['timed_steps']} timed steps after {h['warmup_steps']} warm-up; "
          f"TRL sampler {h['trl_train_sampling_strategy']}")
    print("| side | median step s | mean step s | body tok/batch | real tok/batch | head positions/batch |\n"
          "|---|---|---|---|---|---|")
    for name, key, st in (("aligndistil train-dpo", "aligndistil", "aligndistil"),
                          ("TRL DPOTrainer", "trl_step", "trl")):
        print(f"| {name} | {m[key]:.3f} | {res['mean_s'][key]:.3f} | {pb[st]['body_tokens']:.0f} | "
              f"{pb[st]['real_tokens']:.0f} | {pb[st]['head_positions']:.0f} |")
    print(f"TRL step_end->step_end (adds collate + logging): median {m['trl_wall']:.3f} s")
    print(f"step time train-dpo / TRL: median {res['ratio']:.3f}, ratio of means {res['ratio_mean']:.3f}")
    tps = res["real_tokens_per_s"]
    print(f"real tokens/s over the timed window: train-dpo {tps['aligndistil']:.0f}, TRL {tps['trl']:.0f}")
    print(f"time per real token, train-dpo / TRL: {res['ratio_per_real_token']:.3f}  target <= {TARGET}  "
          f"met: {res['met']}")
    print(f"CPU time per real token (process CPU seconds, steadier on a shared machine), train-dpo / TRL: "
          f"{res['ratio_per_real_token_cpu']:.3f}")
    print(f"checks: same token ids; max |ref logp ours - TRL| (16 pairs) = {res['check']['max_abs_ref_logp_diff']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per side")
    parser.add_argument("--steps", type=int, default=22, help="timed steps per side")
    parser.add_argument("--trl-group-by-length", action="store_true",
                        help="TRL with train_sampling_strategy=group_by_length (not its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--padded", action="store_true", help="our side with padded batches (--no-padding-free)")
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 3 timed steps: a smoke test")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "trl_dpo.json"))
    args = parser.parse_args()
    args.warmup, args.steps = (2, 3) if args.quick else (args.warmup, args.steps)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="trl-dpo-bench-") as out_dir:
        res = run(args, out_dir)
    print_table(res)
    write_result(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
