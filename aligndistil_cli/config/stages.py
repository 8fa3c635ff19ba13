"""One dataclass per stage. Values come from defaults < YAML file < command-line flags.

Every field carries its help text (the CLI shows it verbatim) and its checks;
validation raises one ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from aligndistil_cli.config.trackers import parse_report_to
from aligndistil_cli.core.errors import ConfigError, shown
from aligndistil_cli.core.variants import VARIANTS
from aligndistil_cli.core.yamlio import parse_yaml
from aligndistil_cli.data.sources import FORMATS as SOURCE_FORMATS
from aligndistil_cli.model.kv_cache import KV_CACHE_HELP, KV_CACHES


def opt(default: Any = None, help: str = "", *, required: bool = False, choices: tuple | None = None,
        positive: bool = False, nonneg: bool = False, at_most: float | None = None, below: float | None = None,
        flag: str | None = None, input: str | None = None, factory=None):
    """A config field. positive/nonneg/at_most/below/choices/required are checked in __post_init__, and a float
    must be finite. input marks a path the stage reads, and what it is: "model", "cache" (a teacher cache) or
    "data" (a file, a directory or a hub data set). --out may not overlap an input (stages.preflight), and a
    checkpoint records what each one was (checkpoint.input_fingerprints)."""
    meta = {"help": help, "required": required, "choices": choices, "positive": positive, "nonneg": nonneg,
            "at_most": at_most, "below": below, "flag": flag, "input": input}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def kv_cache_opt(prefix: str = ""):
    """The sampler's --kv-cache, worded the same in every stage that samples."""
    return opt("auto", prefix + KV_CACHE_HELP, choices=KV_CACHES)


