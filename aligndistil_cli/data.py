"""Load and validate data, tokenise prompt/response pairs, build shifted masks.

The mask convention used everywhere: with a Hugging Face causal LM the logits
at position t predict token t+1. For a sequence prompt p_0..p_{P-1} followed
by response r_0..r_{R-1} (r_{R-1} is the EOS), the positions whose logits
predict response tokens are P-1 .. P+R-2. Position P-1 (the last prompt
token) predicts the first response token and is in; the EOS position P+R-1
predicts nothing we train on and is out, as are padding positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import UserError, where

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "response")
PROMPT_FIELDS = ("prompt",)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where(path, lineno)}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, lineno)}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where(path, lineno)}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def load_rows(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a local JSONL file, each with non-empty string `fields`.

    Loaded through `datasets` so the rest of the pipeline sees one Arrow-backed
    form; validation happens first so that an error names the file, row and field.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    rows = []
    for lineno, row in _read_jsonl(path):
        for name in fields:
            if name not in row:
                raise UserError(f"{where(path, lineno, name)}: missing")
            value = row[name]
            if not isinstance(value, str):
                raise UserError(f"{where(path, lineno, name)}: expected a string, got {type(value).__name__}")
            if not value.strip():
                raise UserError(f"{where(path, lineno, name)}: empty")
        if "chosen" in fields and row["chosen"] == row["rejected"]:
            raise UserError(f"{where(path, lineno, 'rejected')}: identical to 'chosen'")
        rows.append({name: row[name] for name in fields})
    if not rows:
        raise UserError(f"data file {path} has no rows")
    datasets.disable_progress_bars()
    return datasets.Dataset.from_list(rows).to_list()


@dataclass
class Encoded:
    """One tokenised example: prompt ids (with BOS) and response ids (ending in EOS unless cut)."""

    prompt: list[int]
    response: list[int]


def encode(tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int) -> Encoded:
    """Tokenise prompt and response separately and concatenate the ids.

    Prompts keep their last max_prompt_length tokens (the BOS is kept in front);
    responses are cut from the right so that the whole fits max_length.
    """
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) > max_prompt_length:
        keep_bos = prompt_ids[:1] if prompt_ids[:1] == [tokenizer.bos_token_id] else []
        prompt_ids = keep_bos + prompt_ids[len(prompt_ids) - max_prompt_length + len(keep_bos):]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return Encoded(prompt_ids, response_ids)


@dataclass
class Batch:
    """A right-padded batch.

    input_ids, attention_mask, loss_mask, targets: [B, T]. loss_mask marks the
    positions whose logits predict a response token (already shifted);
    targets[b, t] is the token those logits predict (input_ids[b, t + 1]).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.targets)))

    @property
    def num_positions(self) -> torch.Tensor:
        """[B] response positions per sequence."""
        return self.loss_mask.sum(dim=1)


def response_mask(prompt_lens: list[int], response_lens: list[int], length: int) -> torch.Tensor:
    """[B, length] bool: True at positions P-1 .. P+R-2 of each row (see module docstring)."""
    mask = torch.zeros(len(prompt_lens), length, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        mask[b, p - 1 : p + r - 1] = True
    return mask


def collate(examples: list[Encoded], pad_id: int) -> Batch:
    seqs = [e.prompt + e.response for e in examples]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention[b, : len(s)] = 1
    mask = response_mask([len(e.prompt) for e in examples], [len(e.response) for e in examples], length)
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    targets = targets.masked_fill(~mask, 0)
    return Batch(input_ids, attention, mask, targets)


def batches(items: list, batch_size: int, order: Iterable[int]) -> Iterator[list]:
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start : start + batch_size]]


def encode_pairs(tokenizer, rows: list[dict], max_length: int, max_prompt_length: int) -> list[tuple[Encoded, Encoded]]:
    return [
        (
            encode(tokenizer, r["prompt"], r["chosen"], max_length, max_prompt_length),
            encode(tokenizer, r["prompt"], r["rejected"], max_length, max_prompt_length),
        )
        for r in rows
    ]
