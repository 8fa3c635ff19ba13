"""Teacher cache formats: what precompute stores per position, and how distill
turns it back into teacher log-probs one chunk of positions at a time.

  logits  full teacher log-probs [n, vocab] (exact; about 4 * vocab bytes/token)
  hidden  each teacher's final hidden state [n, H] in the run's dtype, plus the
          output heads once per cache; distill rebuilds z* exactly with the
          stored float32 alpha_t (about 2 * H * 2 bytes/token in bf16)
  topk    the k largest teacher log-probs and their ids, plus the log of the
          remaining mass, spread evenly over the other ids (biased; small)

Every format also stores TVD_t, alpha_t and c_t in float32. Only `hidden`
can serve other r / eps without recomputing (alpha_t = r * TVD_t + eps is
applied at distill time); `logits` and `topk` bake alpha into the distribution.

Two options of ours, beyond the paper (both off by default, recorded in the
spec): alpha_max caps the adaptive alpha_t (and c_t = beta / alpha_t follows
the capped value); keep_eos gives the EOS token the DPO model's own
probability at every position, the other tokens sharing the rest in the
proportions of softmax(z*): the stop decision is never extrapolated.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from aligndistil_cli.config.stages import DistillConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.losses.functions import (
    VARIANT_SPECS,
    Teacher,
    combine_logits,
    compose_teacher_full,
    teacher_alpha,
    teacher_models,
)

FORMATS = ("logits", "hidden", "topk")
SCALARS = ("coef", "alpha", "tvd")
SCALAR_BYTES = 12
# Above this the full-vocabulary cache is refused (it is about 600 KB/token at V = 151,936).
LOGITS_MAX_BYTES_PER_TOKEN = 64 * 1024


@dataclass(frozen=True)
class TeacherSpec:
    """The settings that define the teacher distribution (recorded in the cache index)."""

    variant: str
    beta: float
    kl_coef: float
    alpha_scale: float
    alpha_eps: float
    temperature: float
    alpha_max: float | None = None  # cap on the adaptive alpha_t; None: no cap (the paper)
    keep_eos: int | None = None     # token id (EOS) that keeps the DPO model's probability; None: the paper

    @property
    def models(self) -> tuple[str, ...]:
        return teacher_models(self.variant)


def head_logits_real(hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None], vocab: int) -> torch.Tensor:
    """[n, vocab] float32 logits over real tokens only: padded rows never enter a softmax.

    The matmul itself runs in float32 with autocast off, whatever the dtype of
    the hidden states and the head (see exact_float32).
    """
    weight, bias = head
    with exact_float32(hidden.device):
        return F.linear(hidden.float(), weight[:vocab].float(), bias[:vocab].float() if bias is not None else None)


@contextmanager
def exact_float32(device: torch.device):
    """Autocast off: the teacher's heads, TVD, alpha_t and z* must not be rounded to bf16.

    training.train opens a bf16 autocast around every loss on CUDA, and the
    teachers may run in bf16; logits rounded to bf16 and then multiplied by
    alpha_t (often 2 to 6, up to 20) would move the teacher by a visible TVD.
    """
    with torch.autocast(device.type, enabled=False):
        yield


def float32_heads(heads: dict) -> dict:
    """Each teacher head (weight, bias) as float32, converted once instead of once per chunk."""
    return {name: tuple(t.float() if t is not None else None for t in head) for name, head in heads.items()}


def compose(logits: dict[str, torch.Tensor], spec: TeacherSpec, vocab: int) -> Teacher:
    """The composed teacher (losses.compose_teacher_full) from per-model logits, in float32, with spec's
    own options (alpha_max, keep_eos)."""
    with exact_float32(logits["dpo"].device):
        teacher = compose_teacher_full(
            logits["dpo"], logits.get("rev"), ref_logits=logits.get("ref"), variant=spec.variant,
            beta=spec.beta, kl_coef=spec.kl_coef, alpha_scale=spec.alpha_scale, alpha_eps=spec.alpha_eps,
            temperature=spec.temperature, vocab_size=vocab,
        )
        if spec.alpha_max is None and spec.keep_eos is None:
            return teacher
        z = {name: t[..., :vocab].float() for name, t in logits.items()}
        alpha, coef = cap_alpha(teacher.alpha, teacher.coef, spec)
        combined = combine_logits(spec.variant, z["dpo"], z.get("rev"), z.get("ref"), alpha) / spec.temperature
        return Teacher(keep_token(combined, z["dpo"] / spec.temperature, spec.keep_eos), alpha, coef, teacher.tvd)


def cap_alpha(alpha: torch.Tensor, coef: torch.Tensor, spec: TeacherSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(alpha_t, alpha_max), beta / capped alpha_t) for adaptive variants; unchanged otherwise."""
    if spec.alpha_max is None or not VARIANT_SPECS[spec.variant].adaptive_alpha:
        return alpha, coef
    capped = alpha.clamp(max=spec.alpha_max)
    return capped, spec.beta / capped