@dataclass
class StageConfig:
    """Fields shared by every stage."""

    out: Optional[str] = opt(None, "Output directory of the stage.", required=True)
    seed: int = opt(0, "Random seed; the same seed and config give the same result on CPU.", nonneg=True)
    device: str = opt("auto", "Device: auto (cuda when available), cpu, or cuda[:N].")
    force: bool = opt(False, "Start OUT over: replace whatever it holds (even another stage's output or files "
                      "aligndistil did not write) and discard its checkpoints.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if meta.get("required") and value in (None, ""):
                raise ConfigError(f"config field {f.name!r} is required (flag --{f.name.replace('_', '-')})")
            if value is not None:
                _check_range(f.name, value, meta)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""


def _check_range(name: str, value: Any, meta: Mapping) -> None:
    """One ConfigError naming the field when value is outside its field's range (inf and nan are outside all)."""
    def refuse(rule: str) -> None:
        raise ConfigError(f"config field {name!r} must be {rule}; got {shown(value)}")

    if meta.get("choices") and value not in meta["choices"]:
        refuse(f"one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, float) and not math.isfinite(value):
        refuse("a finite number")
    if meta.get("positive") and not value > 0:
        refuse("> 0")
    if meta.get("nonneg") and not value >= 0:
        refuse(">= 0")
    if meta.get("at_most") is not None and not value <= meta["at_most"]:
        refuse(f"<= {meta['at_most']:g}")
    if meta.get("below") is not None and not value < meta["below"]:
        refuse(f"< {meta['below']:g}")


@dataclass
class ModelFields(StageConfig):
    """How models are loaded from a directory or the hub."""

    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the models.")
    trust_remote_code: bool = opt(False, "Allow model code from the model's repository to run (off: never).")


@dataclass
class DataFields(ModelFields):
    """How --data is read (sources.py): local files or a hub dataset, in any supported format."""

    split: str = opt("train", "Split of a hub dataset (e.g. train_prefs for UltraFeedback).")
    subset: Optional[str] = opt(None, "Subset (configuration) of a hub dataset.")
    data_format: str = opt("auto", "Row format; auto detects it.", choices=("auto", *SOURCE_FORMATS))
    prompt_key: Optional[str] = opt(None, "Column holding the prompt (default: prompt).")
    chosen_key: Optional[str] = opt(None, "Column holding the chosen response (default: chosen).")
    rejected_key: Optional[str] = opt(None, "Column holding the rejected response (default: rejected).")
    messages_key: Optional[str] = opt(None, "Column holding a conversation (default: messages).")
    skip_bad_rows: bool = opt(False, "Skip malformed rows (counted per reason in the manifest) instead of stopping.")
    chat_template: bool = opt(True, "Apply the tokenizer's chat template when it has one.")
    refuse_special_tokens: bool = opt(False, "Treat a row whose message text contains a special token (e.g. "
                                      "<|im_end|>) as bad, instead of counting it and warning.")


@dataclass
class TrackingFields(StageConfig):
    """--report-to: mirror metrics.jsonl (and evaluate's table) to experiment trackers (tracking.py)."""

    report_to: str = opt("none", "Experiment trackers, a comma list of none, tensorboard, wandb, trackio, mlflow "
                         "(each an optional extra, e.g. pip install 'aligndistil[wandb]').")
    run_name: Optional[str] = opt(None, "Run name in the trackers (default: the output directory's name).")
    project: Optional[str] = opt(None, "Tracker project (W&B, trackio) or experiment (MLflow); default: "
                                 "$WANDB_PROJECT, else aligndistil.")

    def __post_init__(self) -> None:
        parse_report_to(self.report_to)
        super().__post_init__()


@dataclass
class HubFields(StageConfig):
    """--push-to-hub: upload the finished output directory (hub.py)."""

    push_to_hub: Optional[str] = opt(None, "After the output is complete, upload it to this Hugging Face Hub "
                                     "model repo (USER/NAME).")
    hub_private: bool = opt(False, "Create the --push-to-hub repo as private.")


@dataclass
class TrainingFields(DataFields, TrackingFields, HubFields):
    epochs: int = opt(1, "Passes over the data.", positive=True)
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (overrides epochs).", positive=True)
    batch_size: int = opt(16, "Sequences (or pairs) per optimizer step.", positive=True)
    lr: float = opt(1e-4, "Peak learning rate (AdamW).", positive=True, at_most=1.0)
    warmup_ratio: float = opt(0.1, "Fraction of steps for linear warm-up.", nonneg=True, below=1.0)
    min_lr_ratio: float = opt(0.1, "Cosine schedule floor as a fraction of lr.", nonneg=True, at_most=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", nonneg=True)
    adam_beta1: float = opt(0.9, "AdamW beta1.", nonneg=True, below=1.0)
    adam_beta2: float = opt(0.95, "AdamW beta2.", nonneg=True, below=1.0)
    adam_eps: float = opt(1e-8, "AdamW epsilon: gradients far below it take steps proportional to them, not of size lr.",
                          positive=True)
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 disables).", nonneg=True)
    max_length: int = opt(128, "Maximum tokens of prompt + response.", positive=True)
    max_prompt_length: int = opt(96, "Maximum prompt tokens (prompts are cut from the left).", positive=True)
    chunk_size: int = opt(128, "Positions per output-head chunk in the loss (memory is O(chunk x vocab)).", positive=True)
    log_every: int = opt(1, "Write metrics.jsonl every N steps.", positive=True)
    grad_accum: int = opt(1, "Split each step's batch into this many micro-batches (same global batch, less memory).",
                          positive=True)
    group_by_length: bool = opt(True, "Batch sequences of similar length together so padding costs little.")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32. The teacher and the "
                         "losses are always combined in float32.", choices=("auto", "bf16", "fp32"))
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")
    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in the backward pass to save memory.")
    padding_free: bool = opt(True, "Pack each micro-batch's sequences into one row (positions restart per sequence, "
                             "attention stays within each) instead of padding them; falls back to padded batches, "
                             "saying why, where the model's attention cannot.")
    compile: bool = opt(False, "torch.compile each decoder layer of the model being trained (the chunked loss stays "
                        "eager); the first steps pay for compilation (README: where it helps).")
    eval_every: int = opt(0, "Every N steps, sample --eval-prompts and log eval_reward and eval_kl (0: never).",
                          nonneg=True)
    eval_prompts: Optional[str] = opt(None, "Prompts for --eval-every (a held-out prompt set).", input="data")
    eval_num_prompts: int = opt(64, "How many of --eval-prompts to sample.", positive=True)
    eval_max_new_tokens: int = opt(48, "Longest response sampled by --eval-every.", positive=True)
    reward_model: Optional[str] = opt(None, "Reward model for --eval-every (default: the embedded task's gold reward).",
                                      input="model")
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning). Needs the optional peft extra: pip install 'aligndistil[lora]'.",
                      nonneg=True)
    lora_alpha: float = opt(16.0, "LoRA alpha (the adapter is scaled by alpha / r).", positive=True)
    lora_target: str = opt("all-linear", "Modules that get adapters: all-linear, or comma-separated names "
                           "(e.g. q_proj,v_proj).")
    save_every: int = opt(100, "Write a resumable checkpoint every N steps (0: never); on-policy rounds N up to a "
                          "multiple of --updates-per-rollout.", nonneg=True)
    keep_checkpoints: int = opt(2, "Keep at most this many checkpoints.", positive=True)
    resume: bool = opt(False, "Continue from the latest complete checkpoint in OUT/checkpoints.")
    skip_nonfinite: int = opt(0, "Tolerate up to N steps with a non-finite loss or gradient (they are skipped and counted).",
                              nonneg=True)
    fsdp_cpu_offload: bool = opt(False, "Under torchrun: keep the sharded parameters, gradients and optimizer state in "
                                 "CPU memory (slower; for models that do not fit the GPUs otherwise).")
    checkpoint_format: str = opt("full", "full: rank 0 gathers the model and optimizer state and writes one set of files; "
                                 "sharded: every rank writes its own shards (safetensors), so no host holds a whole "
                                 "copy. Either resumes on any world size (docs/distributed.md).",
                                 choices=("full", "sharded"))

    def validate(self) -> None:
        if self.resume and self.force:
            raise ConfigError("config fields 'resume' and 'force' contradict each other: --force discards the "
                              "checkpoints that --resume would continue from")
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"config field 'grad_accum' ({self.grad_accum}) must be <= 'batch_size' ({self.batch_size})")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("config field 'max_prompt_length' must be < 'max_length' "
                              f"({self.max_prompt_length} >= {self.max_length})")


