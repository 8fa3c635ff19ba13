"""Each stage's config: its own option groups, composed with the shared ones (groups.py) in --help order.

Values come from defaults < YAML file < command-line flags (files.py). Every field carries its help text
(the CLI shows it verbatim) and its checks; validation raises one ConfigError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aligndistil_cli.config.groups import (
    INPUTS,
    TRAINING,
    DataReading,
    ModelSource,
    Output,
    Run,
    TeacherSharding,
    Tracking,
)
from aligndistil_cli.config.options import Group, compose, kv_cache_opt, opt
from aligndistil_cli.core.errors import ConfigError
from aligndistil_cli.core.variants import VARIANTS


def require_teacher_models(config, variant: str, context: str = "") -> None:
    """Refuse a config that lacks one of the models (dpo, rev, ref) the teacher variant is built from."""
    from aligndistil_cli.losses.functions import teacher_models

    for name in teacher_models(variant):
        if not getattr(config, name):
            raise ConfigError(f"config field {name!r} is required by {context}teacher variant {variant!r}")


@dataclass
class ToyModel(Group):
    panel = "Toy task and model"

    num_sft: int = opt(6000, "SFT examples to write.", positive=True)
    hidden_size: int = opt(128, "Model hidden size.", positive=True)
    num_layers: int = opt(4, "Transformer layers.", positive=True)
    num_heads: int = opt(4, "Attention heads.", positive=True)
    intermediate_size: int = opt(256, "MLP width.", positive=True)
    pad_vocab_to: int = opt(32, "Pad the embedding rows to a multiple of this, past the tokenizer (as real models do).",
                            positive=True)


InitToyConfig = compose("InitToyConfig", Output, ToyModel, Run)


@dataclass
class SftInputs(Group):
    panel = INPUTS

    model: Optional[str] = opt(None, "Model to fine-tune: a Hugging Face model directory or hub id.",
                               required=True, input="model")
    data: Optional[str] = opt(None, "Prompt/response data (JSONL with 'prompt' and 'response').",
                              required=True, input="data")


SftConfig = compose("SftConfig", SftInputs, *TRAINING)


@dataclass
class MakePrefsInputs(Group):
    panel = INPUTS

    model: Optional[str] = opt(None, "Model to sample from.", required=True, input="model")
    data: Optional[str] = opt(None, "Prompts (JSONL with 'prompt').", required=True, input="data")
    reward_model: Optional[str] = opt(None, "Score responses with this AutoModelForSequenceClassification "
                                      "(default: the embedded task's gold reward).", input="model")


@dataclass
class PairSampling(Group):
    panel = "Sampling"

    num_samples: int = opt(2, "Responses sampled per prompt; the best and worst form a pair.", positive=True)
    max_prompts: Optional[int] = opt(None, "Use only the first N prompts.", positive=True)
    temperature: float = opt(1.0, "Sampling temperature.", positive=True)
    top_p: float = opt(1.0, "Nucleus sampling mass.", positive=True, at_most=1.0)
    max_new_tokens: int = opt(48, "Longest response in tokens.", positive=True)
    batch_size: int = opt(128, "Prompts per generation batch.", positive=True)
    kv_cache: str = kv_cache_opt()

    def validate(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(f"config field 'num_samples' must be >= 2 to form a pair; got {self.num_samples}")


MakePrefsConfig = compose("MakePrefsConfig", MakePrefsInputs, Output, PairSampling, ModelSource, DataReading, Run)


@dataclass
class DpoInputs(Group):
    panel = INPUTS

    model: Optional[str] = opt(None, "Reference model, also the policy's initialisation.", required=True, input="model")
    data: Optional[str] = opt(None, "Preference pairs (JSONL with 'prompt', 'chosen', 'rejected').",
                              required=True, input="data")


@dataclass
class DpoMethod(Group):
    panel = "DPO"

    reverse: bool = opt(False, "Train reverse DPO: chosen and rejected swapped, same beta and reference.")
    loss: str = opt("dpo", "dpo; or a baseline of the paper: simpo (SimPO, no reference), tdpo1 or tdpo2 (TDPO, "
                    "with the reference's per-token KL; docs/guide.md).", choices=("dpo", "simpo", "tdpo1", "tdpo2"))
    beta: Optional[float] = opt(None, "beta of the loss; default 0.1 (DPO, TDPO), 2.5 with --loss simpo (the official "
                                "train_simpo.py's).", positive=True)
    simpo_gamma: float = opt(1.25, "--loss simpo: the target reward margin gamma itself, as TRL's simpo_gamma "
                             "(L = -log sigmoid(beta (a_w - a_l) - gamma)); the SimPO and AlignDistil scripts give "
                             "gamma/beta instead (0.5 x 2.5 here).", nonneg=True)
    tdpo_alpha: float = opt(0.5, "--loss tdpo2: alpha, the weight of the sequential KL term (the TDPO paper's "
                            "default).", nonneg=True)
    ref_cache: Optional[str] = opt(None, "Directory for cached reference log-probs (default: OUT/../ref-cache).")

    def validate(self) -> None:
        if self.beta is None:  # resolved here, so that the manifest and a resumed run record the value used
            self.beta = 2.5 if self.loss == "simpo" else 0.1


DpoConfig = compose("DpoConfig", DpoInputs, DpoMethod, *TRAINING)


@dataclass
class PrecomputeInputs(Group):
    panel = INPUTS

    dpo: Optional[str] = opt(None, "DPO model directory.", required=True, input="model")
    rev: Optional[str] = opt(None, "Reverse-DPO model directory (needed by aligndistil and contrastive).",
                             input="model")
    ref: Optional[str] = opt(None, "Reference model (needed by theorem1 and adaptive).", input="model")
    data: Optional[str] = opt(None, "Distillation data: pairs JSONL (prompt + chosen is used).",
                              required=True, input="data")


@dataclass
class Teacher(Group):
    """The composed teacher softmax(z*) of precompute (losses.functions: compose_logits)."""

    panel = "Teacher"

    variant: str = opt("aligndistil", "Teacher: aligndistil, contrastive, theorem1 or adaptive.", choices=VARIANTS)
    beta: float = opt(0.1, "The DPO beta of the teacher models.", positive=True)
    kl_coef: float = opt(0.1, "beta_kl of the contrastive/theorem1 variants (w = beta / kl_coef).", positive=True)
    alpha_scale: float = opt(20.0, "r in alpha_t = r * TVD_t + eps (the official beta2=10 is r=20).", nonneg=True)
    alpha_eps: float = opt(1e-3, "eps in alpha_t = r * TVD_t + eps.", positive=True)
    temperature: float = opt(1.0, "tau: the teacher is softmax(z* / tau).", positive=True)
    alpha_max: Optional[float] = opt(None, "Ours, beyond the paper: cap alpha_t at this value (aligndistil and "
                                     "adaptive; c_t = beta / capped alpha_t). Default: no cap.", positive=True)
    extrapolate_eos: bool = opt(True, "--no-extrapolate-eos (ours, beyond the paper): the teacher's EOS probability "
                                "is the DPO model's own at every position; the other tokens share the rest as in z*.")

    def validate(self) -> None:
        from aligndistil_cli.losses.functions import VARIANT_SPECS

        if self.alpha_max is not None and not VARIANT_SPECS[self.variant].adaptive_alpha:
            raise ConfigError(f"config field 'alpha_max' caps an adaptive alpha_t; variant {self.variant!r} has a fixed one")


@dataclass
class CacheLayout(Group):
    panel = "Cache"

    format: str = opt("auto", "Cache format: logits (full vocabulary), hidden (exact, compact), topk (truncated); "
                      "auto picks logits for small vocabularies and hidden otherwise.",
                      choices=("auto", "logits", "hidden", "topk"))
    top_k: int = opt(64, "Log-probs kept per position by --format topk.", positive=True)
    dtype: str = opt("float32", "dtype of the stored log-probs or hidden states (the combination itself is always "
                     "float32).", choices=("float32", "bfloat16"))
    shard_mb: float = opt(256.0, "Upper bound on one shard's size in MiB.", positive=True)
    max_length: int = opt(128, "Maximum tokens of prompt + response (must match distill).", positive=True)
    max_prompt_length: int = opt(96, "Maximum prompt tokens (must match distill).", positive=True)


@dataclass
class TeacherPasses(Group):
    panel = "Speed and memory"

    batch_size: int = opt(32, "Sequences per forward pass.", positive=True)
    precision: str = opt("auto", "Teacher weights: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32. "
                         "The combination is float32 either way.", choices=("auto", "bf16", "fp32"))
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")


PrecomputeConfig = compose("PrecomputeConfig", PrecomputeInputs, Output, Teacher, CacheLayout, TeacherPasses,
                           TeacherSharding, ModelSource, DataReading, Run,
                           checks=lambda config: require_teacher_models(config, config.variant))


@dataclass
class DistillInputs(Group):
    panel = INPUTS

    student: Optional[str] = opt(None, "Student initialisation (usually the SFT/reference model).",
                                 required=True, input="model")
    data: Optional[str] = opt(None, "Off-policy: the data the cache was computed on (checked against its fingerprint). "
                              "On-policy: prompts (a prompt-only or a preference set).", required=True, input="data")
    mode: str = opt("off-policy", "off-policy (train on the cached teacher over the data's chosen responses) or "
                    "on-policy (sample from the student, teach with live teachers).", choices=("off-policy", "on-policy"))
    cache: Optional[str] = opt(None, "Off-policy: the teacher cache directory written by precompute.", input="cache")
    dpo: Optional[str] = opt(None, "On-policy: the DPO model (run live). Off-policy, optional: the cache must "
                             "have been built from this model.", input="model")
    rev: Optional[str] = opt(None, "On-policy: the reverse-DPO model (run live). Off-policy, optional: checked "
                             "against the cache like --dpo.", input="model")
    ref: Optional[str] = opt(None, "On-policy: the reference model (theorem1 and adaptive only). Off-policy, "
                             "optional: checked against the cache like --dpo.", input="model")


@dataclass
class DistillTeacher(Group):
    """Off-policy: overrides of the cache's recorded teacher (a hidden cache re-mixes it). On-policy: the live teacher."""

    panel = "Teacher"

    alpha_scale: Optional[float] = opt(None, "r of alpha_t = r TVD_t + eps. Off-policy: overrides the cache's (needs a "
                                       "--format hidden cache). On-policy: default 20.", nonneg=True)
    alpha_eps: Optional[float] = opt(None, "eps of alpha_t. Off-policy: overrides the cache's (hidden cache). "
                                     "On-policy: default 1e-3.", positive=True)
    alpha_max: Optional[float] = opt(None, "Ours: cap on alpha_t. Off-policy: overrides the cache's (hidden cache). "
                                     "On-policy: default none (the paper).", positive=True)
    extrapolate_eos: Optional[bool] = opt(None, "Ours: --no-extrapolate-eos keeps the DPO model's EOS probability. "
                                          "Off-policy: overrides the cache's (hidden cache). On-policy: default "
                                          "--extrapolate-eos (the paper).")
    variant: str = opt("aligndistil", "On-policy: teacher variant.", choices=VARIANTS)
    beta: float = opt(0.1, "On-policy: the DPO beta of the teachers.", positive=True)
    kl_coef: float = opt(0.1, "On-policy: beta_kl of contrastive/theorem1.", positive=True)
    teacher_temperature: float = opt(1.0, "On-policy: tau, the teacher is softmax(z*/tau).", positive=True)


