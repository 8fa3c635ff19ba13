"""FSDP2 for the model being trained: sharding, forward redirection, full and sharded state dicts.

Every function is a no-op (or the plain single-process equivalent) when no
process group is active, so the one-process path is unchanged.

Sharding: each decoder layer is its own group, a tied input embedding and
output head share one group (torch refuses a tied parameter split across
groups), and the root takes the rest. The losses apply the output head to
the body's hidden states by hand; with sharded (DTensor) parameters that only
works inside the root module's forward, where FSDP has gathered them, so the
loss is run there (`redirect`, as TRL's forward redirection does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from aligndistil_cli.parallel import distributed


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def model_class(model) -> type:
    """The model's own class: fully_shard swaps in a subclass, FSDP<Name>(FSDPModule, Name), defined in torch."""
    return type(model).__bases__[-1] if is_sharded(model) else type(model)


def unwrap(model):
    """The transformers model under a peft wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks: modules of the classes transformers declares unsplittable."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"cannot find the decoder layers of {type(unwrap(model)).__name__} to shard")
    return layers


def shard(model, bf16: bool, cpu_offload: bool = False):
    """fully_shard the model in place (layers, tied embedding + head, root) when ranks are active; return it.

    bf16: on CUDA, parameters are gathered in bf16 and gradients reduced in
    float32 (the float32 master weights stay sharded). cpu_offload: the sharded
    parameters, gradients and optimizer state rest on the CPU, in pinned memory
    where an accelerator exists (pinning needs one).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options = {}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    return _shard(model, options)


def shard_frozen(model):
    """fully_shard an inference-only model (a teacher) in place when ranks are active, in its load dtype; return it.

    Every group frees its gathered parameters after each forward, the root's
    too (FSDP keeps a root's gathered for the backward that follows in
    training, which an inference model never runs). An untied embedding and
    head are groups of their own, so the body's forward (response_hidden)
    gathers the embedding alone while it runs and never the head: a forward
    holds about one layer whole at a time (a tied embedding + head, which
    share a group, stays gathered through the forward). Every forward is then
    a collective: the ranks must run the same number of them, in the same order.
    A head applied by hand is gathered around that use (gathered).
    """
    return _shard(model, {"reshard_after_forward": True}, own_groups=True)


def _shard(model, options: dict, own_groups: bool = False):
    """own_groups: an untied embedding and head each in a group of its own, not in the root's.

    Not for a model being trained: its loss applies the head by hand inside the
    root's forward, where only the root's parameters (and a tied head's group,
    through the embedding's forward) are gathered.
    """
    if not distributed.active() or is_sharded(model):
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer, **options)
    inner = unwrap(model)
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        fully_shard([embed, head], **options)
    elif own_groups:
        for module in filter(None, (embed, head)):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def redirect(model, fn: Callable, *args):
    """fn(*args) run as the body of the root module's forward, so that FSDP's hooks gather its parameters
    around it and register the backward; plainly fn(*args) when the model is not sharded."""
    if not is_sharded(model):
        return fn(*args)
    original = model.forward

    def body(*a):
        model.forward = original
        return fn(*a)

    model.forward = body
    try:
        return model(*args)
    finally:
        model.forward = original


@contextmanager
def gathered(module):
    """Inside, module's parameters are whole where module is a group of its own in a frozen sharded model
    (shard_frozen's output head, which is applied by hand, never through its forward); elsewhere they are as
    they were (a trained model's head is gathered by the root's forward, or by the tied embedding's)."""
    if not is_sharded(module) or any(p.requires_grad for p in module.parameters()):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def reshard(model) -> None:
    """Free what a forward without a backward left gathered (a trained model's root keeps its parameters
    gathered for the backward); its registered parameters are then the sharded ones again, which the
    optimizer must be given. No-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole of a sharded (DTensor) parameter on every rank, else the tensor itself.

    A collective for a DTensor: every rank must call it, for the same tensors in the same order.
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_bytes(model) -> int:
    """Bytes of the parameters this rank holds: its shards of a sharded model, every parameter otherwise."""
    return sum(local.numel() * local.element_size()
               for local in (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()))


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU on rank 0 (empty on the other ranks; every rank must call).

    A tied head is given the embedding's tensor again, so savers see the tie
    and store it once, as they do for an unsharded model.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if state:
        for name, alias in tied_names(model).items():
            state[alias] = state[name]
    return state


def tied_names(model) -> dict[str, str]:
    """{first name: other name} of parameters registered under two names (a tied embedding and head)."""
    seen: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[seen[id(p)]] = name
        else:
            seen[id(p)] = name
    return tied


def load_full_model_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict given on rank 0 into the sharded model (the other ranks pass {})."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=True))


def fill_from_rank0(model, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a sharded model its weights from rank 0's full state dict (the other ranks pass {}).

    The other ranks' models were built on the meta device: they get memory for their shards here, then
    the shards and the buffers that no state dict holds (rotary frequencies) from rank 0.
    """
    if not distributed.is_main():
        model.to_empty(device=device)
    load_full_model_state(model, state)
    distributed.broadcast_tensors([b for _, b in model.named_buffers()])


