"""Batched sampling with left padding and the KV cache, and teacher-forced scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed, fsdp
from .data import Encoded, collate
from .modeling import sequence_logps
from .training import progress


@dataclass
class Sample:
    prompt: object  # the prompt as the data gave it (a message list)
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool  # ended with EOS before the length cap


class _MaskPaddedRows:
    """Logits processor: embedding rows past the tokenizer are never sampled."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        scores[:, self.vocab :] = float("-inf")
        return scores


@torch.no_grad()
def split_generation(row: list[int], prompt_width: int, eos_id: int) -> tuple[list[int], bool]:
    """The response of one generated row: the tokens after the (left-padded) prompt, up to and including
    the first EOS. Everything after that EOS is padding and never trained on. Returns (ids, finished)."""
    new = row[prompt_width:]
    if eos_id in new:
        return new[: new.index(eos_id) + 1], True
    return new, False


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask, padded on the left so every row ends where generation starts."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, prompt_ids: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
             desc: str = "sample", split: bool = False) -> list[Sample]:
    """Sample one response per prompt (pure sampling: no top-k, so KL estimates stay unbiased).

    prompts are carried into the samples as given; prompt_ids are what the model sees.
    split (a model every rank holds whole): under torchrun each rank samples
    every world-size-th batch and all get every sample. A batch's seed depends
    only on its index, so the samples do not depend on the world size.
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    processors = LogitsProcessorList([_MaskPaddedRows(len(tokenizer))])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[Sample] = []
    model.eval()
    mine = [s for i, s in enumerate(range(0, len(prompts), batch_size))
            if not split or i % distributed.world_size() == distributed.rank()]
    # A sharded model's ranks must run the same number of forward passes even when their samples end early.
    synced = fsdp.is_sharded(model) and distributed.world_size() > 1
    with progress(desc, sum(len(prompts[s : s + batch_size]) for s in mine)) as advance:
        for start in range(0, len(prompts), batch_size):
            # One seed per batch, drawn from our generator: results do not depend on
            # what else touched the global RNG.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            if start not in mine:
                continue
            chunk = prompts[start : start + batch_size]
            chunk_ids = prompt_ids[start : start + batch_size]
            input_ids, attention_mask = left_pad(chunk_ids, tokenizer.pad_token_id, device)
            out = model.generate(
                synced_gpus=synced,
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                logits_processor=processors,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for prompt, p_ids, row in zip(chunk, chunk_ids, out.tolist()):
                ids, finished = split_generation(row, input_ids.shape[1], tokenizer.eos_token_id)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                samples.append(Sample(prompt, p_ids, ids, text, finished))
            advance(len(chunk))
    if split and distributed.world_size() > 1:
        # Rank r holds batches r, r + W, ...: interleave them back into prompt order.
        parts = [[p[i : i + batch_size] for i in range(0, len(p), batch_size)] for p in distributed.gather_objects(samples)]
        samples = [s for b in range(-(-len(prompts) // batch_size))
                   for s in parts[b % len(parts)][b // len(parts)]]
    return samples


@torch.no_grad()
def score_samples(model, tokenizer, samples: list[Sample], batch_size: int = 64, chunk_size: int = 1024,
                  split: bool = False) -> list[float]:
    """log pi(response | prompt) of each sample under model (teacher forcing).

    split (a model every rank holds whole): under torchrun each rank scores its share of the samples.
    """
    if split:
        return distributed.split_map(lambda part: score_samples(model, tokenizer, part, batch_size, chunk_size), samples)
    device = next(model.parameters()).device
    totals: list[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        examples = [Encoded(s.prompt_ids, s.response_ids) for s in chunk]
        batch = collate(examples, tokenizer.pad_token_id).to(device)
        totals.extend(sequence_logps(model, batch, len(tokenizer), chunk_size).tolist())
    return totals