@dataclass
class InitToyConfig(StageConfig):
    num_sft: int = opt(6000, "SFT examples to write.", positive=True)
    hidden_size: int = opt(128, "Model hidden size.", positive=True)
    num_layers: int = opt(4, "Transformer layers.", positive=True)
    num_heads: int = opt(4, "Attention heads.", positive=True)
    intermediate_size: int = opt(256, "MLP width.", positive=True)
    pad_vocab_to: int = opt(32, "Pad the embedding rows to a multiple of this, past the tokenizer (as real models do).",
                            positive=True)


@dataclass
class SftConfig(TrainingFields):
    model: Optional[str] = opt(None, "Model to fine-tune: a Hugging Face model directory or hub id.",
                               required=True, input="model")
    data: Optional[str] = opt(None, "Prompt/response data (JSONL with 'prompt' and 'response').",
                              required=True, input="data")


@dataclass
class MakePrefsConfig(DataFields):
    model: Optional[str] = opt(None, "Model to sample from.", required=True, input="model")
    data: Optional[str] = opt(None, "Prompts (JSONL with 'prompt').", required=True, input="data")
    reward_model: Optional[str] = opt(None, "Score responses with this AutoModelForSequenceClassification "
                                      "(default: the embedded task's gold reward).", input="model")
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


@dataclass
class DpoConfig(TrainingFields):
    model: Optional[str] = opt(None, "Reference model, also the policy's initialisation.", required=True, input="model")
    data: Optional[str] = opt(None, "Preference pairs (JSONL with 'prompt', 'chosen', 'rejected').",
                              required=True, input="data")
    reverse: bool = opt(False, "Train reverse DPO: chosen and rejected swapped, same beta and reference.")
    beta: float = opt(0.1, "DPO beta.", positive=True)
    ref_cache: Optional[str] = opt(None, "Directory for cached reference log-probs (default: OUT/../ref-cache).")