def full_optimizer_state(model, optimizer) -> dict:
    """optimizer.state_dict() as one process would have it (state keyed by parameter index), on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load an index-keyed optimizer state dict (given on rank 0, {} elsewhere) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = trainable_names(model)
    if state:
        state = {"state": {names[int(i)]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=_options(broadcast_from_rank0=True))


def trainable_names(model) -> list[str]:
    """Names of the trained parameters, in the order the optimizer holds them (training.train)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def local_parts(model, optimizer) -> tuple[dict[str, tuple[torch.Tensor, list[int]]], dict]:
    """({name: (tensor, offsets)}, rest): the parts of the model's and the optimizer's tensors that this rank
    writes to a sharded checkpoint, each with its offsets in the whole tensor, and the rest of the optimizer
    state (param groups, non-tensor values), for JSON.

    Names are model.<parameter> and optimizer.<parameter>.<key>, the keys under which load_sharded looks
    them up. A rank writes its own shards of a sharded tensor; a tensor that every rank holds whole (a model
    that is not sharded, AdamW's step counts) is written by rank 0 alone.
    """
    tensors, rest = _sharded_state(model, optimizer)
    flat = {f"model.{name}": t for name, t in tensors["model"].items()}
    flat.update({f"optimizer.{name}.{key}": t for name, state in tensors["optimizer"].items() for key, t in state.items()})
    parts = {}
    for name, tensor in flat.items():
        if hasattr(tensor, "to_local"):
            [chunk] = tensor.__create_chunk_list__()  # what torch's checkpoint planner reads of a DTensor
            parts[name] = (tensor.to_local(), list(chunk.offsets))
        elif distributed.is_main():
            parts[name] = (tensor, [0] * tensor.dim())
    return parts, rest


def load_sharded(path, model, optimizer, rest: dict) -> None:
    """Load the checkpoint files under path (local_parts, one file per rank that wrote it) on any world size,
    with torch's HuggingFaceStorageReader: it rebuilds each tensor's layout from the files' headers, and each
    rank reads the parts that overlap its own shards (every rank calls; a model that is not sharded reads
    every tensor whole)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    tensors, _ = _sharded_state(model, optimizer)
    with _checkpointing():
        load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    weights = tensors["model"]
    for name, alias in tied_names(model).items():
        weights[alias] = weights[name]
    set_model_state_dict(model, weights)
    state = {name: {**tensors["optimizer"].get(name, {}), **rest["scalars"].get(name, {})}
             for name in tensors["optimizer"].keys() | rest["scalars"].keys()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": rest["param_groups"]})


def _sharded_state(model, optimizer) -> tuple[dict, dict]:
    """({"model": {name: tensor}, "optimizer": {name: {key: tensor}}}, {"param_groups", "scalars"}): this rank's
    shards (DTensors) of a sharded model, the whole tensors of another, keyed by parameter names.

    The optimizer state is made if it is not yet (a zero-gradient step at lr 0), so that a load has
    tensors to fill. A tied head is left out: safetensors refuses one tensor under two names.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model)
    for alias in tied_names(model).values():
        weights.pop(alias, None)
    optim = get_optimizer_state_dict(model, optimizer)
    tensors = {name: {k: v for k, v in s.items() if torch.is_tensor(v)} for name, s in optim["state"].items()}
    scalars = {name: {k: v for k, v in s.items() if not torch.is_tensor(v)} for name, s in optim["state"].items()}
    return {"model": weights, "optimizer": tensors}, \
        {"param_groups": optim["param_groups"], "scalars": {name: s for name, s in scalars.items() if s}}


@contextmanager
def _checkpointing():
    """Around torch's checkpoint load. Without a process group it warns that it runs in one process, the intent
    here. It gathers every rank's error into one CheckpointException, a BaseException that no error handler
    catches: the first failing rank's own error is raised instead."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            yield
        except CheckpointException as e:
            raise e.failures[min(e.failures)][0] from None
