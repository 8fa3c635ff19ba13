"""The option groups that several stages share; each is one panel of their --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aligndistil_cli.config.options import Group, opt
from aligndistil_cli.config.trackers import parse_report_to
from aligndistil_cli.core.errors import ConfigError
from aligndistil_cli.data.sources import FORMATS as SOURCE_FORMATS

INPUTS = "Inputs and output"


@dataclass
class Output(Group):
    panel = INPUTS

    out: Optional[str] = opt(None, "Output directory of the stage.", required=True, aliases=("output_dir",))
    force: bool = opt(False, "Start OUT over: replace whatever it holds (even another stage's output or files "
                      "aligndistil did not write) and discard its checkpoints.")


@dataclass
class Run(Group):
    panel = "Run"

    seed: int = opt(0, "Random seed; the same seed and config give the same result on CPU.", nonneg=True)
    device: str = opt("auto", "Device: auto (cuda when available), cpu, or cuda[:N].")


@dataclass
class ModelSource(Group):
    """How models are loaded from a directory or the hub."""

    panel = "Reading models and data"

    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the models.")
    trust_remote_code: bool = opt(False, "Allow model code from the model's repository to run (off: never).")


@dataclass
class DataReading(Group):
    """How --data is read (data/sources.py): local files or a hub dataset, in any supported format."""

    panel = "Reading models and data"

    split: str = opt("train", "Split of a hub dataset (e.g. train_prefs for UltraFeedback).")
    subset: Optional[str] = opt(None, "Subset (configuration) of a hub dataset.")
    data_format: str = opt("auto", "Row format; auto detects it.", choices=("auto", *SOURCE_FORMATS))
    prompt_key: Optional[str] = opt(None, "Column holding the prompt (default: prompt).")
    chosen_key: Optional[str] = opt(None, "Column holding the chosen response (default: chosen).")
    rejected_key: Optional[str] = opt(None, "Column holding the rejected response (default: rejected).")
    messages_key: Optional[str] = opt(None, "Column holding a conversation (default: messages).")
    skip_bad_rows: bool = opt(False, "Skip malformed rows (counted per reason in the manifest) instead of stopping.")
    chat_template: str = opt("auto", "auto: conversational rows (message lists) get the tokenizer's chat template, "
                             "string rows stay plain text (as TRL); always: string rows too, as a user turn and an "
                             "assistant turn; never: no template, conversational rows read as plain text; or a Jinja "
                             "template FILE used instead of the tokenizer's, for conversational rows. In YAML, true "
                             "means auto and false never.")
    refuse_special_tokens: bool = opt(False, "Treat a row whose message text contains a special token (e.g. "
                                      "<|im_end|>) as bad, instead of counting it and warning.")


@dataclass
class Tracking(Group):
    """--report-to: mirror metrics.jsonl (and evaluate's table) to experiment trackers (train/tracking.py)."""

    panel = "Logging and hub"

    report_to: str = opt("none", "Experiment trackers, a comma list of none, tensorboard, wandb, trackio, mlflow "
                         "(each an optional extra, e.g. pip install 'aligndistil[wandb]').")
    run_name: Optional[str] = opt(None, "Run name in the trackers (default: the output directory's name).")
    project: Optional[str] = opt(None, "Tracker project (W&B, trackio) or experiment (MLflow); default: "
                                 "$WANDB_PROJECT, else aligndistil.")

    def validate(self) -> None:
        parse_report_to(self.report_to)


@dataclass
class Hub(Group):
    """--push-to-hub: upload the finished output directory (rundir/hub.py)."""

    panel = "Logging and hub"

    push_to_hub: Optional[str] = opt(None, "After the output is complete, upload it to this Hugging Face Hub "
                                     "model repo (USER/NAME).", aliases=("hub_model_id",))
    hub_private: bool = opt(False, "Create the --push-to-hub repo as private.", aliases=("hub_private_repo",))


@dataclass
class MetricsLog(Group):
    panel = "Logging and hub"

    log_every: int = opt(1, "Write metrics.jsonl every N steps.", positive=True, aliases=("logging_steps",))


@dataclass
class Optimization(Group):
    """The training schedule and AdamW."""

    panel = "Training"

    epochs: int = opt(1, "Passes over the data.", positive=True, aliases=("num_train_epochs",))
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (overrides epochs).", positive=True)
    batch_size: int = opt(16, "Sequences (or pairs) per optimizer step, over all processes: the global batch.",
                          positive=True)
    lr: float = opt(1e-4, "Peak learning rate (AdamW).", positive=True, at_most=1.0, aliases=("learning_rate",))
    warmup_ratio: float = opt(0.1, "Fraction of steps for linear warm-up.", nonneg=True, below=1.0)
    min_lr_ratio: float = opt(0.1, "Cosine schedule floor as a fraction of lr.", nonneg=True, at_most=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", nonneg=True)
    adam_beta1: float = opt(0.9, "AdamW beta1.", nonneg=True, below=1.0)
    adam_beta2: float = opt(0.95, "AdamW beta2.", nonneg=True, below=1.0)
    adam_eps: float = opt(1e-8, "AdamW epsilon: gradients far below it take steps proportional to them, not of size "
                          "lr.", positive=True, aliases=("adam_epsilon",))
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 disables).", nonneg=True,
                           aliases=("max_grad_norm",))
    grad_accum: int = opt(1, "Split each step's batch into this many micro-batches (same global batch, less memory).",
                          positive=True, aliases=("gradient_accumulation_steps",))
    max_length: int = opt(128, "Maximum tokens of prompt + response.", positive=True)
    max_prompt_length: int = opt(96, "Maximum prompt tokens (prompts are cut from the left).", positive=True)
    skip_nonfinite: int = opt(0, "Tolerate up to N steps with a non-finite loss or gradient (they are skipped and "
                              "counted).", nonneg=True)

    def validate(self) -> None:
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"config field 'grad_accum' ({self.grad_accum}) must be <= 'batch_size' ({self.batch_size})")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("config field 'max_prompt_length' must be < 'max_length' "
                              f"({self.max_prompt_length} >= {self.max_length})")