@dataclass
class TeacherFields(StageConfig):
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
class TeacherShardingFields(StageConfig):
    """How the inference-only teacher models of precompute and on-policy distill are held under torchrun."""

    shard_teachers: bool = opt(False, "Under torchrun, in precompute and on-policy distill: shard each teacher model "
                               "(dpo, rev, ref) over the ranks (FSDP2, in its load dtype) instead of holding it whole "
                               "on every rank: about 1/N of its memory per GPU, for an all-gather of each layer in "
                               "every forward (README: More than one GPU). The results are the same. Without torchrun "
                               "it changes nothing.")


def require_teacher_models(config, variant: str, context: str = "") -> None:
    """Refuse a config that lacks one of the models (dpo, rev, ref) the teacher variant is built from."""
    from aligndistil_cli.losses.functions import teacher_models

    for name in teacher_models(variant):
        if not getattr(config, name):
            raise ConfigError(f"config field {name!r} is required by {context}teacher variant {variant!r}")


@dataclass
class PrecomputeConfig(TeacherFields, DataFields, TeacherShardingFields):
    dpo: Optional[str] = opt(None, "DPO model directory.", required=True, input="model")
    rev: Optional[str] = opt(None, "Reverse-DPO model directory (needed by aligndistil and contrastive).",
                             input="model")
    ref: Optional[str] = opt(None, "Reference model (needed by theorem1 and adaptive).", input="model")
    data: Optional[str] = opt(None, "Distillation data: pairs JSONL (prompt + chosen is used).",
                              required=True, input="data")
    format: str = opt("auto", "Cache format: logits (full vocabulary), hidden (exact, compact), topk (truncated); "
                      "auto picks logits for small vocabularies and hidden otherwise.",
                      choices=("auto", "logits", "hidden", "topk"))
    top_k: int = opt(64, "Log-probs kept per position by --format topk.", positive=True)
    dtype: str = opt("float32", "dtype of the stored log-probs or hidden states (the combination itself is always "
                     "float32).", choices=("float32", "bfloat16"))
    batch_size: int = opt(32, "Sequences per forward pass.", positive=True)
    precision: str = opt("auto", "Teacher weights: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32. "
                         "The combination is float32 either way.", choices=("auto", "bf16", "fp32"))
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")
    shard_mb: float = opt(256.0, "Upper bound on one shard's size in MiB.", positive=True)
    max_length: int = opt(128, "Maximum tokens of prompt + response (must match distill).", positive=True)
    max_prompt_length: int = opt(96, "Maximum prompt tokens (must match distill).", positive=True)

    def validate(self) -> None:
        super().validate()
        require_teacher_models(self, self.variant)