@dataclass
class OnPolicySampling(Group):
    panel = "On-policy sampling"

    temperature: float = opt(1.0, "On-policy: sampling temperature.", positive=True)
    top_p: float = opt(1.0, "On-policy: nucleus sampling mass.", positive=True, at_most=1.0)
    max_new_tokens: int = opt(64, "On-policy: longest sampled response.", positive=True)
    kv_cache: str = kv_cache_opt("On-policy: ")
    samples_per_prompt: int = opt(1, "On-policy: responses sampled per prompt.", positive=True)
    updates_per_rollout: int = opt(1, "On-policy: optimizer steps on each rollout batch before sampling again.",
                                   positive=True)
    mix_off_policy: float = opt(0.0, "On-policy: fraction of each batch taken from the data's chosen responses "
                                "(needs preference data).", nonneg=True, below=1.0)


def _distill_checks(config) -> None:
    if config.mode == "off-policy" and not config.cache:
        raise ConfigError("config field 'cache' is required in off-policy mode (flag --cache; or use --mode on-policy)")
    if config.mode == "on-policy":
        require_teacher_models(config, config.variant, "on-policy distillation with ")


DistillConfig = compose("DistillConfig", DistillInputs, DistillTeacher, OnPolicySampling, *TRAINING, TeacherSharding,
                        checks=_distill_checks)