@dataclass
class Lora(Group):
    panel = "LoRA"

    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning). Needs the optional peft extra: pip install "
                      "'aligndistil[lora]'.", nonneg=True)
    lora_alpha: float = opt(16.0, "LoRA alpha (the adapter is scaled by alpha / r).", positive=True)
    lora_target: str = opt("all-linear", "Modules that get adapters: all-linear, or comma-separated names "
                           "(e.g. q_proj,v_proj).")


@dataclass
class Speed(Group):
    """How the trained model runs: kernels, precision, packing, recomputation."""

    panel = "Speed and memory"

    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32. The teacher and the "
                         "losses are always combined in float32.", choices=("auto", "bf16", "fp32"))
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")
    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in the backward pass to save memory.")
    padding_free: bool = opt(True, "Pack each micro-batch's sequences into one row (positions restart per sequence, "
                             "attention stays within each) instead of padding them; falls back to padded batches, "
                             "saying why, where the model's attention cannot.")
    compile: bool = opt(False, "torch.compile each decoder layer of the model being trained (the chunked loss stays "
                        "eager); the first steps pay for compilation (docs/performance.md: where it helps).",
                        aliases=("torch_compile",))
    chunk_size: int = opt(128, "Positions per output-head chunk in the loss (memory is O(chunk x vocab)).",
                          positive=True)
    group_by_length: bool = opt(True, "Batch sequences of similar length together so padding costs little.")


@dataclass
class Checkpoints(Group):
    panel = "Checkpoints and resume"

    save_every: int = opt(100, "Write a resumable checkpoint every N steps (0: never); on-policy rounds N up to a "
                          "multiple of --updates-per-rollout.", nonneg=True, aliases=("save_steps",))
    keep_checkpoints: int = opt(2, "Keep at most this many checkpoints.", positive=True, aliases=("save_total_limit",))
    resume: bool = opt(False, "Continue from the latest complete checkpoint in OUT/checkpoints.")
    checkpoint_format: str = opt("full", "full: rank 0 gathers the model and optimizer state and writes one set of "
                                 "files; sharded: every rank writes its own shards (safetensors), so no host holds a "
                                 "whole copy. Either resumes on any world size (docs/distributed.md).",
                                 choices=("full", "sharded"))

    def validate(self) -> None:
        if self.resume and self.force:
            raise ConfigError("config fields 'resume' and 'force' contradict each other: --force discards the "
                              "checkpoints that --resume would continue from")


@dataclass
class TrainingEval(Group):
    """--eval-every: sample held-out prompts while training."""

    panel = "Evaluation while training"

    eval_every: int = opt(0, "Every N steps, sample --eval-prompts and log eval_reward and eval_kl (0: never).",
                          nonneg=True)
    eval_prompts: Optional[str] = opt(None, "Prompts for --eval-every (a held-out prompt set).", input="data")
    eval_num_prompts: int = opt(64, "How many of --eval-prompts to sample.", positive=True)
    eval_max_new_tokens: int = opt(48, "Longest response sampled by --eval-every.", positive=True)
    reward_model: Optional[str] = opt(None, "Reward model for --eval-every (default: the embedded task's gold "
                                      "reward).", input="model")


@dataclass
class Distributed(Group):
    panel = "More than one GPU (torchrun)"

    fsdp_cpu_offload: bool = opt(False, "Under torchrun: keep the sharded parameters, gradients and optimizer state "
                                 "in CPU memory (slower; for models that do not fit the GPUs otherwise).")


@dataclass
class TeacherSharding(Group):
    """How the inference-only teacher models of precompute and on-policy distill are held under torchrun."""

    panel = "More than one GPU (torchrun)"

    shard_teachers: bool = opt(False, "Under torchrun, in precompute and on-policy distill: shard each teacher model "
                               "(dpo, rev, ref) over the ranks (FSDP2, in its load dtype) instead of holding it whole "
                               "on every rank: about 1/N of its memory per GPU, for an all-gather of each layer in "
                               "every forward (docs/distributed.md). The results are the same. Without torchrun "
                               "it changes nothing.")


# What a training stage is made of after its own inputs and method options: in --help order.
TRAINING = (Output, Optimization, Lora, Speed, Checkpoints, TrainingEval, Distributed, ModelSource, DataReading,
            MetricsLog, Tracking, Hub, Run)