@dataclass
class DistillConfig(TrainingFields, TeacherShardingFields):
    student: Optional[str] = opt(None, "Student initialisation (usually the SFT/reference model).",
                                 required=True, input="model")
    data: Optional[str] = opt(None, "Off-policy: the data the cache was computed on (checked against its fingerprint). "
                              "On-policy: prompts (a prompt-only or a preference set).", required=True, input="data")
    mode: str = opt("off-policy", "off-policy (train on the cached teacher over the data's chosen responses) or "
                    "on-policy (sample from the student, teach with live teachers).", choices=("off-policy", "on-policy"))
    cache: Optional[str] = opt(None, "Off-policy: the teacher cache directory written by precompute.", input="cache")
    alpha_scale: Optional[float] = opt(None, "r of alpha_t = r TVD_t + eps. Off-policy: overrides the cache's (needs a "
                                       "--format hidden cache). On-policy: default 20.", nonneg=True)
    alpha_eps: Optional[float] = opt(None, "eps of alpha_t. Off-policy: overrides the cache's (hidden cache). "
                                     "On-policy: default 1e-3.", positive=True)
    alpha_max: Optional[float] = opt(None, "Ours: cap on alpha_t. Off-policy: overrides the cache's (hidden cache). "
                                     "On-policy: default none (the paper).", positive=True)
    extrapolate_eos: Optional[bool] = opt(None, "Ours: --no-extrapolate-eos keeps the DPO model's EOS probability. "
                                          "Off-policy: overrides the cache's (hidden cache). On-policy: default "
                                          "--extrapolate-eos (the paper).")
    dpo: Optional[str] = opt(None, "On-policy: the DPO model (run live). Off-policy, optional: the cache must "
                             "have been built from this model.", input="model")
    rev: Optional[str] = opt(None, "On-policy: the reverse-DPO model (run live). Off-policy, optional: checked "
                             "against the cache like --dpo.", input="model")
    ref: Optional[str] = opt(None, "On-policy: the reference model (theorem1 and adaptive only). Off-policy, "
                             "optional: checked against the cache like --dpo.", input="model")
    variant: str = opt("aligndistil", "On-policy: teacher variant.", choices=VARIANTS)
    beta: float = opt(0.1, "On-policy: the DPO beta of the teachers.", positive=True)
    kl_coef: float = opt(0.1, "On-policy: beta_kl of contrastive/theorem1.", positive=True)
    teacher_temperature: float = opt(1.0, "On-policy: tau, the teacher is softmax(z*/tau).", positive=True)
    temperature: float = opt(1.0, "On-policy: sampling temperature.", positive=True)
    top_p: float = opt(1.0, "On-policy: nucleus sampling mass.", positive=True, at_most=1.0)
    max_new_tokens: int = opt(64, "On-policy: longest sampled response.", positive=True)
    kv_cache: str = kv_cache_opt("On-policy: ")
    samples_per_prompt: int = opt(1, "On-policy: responses sampled per prompt.", positive=True)
    updates_per_rollout: int = opt(1, "On-policy: optimizer steps on each rollout batch before sampling again.",
                                   positive=True)
    mix_off_policy: float = opt(0.0, "On-policy: fraction of each batch taken from the data's chosen responses "
                                "(needs preference data).", nonneg=True, below=1.0)

    def validate(self) -> None:
        super().validate()
        if self.mode == "off-policy" and not self.cache:
            raise ConfigError("config field 'cache' is required in off-policy mode (flag --cache; or use --mode on-policy)")
        if self.mode == "on-policy":
            require_teacher_models(self, self.variant, "on-policy distillation with ")