@dataclass
class EvaluateInputs(Group):
    panel = INPUTS

    ref: Optional[str] = opt(None, "Reference (SFT) model: KL and win rate are measured against it.",
                             required=True, input="model")
    models: dict = opt(None, "Models to evaluate, NAME=PATH (repeat the flag).",
                       factory=dict, flag="model", input="model")
    prompts: Optional[str] = opt(None, "Held-out prompts (JSONL with 'prompt').", required=True, input="data")
    pairs: Optional[str] = opt(None, "Held-out preference pairs for implicit-reward accuracy.", input="data")
    dpo: Optional[str] = opt(None, "DPO model, for implicit-reward accuracy on --pairs.", input="model")
    rev: Optional[str] = opt(None, "Reverse-DPO model, for the contrastive reward's accuracy on --pairs.",
                             input="model")
    reward_model: Optional[str] = opt(None, "Score responses with this AutoModelForSequenceClassification "
                                      "(default: the embedded task's gold reward).", input="model")
    teacher: Optional[str] = opt(None, "Also sample the composed teacher softmax(z*) (the upper bound of distillation) "
                                 "and report it as a row: a precompute cache directory (its recorded teacher settings "
                                 "and models are used), or 'models' to compose --dpo and --rev (and --ref where the "
                                 "variant needs it) with --variant and the settings below.", input="cache")
    export_questions: Optional[str] = opt(None, "The benchmark's question file (AlpacaEval eval set, MT-Bench or "
                                          "arena-hard question.jsonl).", input="data")


