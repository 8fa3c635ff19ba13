"""evaluate --teacher: load the composed teacher's models, and diagnose it on chosen responses.

The teacher is given either as a precompute cache (its recorded spec and
models, refused if a model changed since) or as --dpo/--rev/--ref with the
variant settings. The diagnostics explain a teacher's behaviour:

  p(EOS) at the ends of chosen responses, under the reference, DPO, reverse
  DPO and the teacher: extrapolating a small EOS difference can make the
  teacher never stop.
  The mirror cosine cos(D_dpo, -D_rev), D_m = log pi_m - log pi_ref over the
  vocabulary at each response position: near 1, reverse DPO is DPO's mirror
  image around the reference and z* is DPO extrapolated (DESIGN.md section 5).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from aligndistil_cli.rundir.artifacts import fingerprint_model, input_record
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.config.stages import EvaluateConfig
from aligndistil_cli.data.encode import collate, encode_rows, load_data
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.model.loading import hub_options, load_model, output_head, response_hidden
from aligndistil_cli.teacher.compose import TeacherSpec, compose, head_logits_real

POSITION_CHUNK = 256


@dataclass
class LoadedTeacher:
    spec: TeacherSpec
    models: dict          # name -> model, for every name in spec.models
    source: str           # the cache directory, or "models"
    inputs: dict          # manifest input records


def load_teacher(config: EvaluateConfig, tokenizer, ref_model, device) -> LoadedTeacher:
    if config.teacher == "models":
        spec = TeacherSpec(config.variant, config.beta, config.kl_coef, config.alpha_scale, config.alpha_eps,
                           config.teacher_temperature, config.alpha_max,
                           None if config.extrapolate_eos else tokenizer.eos_token_id)
        paths = {name: getattr(config, name) for name in spec.models}
        inputs = {f"teacher_{n}": input_record("model", p, fingerprint_model(p)) for n, p in paths.items()}
    else:
        cache = TeacherCache(Path(config.teacher))
        spec, recorded = cache.spec, cache.manifest["inputs"]
        paths = {name: recorded[name]["path"] for name in spec.models}
        for name, path in paths.items():
            if fingerprint_model(path) != recorded[name]["fingerprint"]:
                raise UserError(f"teacher cache {cache.path}: its {name} model {path} changed since the cache was built")
        inputs = {"teacher": input_record("teacher-cache", config.teacher, cache.index["settings_key"])}
    same_as_ref = {n for n, p in paths.items() if Path(p).resolve() == Path(config.ref).resolve()}
    models = {n: ref_model if n in same_as_ref else load_model(p, device, **hub_options(config)).eval()
              for n, p in paths.items()}
    return LoadedTeacher(spec, models, str(config.teacher), inputs)


def mirror_cosine(ref: torch.Tensor, dpo: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """cos(D_dpo, -D_rev) per position: logits [N, V] -> [N] float32, D_m = log_softmax(m) - log_softmax(ref)."""
    lr = torch.log_softmax(ref.float(), dim=-1)
    d_dpo = torch.log_softmax(dpo.float(), dim=-1) - lr
    d_rev = torch.log_softmax(rev.float(), dim=-1) - lr
    return torch.nn.functional.cosine_similarity(d_dpo, -d_rev, dim=-1)


def eos_mirror_chunk(logits: dict[str, torch.Tensor], spec: TeacherSpec, vocab: int, eos_id: int) -> dict:
    """Per position [N]: p(EOS) of ref, dpo, rev and the teacher, and the mirror cosine. logits: name -> [N, V]."""
    teacher = torch.log_softmax(compose({n: logits[n] for n in spec.models}, spec, vocab).logits, dim=-1)
    out = {name: torch.softmax(logits[name][:, :vocab].float(), dim=-1)[:, eos_id] for name in ("ref", "dpo", "rev")}
    out["teacher"] = teacher[:, eos_id].exp()
    out["mirror"] = mirror_cosine(*(logits[n][:, :vocab] for n in ("ref", "dpo", "rev")))
    return out


def summarise_diagnostics(parts: list[dict], is_end: torch.Tensor) -> dict:
    """Means of p(EOS) at the ends of responses and medians of the mirror cosine, from per-position parts."""
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ends = is_end.bool()
    return {"responses_ending_in_eos": int(ends.sum()), "positions": int(is_end.numel()),
            "p_eos_at_end": {k: cat[k][ends].mean().item() if ends.any() else None
                             for k in ("ref", "dpo", "rev", "teacher")},
            "p_eos_elsewhere": {k: cat[k][~ends].mean().item() if (~ends).any() else None
                                for k in ("ref", "dpo", "rev", "teacher")},
            "mirror_cosine_median": statistics.median(cat["mirror"].tolist()),
            "mirror_cosine_median_at_end": statistics.median(cat["mirror"][ends].tolist()) if ends.any() else None}


@torch.no_grad()
def teacher_diagnostics(config: EvaluateConfig, teacher: LoadedTeacher, ref_model, tokenizer, device) -> dict | None:
    """p(EOS) and the mirror cosine over the chosen responses of the first --diagnostic-rows --pairs rows."""
    if "rev" not in teacher.models:
        return None  # theorem1 / adaptive built without the reverse model: no mirror to measure
    rows, stats = load_data(config, "pairs", config.pairs)
    examples, _ = encode_rows(tokenizer, rows[: config.diagnostic_rows], "chosen", config, stats)
    models = {"ref": ref_model, **teacher.models}  # the teacher's own reference where it has one
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    parts, ends = [], []
    for s in range(0, len(examples), config.batch_size):
        batch = collate(examples[s : s + config.batch_size], tokenizer.pad_token_id).to(device)
        hidden = {n: response_hidden(m, batch) for n, m in models.items()}
        heads = {n: output_head(m) for n, m in models.items()}
        targets = batch.targets[batch.loss_mask]
        # The last selected position of each row predicts its final token: an end when that token is EOS.
        last = torch.zeros_like(batch.loss_mask)
        last[torch.arange(last.shape[0]), batch.loss_mask.long().cumsum(1).argmax(1)] = True
        ends.append((last[batch.loss_mask] & (targets == eos)).cpu())
        for c in range(0, targets.shape[0], POSITION_CHUNK):
            chunk = {n: head_logits_real(h[c : c + POSITION_CHUNK], heads[n], vocab) for n, h in hidden.items()}
            parts.append({k: v.cpu() for k, v in eos_mirror_chunk(chunk, teacher.spec, vocab, eos).items()})
    return summarise_diagnostics(parts, torch.cat(ends)) if parts else None
