"""Batched sampling with our own decode loop over the KV cache, and teacher-forced scoring.

Why not `model.generate`: on small models its per-token Python work (logits
processors, stopping criteria, cache bookkeeping) costs more than the model.
The loop here does one forward per step, samples every row with tensor ops,
and drops finished rows from the batch (and the cache), so a batch costs what
its still-running rows cost.

Randomness is per prompt, not per batch: the draw for prompt i at step t is a
counter-based hash of (seed, i, t), so a prompt's response does not depend on
which other prompts share its batch, on the batch size, or on how prompts are
split across processes (pass each prompt's global index as `indices`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from aligndistil_cli.core.console import progress
from aligndistil_cli.data.encode import Encoded, collate
from aligndistil_cli.model.kv_cache import make as make_cache
from aligndistil_cli.model.kv_cache import resolve as resolve_kv_cache
from aligndistil_cli.model.kv_cache import select as select_cache_rows
from aligndistil_cli.model.loading import sequence_logps
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.parallel.fsdp import unwrap

_M32 = 0xFFFFFFFF


@dataclass
class Sample:
    prompt: object  # the prompt as the data gave it (a message list)
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool  # ended with EOS before the length cap


# --------------------------------------------------------------------------- per-prompt randomness


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2^32).

    Multipliers stay below 2^31 so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def prompt_keys(seed: int, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """[B] int64 random-stream keys of the prompts with these (global) indices under seed.

    Two processes that sample disjoint shards of one prompt list with the same seed and
    their prompts' global indices draw exactly what one process would have drawn."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    seed_key = _mix32(torch.tensor(seed & _M32) ^ _mix32(torch.tensor((seed >> 32) & _M32)))
    return _mix32(seed_key ^ _mix32((idx & _M32) ^ 0x5BD1E995) ^ _mix32(idx >> 32))


def step_uniforms(keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1), 52 random bits each: each key's draw number `step`.

    step an int: [B]. step a [S] tensor of draw numbers: [B, S], all of a row's draws at once
    (the decode loop computes them before its first step, not one small hash per token)."""
    t = 2 * torch.as_tensor(step, dtype=torch.int64)
    if t.ndim:
        keys = keys.unsqueeze(-1)
    a = _mix32(keys ^ _mix32(t & _M32))
    b = _mix32(a ^ _mix32((t + 1) & _M32))
    n = ((a >> 6) << 26) | (b >> 6)  # 26 + 26 bits: exact in float64
    return (n.double() + 0.5) / float(2**52)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                  top_p: float = 1.0) -> torch.Tensor:
    """[B, V] logits (-inf where a token must never be drawn), [B] uniforms -> [B] token ids.

    Inverse-CDF sampling from softmax(logits / temperature), restricted to the smallest
    set of most likely tokens whose mass reaches top_p (the token that crosses top_p
    is kept, as in transformers' TopPLogitsWarper). Pure sampling: no top-k."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.double().cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (picked if order is None else order.gather(-1, picked)).squeeze(-1)


# --------------------------------------------------------------------------- the decode loop


class Decoder(Protocol):
    """What the decode loop samples from: one step of next-token logits over a cache it owns.

    step gets the new tokens [B, L] with the attention mask over everything so far [B, T]
    and the new tokens' positions [B, L]; it returns [B, V] float32 logits for the next
    token (-inf on rows never to be sampled) and the new state (None on the first call).
    select keeps only the batch rows `rows` of a state. A composed teacher (several
    models, logits combined) is a Decoder whose state holds one cache per model."""

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             state) -> tuple[torch.Tensor, object]: ...

    def select(self, state, rows: torch.Tensor): ...