# p_dpo(EOS) is kept below 1 so that the other tokens' share, log(1 - p), stays finite.
_KEEP_MAX = 1.0 - 1e-6


def keep_token(teacher_logits: torch.Tensor, dpo_logits: torch.Tensor, token: int | None) -> torch.Tensor:
    """Log-probs [..., V] of softmax(teacher_logits) with token's probability replaced by softmax(dpo_logits)'s.

    The other tokens keep their relative teacher probabilities and share 1 - p_dpo(token).
    token None returns the teacher's log-probs unchanged.
    """
    if token is None:
        return torch.log_softmax(teacher_logits, dim=-1)
    keep = torch.log_softmax(dpo_logits.float(), dim=-1)[..., token].clamp(max=math.log(_KEEP_MAX))
    rest = teacher_logits.float().clone()
    rest[..., token] = float("-inf")
    out = torch.log_softmax(rest, dim=-1) + torch.log1p(-keep.exp()).unsqueeze(-1)
    out[..., token] = keep
    return out


def bytes_per_position(fmt: str, vocab: int, hidden: int, n_models: int, itemsize: int, top_k: int) -> int:
    if fmt == "logits":
        return vocab * itemsize + SCALAR_BYTES
    if fmt == "hidden":
        return n_models * hidden * itemsize + SCALAR_BYTES
    return top_k * (itemsize + 4) + 4 + SCALAR_BYTES


def encode_chunk(fmt: str, hidden: dict[str, torch.Tensor], heads: dict, spec: TeacherSpec, vocab: int,
                 store_dtype: torch.dtype, top_k: int, host: bool = True) -> dict[str, torch.Tensor]:
    """What one chunk of positions stores, for format fmt. hidden: name -> [n, H].

    host=False keeps the result on the device (the live teacher of on-policy distillation).
    """
    move = (lambda t: t.cpu()) if host else (lambda t: t)
    teacher = compose({name: head_logits_real(h, heads[name], vocab) for name, h in hidden.items()}, spec, vocab)
    out = {key: move(getattr(teacher, key)) for key in SCALARS}
    if fmt == "hidden":
        out.update({f"hidden_{name}": move(h.to(store_dtype)) for name, h in hidden.items()})
        return out
    with exact_float32(teacher.logits.device):
        logprobs = torch.log_softmax(teacher.logits, dim=-1)
    if fmt == "logits":
        out["teacher_logprobs"] = move(logprobs.to(store_dtype))
        return out
    out.update({k: move(v) for k, v in topk_fields(logprobs, top_k, store_dtype).items()})
    return out


