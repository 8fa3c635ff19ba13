"""How far bf16 rounding of the teachers' logits moves the AlignDistil teacher (issue 10).

    python -m bench.teacher_precision [--device cpu|cuda] [--positions 1024] [--vocab 32000]

Teachers' final hidden states and heads are random, with logits of std about 12 and DPO /
reverse-DPO far enough apart that alpha_t = 20 TVD_t + 1e-3 averages about 2 (the regime of the
issue). Three teachers are compared with the float32 one, per position:
  - bf16 heads: F.linear under bf16 autocast, as training's autocast did before the fix;
  - fixed path: teacher.encode_chunk inside the same autocast (what precompute, distill and
    on-policy run now);
and, on CUDA, the step time of the float32 heads against bf16 heads for the same positions.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from aligndistil_cli.losses.functions import compose_teacher_full
from aligndistil_cli.teacher.compose import TeacherSpec, encode_chunk, float32_heads

SPEC = TeacherSpec("aligndistil", 0.1, 0.1, 20.0, 1e-3, 1.0)


def inputs(n: int, h: int, vocab: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab, h, generator=gen) * (12 / math.sqrt(h))
    heads = {name: ((base + torch.randn(vocab, h, generator=gen) * (0.25 / math.sqrt(h))).to(device), None)
             for name in ("dpo", "rev")}
    dpo = torch.randn(n, h, generator=gen)
    hidden = {"dpo": dpo.to(device), "rev": (dpo + 0.04 * torch.randn(n, h, generator=gen)).to(device)}
    return hidden, heads


def teacher_logprobs(hidden, heads, vocab, bf16_heads: bool, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if bf16_heads:
            z = {name: F.linear(hidden[name], heads[name][0]).float() for name in hidden}
            teacher = compose_teacher_full(z["dpo"], z["rev"], vocab_size=vocab)
            return torch.log_softmax(teacher.logits.float(), -1)
        return encode_chunk("logits", hidden, float32_heads(heads), SPEC, vocab, torch.float32, 8, host=False)[
            "teacher_logprobs"]


def exact_logprobs(hidden, heads, vocab, device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device.type, enabled=False):
        fields = encode_chunk("logits", hidden, float32_heads(heads), SPEC, vocab, torch.float32, 8, host=False)
    return fields["teacher_logprobs"], fields["alpha"]


def compare(exact: torch.Tensor, other: torch.Tensor) -> dict:
    tvd = 0.5 * (exact.exp() - other.exp()).abs().sum(-1)
    return {"tvd_mean": tvd.mean().item(), "tvd_max": tvd.max().item(),
            "max_abs_logprob_diff": (exact - other).abs().max().item()}


def head_step_ms(hidden, heads, vocab, bf16_heads: bool, device, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        teacher_logprobs(hidden, heads, vocab, bf16_heads, device)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden, heads = inputs(args.positions, args.hidden, args.vocab, device)
    exact, alpha = exact_logprobs(hidden, heads, args.vocab, device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "positions": args.positions, "hidden": args.hidden, "vocab": args.vocab,
              "alpha_mean": alpha.mean().item(),
              "bf16_heads": compare(exact, teacher_logprobs(hidden, heads, args.vocab, True, device)),
              "float32_heads": compare(exact, teacher_logprobs(hidden, heads, args.vocab, False, device))}
    if device.type == "cuda":
        result["head_ms_bf16"] = head_step_ms(hidden, heads, args.vocab, True, device)
        result["head_ms_float32"] = head_step_ms(hidden, heads, args.vocab, False, device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