class ModelDecoder:
    """A causal LM with its KV cache (kv_cache.py: dynamic, static or preallocated); the head runs
    on the last position only. Static and preallocated caches are sized on the first step for the
    prompt length plus max_new_tokens."""

    def __init__(self, model, vocab: int | None, kv_cache: str = "dynamic", max_new_tokens: int | None = None):
        if kv_cache != "dynamic" and max_new_tokens is None:
            raise ValueError(f"a {kv_cache} KV cache needs max_new_tokens to size it")
        self.model, self.vocab = model, vocab
        self.kv_cache, self.max_new_tokens = kv_cache, max_new_tokens
        # transformers 5.x calls the cache `cache`; 4.x called it `past_key_values` (argument and output).
        self.cache_name = "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"

    def step(self, input_ids, attention_mask, position_ids, state):
        if state is None:
            # The loop's last forward feeds the token drawn at step max_new_tokens - 2.
            state = make_cache(self.kv_cache, unwrap(self.model).config,
                               input_ids.shape[1] + (self.max_new_tokens or 0) - 1)
        cache = {self.cache_name: state} if state is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **cache)
        logits = out.logits[:, -1].float()
        if self.vocab is not None:
            logits[:, self.vocab :] = float("-inf")
        return logits, getattr(out, self.cache_name)

    def select(self, state, rows):
        return select_cache_rows(state, rows)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask, padded on the left so every row ends where generation starts."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, length - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def decode(decoder: Decoder, prompt_ids: list[list[int]], keys: torch.Tensor, *, eos_id: int, pad_id: int,
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           device=None, synced: bool = False, check_every: int = 1,
           drop_finished: bool = True) -> list[tuple[list[int], bool]]:
    """Sample one response per prompt (one batch): (ids up to and including the first EOS, finished).

    Row b draws its token at step t from step_uniforms(keys[b], t). Tokens stay on the device;
    a row's response ends at its first EOS, whatever it drew after. Every check_every steps the
    host reads how many rows have sampled EOS (the loop's only host sync): it stops once all
    have, and (drop_finished) drops finished rows from the batch, and from the decoder's cache,
    once they are a quarter of it (dropping copies the cache, so it is not worth doing for every
    row). Without drop_finished the batch keeps its shape to the end (what CUDA graphs need).
    synced (a model sharded over ranks): every rank keeps stepping until all ranks' rows have
    finished, since each forward is a collective."""
    device = device or torch.device("cpu")
    ids, prompt_mask = left_pad(prompt_ids, pad_id, device)
    batch, length = ids.shape
    # The mask over prompt and response, filled once: step t sees its first length + t + 1 columns.
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
    position = (prompt_mask.cumsum(-1) - 1).clamp_(min=0)
    uniforms = step_uniforms(keys.to(torch.int64), torch.arange(max_new_tokens)).to(device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    live = torch.arange(batch, device=device)  # original row of each row still in the batch
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # rows in the batch that have sampled EOS
    logits, state = decoder.step(ids, prompt_mask, position, None)
    position = position[:, -1:]
    for t in range(max_new_tokens - 1):
        new = sample_tokens(logits, uniforms[:, t], temperature, top_p)
        tokens[live, t] = new
        ended |= new == eos_id
        if (t + 1) % check_every == 0:
            n_ended = int(ended.sum())
            if synced:
                if distributed.all_reduce_max(float(n_ended < len(ended))) == 0:
                    break
            elif n_ended == len(ended):
                break
            if drop_finished and 0 < n_ended < len(ended) and 4 * n_ended >= len(ended):
                rows = (~ended).nonzero().squeeze(1)
                live, ended, uniforms, new, mask, position = (
                    live[rows], ended[rows], uniforms[rows], new[rows], mask[rows], position[rows])
                state = decoder.select(state, rows)
        position = position + 1
        logits, state = decoder.step(new.unsqueeze(1), mask[:, : length + t + 1], position, state)
    else:  # the cap: one last draw, no forward after it
        tokens[live, max_new_tokens - 1] = sample_tokens(logits, uniforms[:, -1], temperature, top_p)
    tokens = tokens.cpu()
    is_eos = tokens == eos_id
    finished = is_eos.any(-1)
    lengths = torch.where(finished, is_eos.int().argmax(-1) + 1, max_new_tokens).tolist()
    return [(tokens[b, : lengths[b]].tolist(), bool(finished[b])) for b in range(batch)]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so left padding stays short."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list, prompt_ids: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
             desc: str = "sample", indices: Sequence[int] | None = None,
             decoder: Decoder | None = None, split: bool = False, kv_cache: str = "auto",
             device: torch.device | None = None) -> list[Sample]:
    """Sample one response per prompt (pure sampling: no top-k, so KL estimates stay unbiased).

    prompts are carried into the samples as given; prompt_ids are what the model sees.
    indices (default 0..n-1) name each prompt's random stream; decoder (default: model
    itself, over the KV cache kv_cache names: kv_cache.resolve) supplies the next-token logits.
    Samples come back in the order of prompts.
    split (a model every rank holds whole): under torchrun each rank samples every
    world-size-th batch and all get every sample; the samples do not depend on the world size.
    device: where the model computes, which the run knows (under --fsdp-cpu-offload its parameters
    rest on the CPU); by default the device of its parameters.
    """
    if decoder is None:
        model.eval()
        decoder = ModelDecoder(model, len(tokenizer), resolve_kv_cache(kv_cache), max_new_tokens)
    device = device or next(model.parameters()).device
    keys = prompt_keys(seed, list(range(len(prompts))) if indices is None else indices)
    batches = length_sorted_batches([len(p) for p in prompt_ids], batch_size)
    if split:
        batches = batches[distributed.rank() :: distributed.world_size()]
    # A sharded model's ranks must run the same number of forward passes even when their samples end early.
    synced = fsdp.is_sharded(model) and distributed.world_size() > 1
    mine: list = []
    with progress(desc, sum(len(b) for b in batches)) as advance:
        for chunk in batches:
            outs = decode(decoder, [prompt_ids[i] for i in chunk], keys[chunk], eos_id=tokenizer.eos_token_id,
                          pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, device=device, synced=synced)
            mine.extend((i, ids, done) for i, (ids, done) in zip(chunk, outs))
            advance(len(chunk))
    parts = distributed.gather_objects(mine) if split else [mine]
    results: list = [None] * len(prompts)
    for part in parts:
        for i, ids, done in part:
            results[i] = (ids, done)
    texts = tokenizer.batch_decode([ids for ids, _ in results], skip_special_tokens=True)
    return [Sample(p, p_ids, ids, text, done)
            for p, p_ids, (ids, done), text in zip(prompts, prompt_ids, results, texts)]


@torch.no_grad()
def score_samples(model, tokenizer, samples: list[Sample], batch_size: int = 64, chunk_size: int = 1024,
                  split: bool = False, device: torch.device | None = None) -> list[float]:
    """log pi(response | prompt) of each sample under model (teacher forcing), in the order of samples.

    Samples are batched by length: response lengths vary a lot, and padding is compute.
    split (a model every rank holds whole): under torchrun each rank scores its share of the samples.
    device: where the model computes (as for generate).
    """
    if split:
        return distributed.split_map(lambda part: score_samples(model, tokenizer, part, batch_size, chunk_size,
                                                                device=device), samples)
    device = device or next(model.parameters()).device
    totals: list[float] = [0.0] * len(samples)
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    for chunk in length_sorted_batches(lengths, batch_size):
        examples = [Encoded(samples[i].prompt_ids, samples[i].response_ids) for i in chunk]
        batch = collate(examples, tokenizer.pad_token_id).to(device)
        for i, logp in zip(chunk, sequence_logps(model, batch, len(tokenizer), chunk_size).tolist()):
            totals[i] = logp
    return totals
