"""Load and save models and tokenizers; run a model up to its output head.

Only positions that predict response tokens ever go through the output head:
models are run to their final hidden states, the response positions are
gathered, and the head is applied in chunks (losses.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import Batch
from aligndistil_cli.losses.fused import fused_token_logps, head_logits
from aligndistil_cli.model.tokenizer_file import as_saved
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.parallel.fsdp import unwrap
from aligndistil_cli.rundir.artifacts import check_model_input, writing
from aligndistil_cli.rundir.hub import hub_offline, hub_reachable, looks_like_path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Post-head transforms break "logits = h W^T + b"; refuse them by name instead of
# training on a silently different distribution.
_POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_device(name: str = "auto") -> torch.device:
    if distributed.active():
        return distributed.device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def hub_options(config) -> dict:
    """revision / trust_remote_code of a ModelFields config, for from_pretrained."""
    return {"revision": getattr(config, "revision", None),
            "trust_remote_code": bool(getattr(config, "trust_remote_code", False))}


def model_source(path: str | Path, revision: str | None = None) -> dict:
    """Extra from_pretrained arguments for `path` (a directory or hub id), or a one-line UserError when it is
    neither an existing directory nor a hub id that can be reached (online, or in the local cache)."""
    name = str(path)
    if Path(name).expanduser().exists():
        return {}
    missing = UserError(f"no such directory {name} (and not reachable as a Hub id)")
    if looks_like_path(name):
        raise missing
    if not hub_offline() and hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return {"local_files_only": True}
    raise missing


def refuse_pickle_weights(path: str | Path) -> None:
    """A local model directory whose weights are only in pickle form (.bin, .pt) is refused in one line."""
    local = Path(str(path)).expanduser()
    if not local.is_dir() or any(local.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in local.glob(pattern))
    if pickled:
        raise UserError(f"{path} holds its weights only in pickle form ({', '.join(pickled)}), which aligndistil never "
                        "loads because unpickling can run code; convert them once, in an environment you trust: "
                        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")


def load_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    source = model_source(path, revision)
    check_model_input(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code, **source)
        tok = as_saved(tok, str(path), revision, source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer of {path} has no EOS token; responses must end in one")
    return tok


def bf16_enabled(precision: str, device: torch.device) -> bool:
    """auto means bf16 on CUDA (where it is fast and safe) and fp32 on CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for training on float32 master weights, or a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(precision, device))


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, gradient_checkpointing: bool = False,
               revision: str | None = None, trust_remote_code: bool = False):
    """A causal LM from a local directory or, when no such directory exists, a hub id."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    check_model_input(path)  # unfinished, or changed since its manifest: refused before loading
    refuse_pickle_weights(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs.update(revision=revision, trust_remote_code=trust_remote_code, **model_source(path, revision))
    try:
        # Never unpickle: .bin weights can run code when loaded.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {path}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e):  # transformers' words for weights whose shapes the config contradicts
            raise
        raise UserError(f"cannot load a model from {path}: {shape_mismatch(path, trust_remote_code)}") from None
    for name in _POST_HEAD_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 0, 1, 1.0):
            raise UserError(f"model {path} applies {name}={getattr(model.config, name)} after its output head; "
                            "aligndistil does not support post-head logit transforms")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


def shape_mismatch(path: str | Path, trust_remote_code: bool = False) -> str:
    """Which weight of a local model directory has a shape its config.json does not give it (transformers only
    logs it)."""
    from safetensors import safe_open

    general = "its config.json does not match the shapes of its weights"
    local = Path(str(path)).expanduser()
    if not local.is_dir():
        return general
    expected = _meta_model(local, torch.float32, None, trust_remote_code=trust_remote_code).state_dict()
    for file in sorted(local.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                if name in expected and list(expected[name].shape) != shape:
                    return (f"{file} holds {name} of shape {shape}, but {local / 'config.json'} gives it "
                            f"{list(expected[name].shape)}")
    return general


def load_teacher(path: str | Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None,
                 shard: bool, **hub):
    """An inference-only model (requires no gradients); with shard, sharded over the ranks (fsdp.shard_frozen).

    Sharded under torchrun, only rank 0 reads the weights: the other ranks build the model on the meta
    device, shard it, and receive their shards from rank 0, so that no rank but 0 holds a whole copy.
    """
    if not (shard and distributed.active()):
        model = load_model(path, device, dtype, attn_implementation, **hub).eval().requires_grad_(False)
        return fsdp.shard_frozen(model) if shard else model
    model = _rank0_model(path, device, dtype, attn_implementation, **hub).eval().requires_grad_(False)
    state = model.state_dict() if distributed.is_main() else {}
    fsdp.shard_frozen(model)
    fsdp.fill_from_rank0(model, state, device)
    return model


def _rank0_model(path: str | Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None,
                 gradient_checkpointing: bool = False, **hub):
    """The model with its weights on rank 0, on the meta device (shapes only) on the other ranks."""
    if distributed.is_main():
        return load_model(path, device, dtype, attn_implementation, gradient_checkpointing, **hub)
    model = _meta_model(path, dtype, attn_implementation, **hub)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _meta_model(path: str | Path, dtype: torch.dtype, attn_implementation: str | None,
                revision: str | None = None, trust_remote_code: bool = False):
    """The model of path's config on the meta device: its shapes, no weights, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code,
                                        **model_source(path, revision))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