@dataclass
class EvaluateConfig(DataFields, TrackingFields):
    ref: Optional[str] = opt(None, "Reference (SFT) model: KL and win rate are measured against it.",
                             required=True, input="model")
    ref_name: str = opt("reference", "Name of the reference model in the report.")
    models: dict = opt(None, "Models to evaluate, NAME=PATH (repeat the flag).",
                       factory=dict, flag="model", input="model")
    prompts: Optional[str] = opt(None, "Held-out prompts (JSONL with 'prompt').", required=True, input="data")
    pairs: Optional[str] = opt(None, "Held-out preference pairs for implicit-reward accuracy.", input="data")
    dpo: Optional[str] = opt(None, "DPO model, for implicit-reward accuracy on --pairs.", input="model")
    rev: Optional[str] = opt(None, "Reverse-DPO model, for the contrastive reward's accuracy on --pairs.",
                             input="model")
    beta: float = opt(0.1, "beta of the implicit rewards.", positive=True)
    reward_model: Optional[str] = opt(None, "Score responses with this AutoModelForSequenceClassification "
                                      "(default: the embedded task's gold reward).", input="model")
    num_prompts: int = opt(600, "Held-out prompts to sample (first N).", positive=True)
    temperature: float = opt(1.0, "Sampling temperature.", positive=True)
    top_p: float = opt(1.0, "Nucleus sampling mass.", positive=True, at_most=1.0)
    max_new_tokens: int = opt(48, "Longest response in tokens.", positive=True)
    batch_size: int = opt(128, "Prompts per generation batch.", positive=True)
    kv_cache: str = kv_cache_opt()
    max_length: int = opt(512, "Maximum tokens of a held-out pair (prompt + response).", positive=True)
    max_prompt_length: int = opt(384, "Maximum prompt tokens of a held-out pair or prompt.", positive=True)
    teacher: Optional[str] = opt(None, "Also sample the composed teacher softmax(z*) (the upper bound of distillation) "
                                 "and report it as a row: a precompute cache directory (its recorded teacher settings "
                                 "and models are used), or 'models' to compose --dpo and --rev (and --ref where the "
                                 "variant needs it) with --variant and the settings below.", input="cache")
    teacher_name: str = opt("teacher", "Name of the teacher's row in the report.")
    variant: str = opt("aligndistil", "--teacher models: teacher variant.", choices=VARIANTS)
    kl_coef: float = opt(0.1, "--teacher models: beta_kl of contrastive/theorem1 (w = beta / kl_coef).", positive=True)
    alpha_scale: float = opt(20.0, "--teacher models: r of alpha_t = r TVD_t + eps.", nonneg=True)
    alpha_eps: float = opt(1e-3, "--teacher models: eps of alpha_t.", positive=True)
    alpha_max: Optional[float] = opt(None, "--teacher models: cap on alpha_t (ours; default none).", positive=True)
    extrapolate_eos: bool = opt(True, "--teacher models: --no-extrapolate-eos keeps the DPO model's EOS probability (ours).")
    teacher_temperature: float = opt(1.0, "--teacher models: tau, the teacher is softmax(z*/tau).", positive=True)
    diagnostic_rows: int = opt(256, "With --teacher and --pairs: chosen responses (first N) for the p(EOS) and "
                               "mirror diagnostics.", positive=True)
    export: Optional[str] = opt(None, "Also write each model's answers to --export-questions in this benchmark's "
                                "own format: alpaca-eval, mt-bench or arena-hard.",
                                choices=("alpaca-eval", "mt-bench", "arena-hard"))
    export_questions: Optional[str] = opt(None, "The benchmark's question file (AlpacaEval eval set, MT-Bench or "
                                          "arena-hard question.jsonl).", input="data")

    def validate(self) -> None:
        if self.teacher == "models" and not (self.dpo and self.rev):
            raise ConfigError("--teacher models needs --dpo and --rev (the reference is --ref)")
        if self.export and not self.export_questions:
            raise ConfigError("config field 'export_questions' is required by --export")


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """YAML 1.1 reads 1e-3 as a string; coerce by the declared type, naming the field on failure."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if tp is dict:
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config field {name!r} must be {getattr(tp, '__name__', tp)}; got {shown(value)}") from None
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _coerced(cls: type, values: dict, source: str) -> dict:
    """values with known keys, each coerced to its field's type; errors start with source."""
    check_keys(cls, values, source)
    types_ = field_types(cls)
    try:
        return {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def build_config(cls: type, values: dict, source: str = "config") -> Any:
    """Instantiate a stage config from a dict (a pipeline stage's values), with key checks and type
    coercion; every error names source (the file and the pipeline stage)."""
    values = _coerced(cls, values, source)
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(cls: type, config_file: str | Path | None, overrides: dict) -> Any:
    """defaults < YAML file < flags (flags that were not given are None and do not override).

    An error in a value of the file names the file; flags arrive typed from the command line.
    """
    values: dict = _coerced(cls, read_yaml(config_file), str(config_file)) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    check_keys(cls, values, "flags")
    return cls(**values)


class Input(typing.NamedTuple):
    name: str  # the field, or FIELD.NAME for an entry of a NAME=PATH field
    given_as: str  # as on the command line: "--data runs/toy/sft.jsonl"
    path: str
    kind: str  # opt's input: model, cache or data


def config_inputs(config) -> list[Input]:
    """Every input a config names: one per entry of a NAME=PATH field."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("input") or not value:
            continue
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        found += [Input(f"{f.name}.{k}" if k else f.name, f"{flag} {k}={v}" if k else f"{flag} {v}", str(v),
                        f.metadata["input"]) for k, v in entries]
    return found


