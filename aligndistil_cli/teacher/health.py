"""The teacher health check: will the composed teacher stop, how far does it extrapolate, and does
reverse DPO merely mirror DPO? Measured on the chosen responses of a preference set, per response
position:

  p(EOS) under the reference, DPO, reverse DPO and the composed teacher. Its mean where the chosen
  responses end (the position that predicts their EOS) says whether the teacher stops where the data
  stops: extrapolating a small EOS difference can drive the teacher's to ~0 (DESIGN.md section 5),
  and its students then run to the length cap.
  alpha_t and TVD_t, as quantiles.
  The mirror cosine cos(D_dpo, -D_rev), D_m = log pi_m - log pi_ref over the vocabulary: near 1,
  reverse DPO is DPO's mirror image around the reference, and z* is DPO extrapolated.

precompute records it in its manifest and prints it; evaluate repeats it (report.json, report.md).
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from aligndistil_cli.data.encode import collate
from aligndistil_cli.model.loading import response_hidden
from aligndistil_cli.parallel import fsdp
from aligndistil_cli.teacher.compose import TeacherSpec, compose, head_logits_real

HEALTH_ROWS = 256  # chosen responses checked (the first rows of the data)
POSITION_CHUNK = 256
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
# The teacher would not stop when its p(EOS) where chosen responses end is below this share of the DPO model's.
STOP_SHARE = 0.1
_MODELS = ("ref", "dpo", "rev", "teacher")


def mirror_cosine(ref: torch.Tensor, dpo: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """cos(D_dpo, -D_rev) per position: logits [N, V] -> [N] float32, D_m = log_softmax(m) - log_softmax(ref)."""
    lr = torch.log_softmax(ref.float(), dim=-1)
    d_dpo = torch.log_softmax(dpo.float(), dim=-1) - lr
    d_rev = torch.log_softmax(rev.float(), dim=-1) - lr
    return torch.nn.functional.cosine_similarity(d_dpo, -d_rev, dim=-1)


def position_stats(logits: dict[str, torch.Tensor], spec: TeacherSpec, vocab: int, eos_id: int) -> dict:
    """Per position [N]: p(EOS) of every model given and of the teacher, alpha_t, TVD_t and (with ref and rev)
    the mirror cosine. logits: name -> [N, V] for spec.models, plus "ref" where the reference is known."""
    teacher = compose({n: logits[n] for n in spec.models}, spec, vocab)
    out = {name: torch.softmax(z[:, :vocab].float(), dim=-1)[:, eos_id] for name, z in logits.items()}
    out.update(teacher=torch.log_softmax(teacher.logits, dim=-1)[:, eos_id].exp(), alpha=teacher.alpha.reshape(-1),
               tvd=teacher.tvd.reshape(-1))
    if "ref" in logits and "rev" in logits:
        out["mirror"] = mirror_cosine(*(logits[n][:, :vocab] for n in ("ref", "dpo", "rev")))
    return out


def _quantiles(values: torch.Tensor) -> dict:
    return {k: torch.quantile(values.double(), q).item() for k, q in QUANTILES.items()}


def summarise(parts: list[dict], is_end: torch.Tensor, spec: TeacherSpec) -> dict:
    """The health record from per-position parts and the mask of positions where a response ends in EOS."""
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ends = is_end.bool()

    def mean_where(mask: torch.Tensor) -> dict:
        return {k: cat[k][mask].mean().item() if k in cat and mask.any() else None for k in _MODELS}

    health = {"spec": dataclasses.asdict(spec), "responses_ending_in_eos": int(ends.sum()),
              "positions": int(is_end.numel()), "p_eos_at_end": mean_where(ends), "p_eos_elsewhere": mean_where(~ends),
              "alpha": _quantiles(cat["alpha"]), "tvd": _quantiles(cat["tvd"]),
              "mirror_cosine_median": statistics.median(cat["mirror"].tolist()) if "mirror" in cat else None,
              "mirror_cosine_median_at_end": statistics.median(cat["mirror"][ends].tolist())
              if "mirror" in cat and ends.any() else None}
    health["warning"] = stop_warning(health)
    return health


@torch.no_grad()
def teacher_health(models: dict, heads: dict, spec: TeacherSpec, examples: list, pad_id: int, vocab: int,
                   eos_id: int, batch_size: int, device) -> dict | None:
    """The health record over examples (prompt + chosen): models and heads by name, spec.models plus "ref"
    where the reference is known (heads: float32 (weight, bias), gathered where a model is sharded)."""
    parts, ends = [], []
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size], pad_id).to(device)
        hidden = {n: fsdp.redirect(m, response_hidden, m, batch) for n, m in models.items()}
        targets = batch.targets[batch.loss_mask]
        # The last selected position of each row predicts its final token: an end when that token is EOS.
        last = torch.zeros_like(batch.loss_mask)
        last[torch.arange(last.shape[0]), batch.loss_mask.long().cumsum(1).argmax(1)] = True
        ends.append((last[batch.loss_mask] & (targets == eos_id)).cpu())
        for c in range(0, targets.shape[0], POSITION_CHUNK):
            chunk = {n: head_logits_real(h[c : c + POSITION_CHUNK], heads[n], vocab) for n, h in hidden.items()}
            parts.append({k: v.cpu() for k, v in position_stats(chunk, spec, vocab, eos_id).items()})
    return summarise(parts, torch.cat(ends), spec) if parts else None


def stop_warning(health: dict) -> str | None:
    """One line when the teacher's p(EOS) where chosen responses end is far below the DPO model's."""
    p = health["p_eos_at_end"]
    teacher, dpo = p.get("teacher"), p.get("dpo")
    if teacher is None or dpo is None or teacher >= STOP_SHARE * dpo:
        return None
    return (f"warning: the teacher would not stop: its p(EOS) where chosen responses end is {teacher:.2g}, against "
            f"{dpo:.2g} under the DPO model, so its students run to the length cap; cap alpha_t (--alpha-max, e.g. 2) "
            "or keep the DPO model's EOS probability (--no-extrapolate-eos)")