def load_student(path: str | Path, device: torch.device, cfg):
    """A model to train, with a training config's attention kernel, checkpointing and LoRA; fp32 master weights.

    Under torchrun it is sharded here (fsdp.shard) and only rank 0 reads the weights: the other ranks
    build it on the meta device and receive their shards from rank 0, so that no rank but 0 holds a
    whole copy.
    """
    sharded = distributed.active()
    load = _rank0_model if sharded else load_model
    model = load(path, device, torch.float32, cfg.attn_implementation, cfg.gradient_checkpointing, **hub_options(cfg))
    model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target) if cfg.lora_r else model
    if getattr(cfg, "compile", False):
        compile_layers(model)
    if sharded:
        state = model.state_dict() if distributed.is_main() else {}
        fsdp.shard(model, bf16_enabled(cfg.precision, device), cfg.fsdp_cpu_offload)
        # Under --fsdp-cpu-offload the shards rest on the CPU.
        fsdp.fill_from_rank0(model, state, torch.device("cpu") if cfg.fsdp_cpu_offload else device)
    return model


def decoder_layers(model) -> list:
    """The repeated blocks of the decoder body (the classes transformers never splits across devices)."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    return [m for m in unwrap(model).modules() if type(m).__name__ in names]


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (parameter names unchanged); returns how many.

    Layers, not the whole model: mask creation and the chunked loss would break the graph, and
    one layer's graph serves every layer. dynamic=True: batch lengths vary from step to step.
    """
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"--compile: no decoder layers found in {type(unwrap(model)).__name__}")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def add_lora(model, r: int, alpha: float, target: str):
    """Wrap model with rank-r LoRA adapters (peft) on target ("all-linear" or comma-separated module names);
    only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'aligndistil[lora]'") from None
    modules = target if target == "all-linear" else [t.strip() for t in target.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_model(model, tokenizer, out: Path) -> None:
    """save_pretrained in safetensors; LoRA adapters are merged into the base weights first.

    A sharded model is gathered to rank 0, which writes (every rank calls).
    """
    if fsdp.is_sharded(model):
        state = fsdp.full_model_state(model)
        if distributed.is_main():
            with writing(Path(out) / "model.safetensors"):
                model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        distributed.barrier()
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with writing(Path(out) / "model.safetensors"):
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def vocab_size(tokenizer) -> int:
    """The tokenizer's real size; embedding rows past it are padding."""
    return len(tokenizer)


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **packed) -> torch.Tensor:
    """[B, T, H] inputs to the output head (the base model's last hidden state).

    packed: position_ids and attention_plan of a packed row (packing.PackedBatch.model_inputs).
    """
    model = unwrap(model)
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed).last_hidden_state


def model_inputs(batch) -> dict:
    """final_hidden's keyword arguments for a padded Batch or a packing.PackedBatch."""
    if hasattr(batch, "model_inputs"):
        return batch.model_inputs()
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def response_hidden(model, batch: Batch) -> torch.Tensor:
    """[N, H] hidden states at the positions that predict response tokens, row-major."""
    return final_hidden(model, **model_inputs(batch))[batch.loss_mask]


def num_sequences(batch) -> int:
    """Sequences in a padded Batch (its rows) or a PackedBatch."""
    return batch.num_seqs if hasattr(batch, "num_seqs") else batch.loss_mask.shape[0]


def sequence_ids(batch: Batch) -> torch.Tensor:
    """[N] the sequence (batch row, or packed sequence) of each selected position."""
    if hasattr(batch, "seq_index"):
        return batch.seq_index[batch.loss_mask]
    rows = torch.arange(batch.loss_mask.shape[0], device=batch.loss_mask.device)
    return rows.unsqueeze(1).expand_as(batch.loss_mask)[batch.loss_mask]


def head_logps(model, batch: Batch, vocab: int, chunk_size: int = 1024, groups: torch.Tensor | None = None,
               coefs: torch.Tensor | None = None, num_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [G], logps [N] detached) of response-token log-probs: losses.fused_token_logps on the model.

    groups/coefs [N] over the selected positions (default: one group, coefficient 1).
    """
    # The body first: under FSDP its forward gathers the (tied) head, which is sharded before it; a frozen
    # sharded model's own head group is gathered for the head pass alone.
    hidden, targets = response_hidden(model, batch), batch.targets[batch.loss_mask]
    with fsdp.gathered(unwrap(model).get_output_embeddings()):
        weight, bias = output_head(model)
        return fused_token_logps(hidden, targets, weight, bias, groups, coefs, num_groups, vocab, chunk_size)


def sequence_logps(model, batch: Batch, vocab: int, chunk_size: int = 1024) -> torch.Tensor:
    """[B] log pi(response | prompt), summed over response tokens (EOS included)."""
    return head_logps(model, batch, vocab, chunk_size, sequence_ids(batch), None, num_sequences(batch))[0]


def response_logits(model, batch: Batch, vocab: int) -> torch.Tensor:
    """[N, V] float32 logits at response positions (padded rows -inf). Not for the hot path."""
    weight, bias = output_head(model)
    return head_logits(response_hidden(model, batch), weight, bias, vocab)
