"""TRL's names for our options: a TRL (or transformers TrainingArguments) YAML file reads as one of ours.

Where a name means the same thing it is an alias of the field (opt(aliases=...): learning_rate is lr).
Where the meaning differs it is converted: TRL's per_device_train_batch_size is per process and per
micro-batch, ours (batch_size) is the global batch of one optimizer step. TRL's push_to_hub is a switch
whose repo is hub_model_id; ours names the repo. Keys that only TRL knows are listed in one line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from aligndistil_cli.core.errors import ConfigError

# Options of trl.DPOConfig and transformers.TrainingArguments that aligndistil has no counterpart for.
TRL_ONLY = frozenset("""
overwrite_output_dir do_train do_eval do_predict eval_strategy prediction_loss_only per_device_eval_batch_size
per_gpu_train_batch_size per_gpu_eval_batch_size eval_accumulation_steps eval_delay torch_empty_cache_steps
lr_scheduler_type lr_scheduler_kwargs warmup_steps log_level log_level_replica log_on_each_node logging_dir
logging_strategy logging_first_step logging_nan_inf_filter save_strategy save_safetensors save_on_each_node
save_only_model restore_callback_states_from_checkpoint use_cpu data_seed jit_mode_eval bf16 fp16 fp16_opt_level
half_precision_backend bf16_full_eval fp16_full_eval tf32 local_rank ddp_backend tpu_num_cores dataloader_drop_last
eval_steps dataloader_num_workers dataloader_prefetch_factor past_index disable_tqdm remove_unused_columns
label_names load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip fsdp fsdp_config
deepspeed accelerator_config label_smoothing_factor optim optim_args adafactor length_column_name
ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers dataloader_pin_memory
dataloader_persistent_workers skip_memory_metrics resume_from_checkpoint hub_strategy hub_token
hub_always_push hub_revision gradient_checkpointing_kwargs include_inputs_for_metrics eval_do_concat_batches
auto_find_batch_size full_determinism torchdynamo ray_scope ddp_timeout torch_compile_backend torch_compile_mode
neftune_noise_alpha optim_target_modules batch_eval_metrics eval_on_start use_liger_kernel eval_use_gather_object
average_tokens_across_devices model_init_kwargs ref_model_init_kwargs model_adapter_name ref_adapter_name
force_use_ref_model disable_dropout use_logits_to_keep dataset_num_proc padding_value label_pad_token_id
max_completion_length truncation_mode precompute_ref_log_probs precompute_ref_batch_size tools loss_type
use_liger_loss base_model_attribute_name f_divergence_type f_alpha_divergence_coef reference_free
label_smoothing use_weighting rpo_alpha ld_alpha discopop_tau loss_weights sync_ref_model ref_model_mixup_alpha
ref_model_sync_steps generate_during_eval dataset_text_field packing completion_only_loss assistant_only_loss
""".split())

PER_DEVICE = "per_device_train_batch_size"


def alias_map(cls: type) -> dict[str, str]:
    """{TRL name: our field} for a stage config (its fields' opt aliases)."""
    return {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}


def from_trl(cls: type, values: dict, source: str, ignore_unknown: bool = False) -> tuple[dict, int | None]:
    """(values under our names, TRL's per-device batch size or None: it becomes batch_size once the flags
    are merged, see global_batch). TRL-only keys are refused in one line, or dropped with ignore_unknown;
    any other unknown key is left for check_keys to refuse with a did-you-mean."""
    values = dict(values)
    if isinstance(values.get("push_to_hub"), bool):
        _hub_switch(values, source)
    names = alias_map(cls)
    for alias, name in names.items():
        if alias in values:
            if name in values:
                raise ConfigError(f"{source}: {alias!r} and {name!r} name the same option; give one")
            values[name] = values.pop(alias)
    per_device = values.pop(PER_DEVICE, None)
    if per_device is not None and "batch_size" in values:
        raise ConfigError(f"{source}: give batch_size (the global batch) or {PER_DEVICE}, not both")
    trl_only = sorted(k for k in values if k in TRL_ONLY)
    if trl_only and not ignore_unknown:
        raise ConfigError(f"{source}: keys that only TRL knows: {', '.join(trl_only)}; remove them, or pass "
                          "--ignore-unknown-keys to run without them")
    return {k: v for k, v in values.items() if k not in TRL_ONLY}, per_device


def _hub_switch(values: dict, source: str) -> None:
    """TRL's push_to_hub: true + hub_model_id: REPO is our push_to_hub: REPO; false pushes nothing."""
    if values.pop("push_to_hub"):
        if not values.get("hub_model_id"):
            raise ConfigError(f"{source}: push_to_hub: true needs hub_model_id (the repo, USER/NAME)")
    else:
        values.pop("hub_model_id", None)


def global_batch(per_device: Any, values: dict, source: str) -> int:
    """Our batch_size for TRL's per_device_train_batch_size: x grad_accum x the processes torchrun started."""
    try:
        per_device = int(per_device)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {PER_DEVICE} must be int; got {per_device!r}") from None
    return per_device * int(values.get("grad_accum") or 1) * int(os.environ.get("WORLD_SIZE", "1"))