def topk_fields(logprobs: torch.Tensor, k: int, store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Top-k log-probs [n, k], their ids [n, k] int32 and the log of the remaining mass [n]."""
    top, ids = logprobs.topk(k, dim=-1)
    # The tail mass is computed exactly (a logsumexp), not as log(1 - sum), which cancels badly.
    log_tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return {"topk_logprobs": top.to(store_dtype), "topk_ids": ids.to(torch.int32), "log_tail": log_tail}


def logq_fn(fmt: str, fields: dict[str, torch.Tensor], heads: dict, spec: TeacherSpec, vocab: int,
            device: torch.device) -> Callable[[int, int], torch.Tensor]:
    """teacher_fn(start, end) -> teacher log-probs [end - start, vocab] float32 for fused_head_kl_loss."""
    if fmt == "logits":
        logprobs = fields["teacher_logprobs"]
        return lambda s, e: logprobs[s:e].to(device).float()
    if fmt == "topk":
        ids, top, tail = fields["topk_ids"], fields["topk_logprobs"], fields["log_tail"]
        spread = math.log(max(1, vocab - ids.shape[-1]))

        def topk_logq(s: int, e: int) -> torch.Tensor:
            rest = (tail[s:e].to(device).float() - spread).unsqueeze(-1)
            dense = rest.expand(e - s, vocab).clone()
            return dense.scatter(-1, ids[s:e].to(device).long(), top[s:e].to(device).float())

        return topk_logq

    alpha = fields["alpha"]

    def hidden_logq(s: int, e: int) -> torch.Tensor:
        z = {name: head_logits_real(fields[f"hidden_{name}"][s:e].to(device), heads[name], vocab)
             for name in spec.models}
        with exact_float32(device):
            combined = combine_logits(spec.variant, z["dpo"], z.get("rev"), z.get("ref"), alpha[s:e].to(device))
            return keep_token(combined / spec.temperature, z["dpo"] / spec.temperature, spec.keep_eos)

    return hidden_logq


def realpha(fields: dict[str, torch.Tensor], spec: TeacherSpec) -> dict[str, torch.Tensor]:
    """alpha_t and c_t recomputed from the stored TVD_t with spec's r and eps (hidden format)."""
    alpha, coef = cap_alpha(*teacher_alpha(spec.variant, fields["tvd"], beta=spec.beta, kl_coef=spec.kl_coef,
                                           alpha_scale=spec.alpha_scale, alpha_eps=spec.alpha_eps), spec)
    return {**fields, "alpha": alpha, "coef": coef}


def check_head_reproduces(model, name: str, batch, hidden: torch.Tensor, head: tuple, vocab: int,
                          tol: float = 1e-3) -> None:
    """Refuse a model whose logits are not head(final hidden): the hidden format would be wrong.

    hidden: the model's response_hidden on batch; head: its output head (weight, bias), whole (a sharded
    model's is gathered once per run, precompute.teacher_heads). The logits come from the model's own
    forward, its root forward when it is sharded.
    """
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.loss_mask]
    rebuilt = head_logits_real(hidden, head, vocab)
    err = (full[:, :vocab].float() - rebuilt).abs().max().item()
    scale = max(1.0, full[:, :vocab].float().abs().max().item())
    # The model's own logits may be rounded to its dtype (bf16 on CUDA); the float32 rebuild is not.
    if err > max(tol, 2 * torch.finfo(full.dtype).eps) * scale:
        raise UserError(f"{name}: the output head applied to the final hidden states does not reproduce the "
                        f"model's logits (max abs error {err:.3g}); use --format logits or topk for this model")


def spec_overrides(config: DistillConfig, eos_id: int) -> dict:
    """TeacherSpec fields that distill's own options set: r, eps, the alpha_t cap and the kept EOS."""
    overrides = {k: getattr(config, k) for k in ("alpha_scale", "alpha_eps", "alpha_max")
                 if getattr(config, k) is not None}
    if config.extrapolate_eos is not None:
        overrides["keep_eos"] = None if config.extrapolate_eos else eos_id
    return overrides
