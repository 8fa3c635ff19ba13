"""The KV caches the decode loop can run on (sampling.ModelDecoder), and how each drops batch rows.

- dynamic: transformers' DynamicCache. Each step concatenates the new keys and values onto
  the old ones, a copy of the whole cache per layer per token.
- static: transformers' StaticCache, preallocated for prompt + max_new_tokens and written in
  place. Attention always spans the whole preallocated length (slots not yet written are
  masked by the causal mask: a key past the query's cache position is never attended), so
  shapes never change: what torch.compile and CUDA graphs need.
- preallocated (ours): a DynamicCache whose full-attention layers write into buffers
  preallocated for prompt + max_new_tokens and hand attention a view of the written prefix:
  no concatenation, and no attention over slots not written yet.

Dropping finished rows copies the kept rows of every layer in each. bench.kv_cache times them all.
"""

from __future__ import annotations

import functools

KV_CACHES = ("auto", "dynamic", "static", "preallocated")
KV_CACHE_HELP = ("KV cache of the sampler: dynamic (grows by concatenation), static (preallocated, attention "
                 "over its full length; fixed shapes), preallocated (written in place, attention over the "
                 "written part), or auto (dynamic: no other was faster on CPU, bench.kv_cache; CUDA not "
                 "measured). All draw the same tokens.")


def resolve(choice: str) -> str:
    """The cache `choice` names. auto is dynamic on every device: on CPU neither the static
    nor the preallocated cache was reliably faster (bench.kv_cache, README "Sampling speed"); on CUDA
    nothing is measured yet, and auto does not guess."""
    if choice not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}; got {choice!r}")
    return "dynamic" if choice == "auto" else choice


def make(kind: str, config, capacity: int):
    """A fresh cache of `kind` for a model with this config, room for `capacity` tokens (None: dynamic)."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import DynamicLayer

    if kind == "dynamic":
        return None  # the model makes its own on the first forward
    if kind == "static":
        return StaticCache(config=config, max_cache_len=capacity)
    cache = DynamicCache(config=config)
    # Only plain full-attention layers: sliding-window and other layer kinds keep their own logic.
    layer_class = preallocated_layer()
    cache.layers = [layer_class(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def select(cache, rows):
    """Keep only the batch rows `rows` of a cache made by `make`, in that order."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        cache.batch_select_indices(rows)  # DynamicCache: each layer's own (PreallocatedLayer's below)
        return cache
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            layer.batch_size = len(rows)
    return cache


@functools.cache
def preallocated_layer():
    """The PreallocatedLayer class (defined on first use: this module imports neither torch nor transformers,
    so the CLI's help, which reads KV_CACHES, stays light)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer over buffers of `capacity` positions: update writes the new keys and values in
        place and keys/values are views of the written prefix, so the layer's length, mask sizes and
        attention are a DynamicLayer's, without its per-token concatenation."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            batch, heads = key_states.shape[:2]
            # Never read before written: attention only sees the written prefix.
            self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"preallocated KV cache full: {end} positions > capacity {self.capacity}")
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if not self.is_initialized:
                return
            length = self.keys.shape[-2]
            key_buffer = self.key_buffer.new_empty((len(indices),) + self.key_buffer.shape[1:])
            value_buffer = self.value_buffer.new_empty((len(indices),) + self.value_buffer.shape[1:])
            key_buffer[:, :, :length] = self.keys[indices]  # the written prefix only
            value_buffer[:, :, :length] = self.values[indices]
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
            self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]

        def reset(self) -> None:
            self.key_buffer = self.value_buffer = None
            super().reset()

    return PreallocatedLayer

