"""evaluate --teacher: load the composed teacher's models, and diagnose it on chosen responses.

The teacher is given either as a precompute cache (its recorded spec and
models, refused if a model changed since) or as --dpo/--rev/--ref with the
variant settings. The diagnostics are the teacher health check of health.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aligndistil_cli.config.stages import EvaluateConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import encode_rows, load_data
from aligndistil_cli.model.loading import hub_options, load_model, output_head
from aligndistil_cli.rundir.artifacts import fingerprint_model, input_record
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.teacher.compose import TeacherSpec, float32_heads
from aligndistil_cli.teacher.health import teacher_health

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


def teacher_diagnostics(config: EvaluateConfig, teacher: LoadedTeacher, ref_model, tokenizer, device) -> dict | None:
    """The teacher health check (health.py) over the chosen responses of the first --diagnostic-rows --pairs rows."""
    rows, stats = load_data(config, "pairs", config.pairs)
    examples, _ = encode_rows(tokenizer, rows[: config.diagnostic_rows], "chosen", config, stats)
    models = {"ref": ref_model, **teacher.models}  # the teacher's own reference where it has one
    return teacher_health(models, float32_heads({n: output_head(m) for n, m in models.items()}), teacher.spec,
                          examples, tokenizer.pad_token_id, len(tokenizer), tokenizer.eos_token_id,
                          config.batch_size, device)