@dataclass
class EvalSampling(Group):
    panel = "Sampling and scoring"

    num_prompts: int = opt(600, "Held-out prompts to sample (first N).", positive=True)
    temperature: float = opt(1.0, "Sampling temperature.", positive=True)
    top_p: float = opt(1.0, "Nucleus sampling mass.", positive=True, at_most=1.0)
    max_new_tokens: int = opt(48, "Longest response in tokens.", positive=True)
    batch_size: int = opt(128, "Prompts per generation batch.", positive=True)
    kv_cache: str = kv_cache_opt()
    max_length: int = opt(512, "Maximum tokens of a held-out pair (prompt + response).", positive=True)
    max_prompt_length: int = opt(384, "Maximum prompt tokens of a held-out pair or prompt.", positive=True)
    beta: float = opt(0.1, "beta of the implicit rewards.", positive=True)


@dataclass
class EvalReport(Group):
    panel = "Report"

    ref_name: str = opt("reference", "Name of the reference model in the report.")
    teacher_name: str = opt("teacher", "Name of the teacher's row in the report.")
    diagnostic_rows: int = opt(256, "With --teacher and --pairs: chosen responses (first N) for the p(EOS) and "
                               "mirror diagnostics.", positive=True)
    export: Optional[str] = opt(None, "Also write each model's answers to --export-questions in this benchmark's "
                                "own format: alpaca-eval, mt-bench or arena-hard.",
                                choices=("alpaca-eval", "mt-bench", "arena-hard"))

    def validate(self) -> None:
        if self.export and not self.export_questions:
            raise ConfigError("config field 'export_questions' is required by --export")


@dataclass
class TeacherRow(Group):
    """evaluate --teacher models: the teacher composed live from --dpo and --rev."""

    panel = "Teacher row (--teacher models)"

    variant: str = opt("aligndistil", "--teacher models: teacher variant.", choices=VARIANTS)
    kl_coef: float = opt(0.1, "--teacher models: beta_kl of contrastive/theorem1 (w = beta / kl_coef).", positive=True)
    alpha_scale: float = opt(20.0, "--teacher models: r of alpha_t = r TVD_t + eps.", nonneg=True)
    alpha_eps: float = opt(1e-3, "--teacher models: eps of alpha_t.", positive=True)
    alpha_max: Optional[float] = opt(None, "--teacher models: cap on alpha_t (ours; default none).", positive=True)
    extrapolate_eos: bool = opt(True, "--teacher models: --no-extrapolate-eos keeps the DPO model's EOS probability (ours).")
    teacher_temperature: float = opt(1.0, "--teacher models: tau, the teacher is softmax(z*/tau).", positive=True)

    def validate(self) -> None:
        if self.teacher == "models" and not (self.dpo and self.rev):
            raise ConfigError("--teacher models needs --dpo and --rev (the reference is --ref)")


@dataclass
class LmEval(Group):
    """evaluate --lm-eval: EleutherAI's lm-evaluation-harness on every evaluated model (eval/harness.py)."""

    panel = "lm-evaluation-harness"

    lm_eval: Optional[str] = opt(None, "Also score the reference and each model with EleutherAI's "
                                 "lm-evaluation-harness on these tasks, a comma list (e.g. hellaswag,arc_easy). "
                                 "Needs pip install 'aligndistil[lm-eval]'.")
    lm_eval_limit: Optional[int] = opt(None, "--lm-eval: score only the first N documents of each task (the scores "
                                       "are then not comparable with published ones).", positive=True)
    lm_eval_tasks_dir: Optional[str] = opt(None, "--lm-eval: a directory of task YAML files (e.g. over local JSONL "
                                           "files), searched before the harness' own tasks.", input="data")

    def validate(self) -> None:
        for name in ("lm_eval_limit", "lm_eval_tasks_dir"):
            if getattr(self, name) is not None and not self.lm_eval:
                raise ConfigError(f"config field {name!r} needs 'lm_eval' (the tasks to score)")


EvaluateConfig = compose("EvaluateConfig", EvaluateInputs, Output, EvalSampling, EvalReport, TeacherRow, LmEval,
                         ModelSource, DataReading, Tracking, Run)
