"""Load and validate data, tokenise prompt/response pairs, build shifted masks.

The mask convention used everywhere: with a Hugging Face causal LM the logits
at position t predict token t+1. For a sequence prompt p_0..p_{P-1} followed
by response r_0..r_{R-1} (r_{R-1} is the EOS), the positions whose logits
predict response tokens are P-1 .. P+R-2. Position P-1 (the last prompt
token) predicts the first response token and is in; the EOS position P+R-1
predicts nothing we train on and is out, as are padding positions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import UserError, where
from .sources import flatten_plain, read_jsonl as _read_jsonl

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "response")
PROMPT_FIELDS = ("prompt",)


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


def truncate(tokenizer, prompt_ids: list[int], response_ids: list[int], max_length: int,
             max_prompt_length: int) -> tuple[Encoded, bool]:
    """Cut prompts from the left (keeping a leading BOS) and responses from the right.

    Returns the example and whether anything was cut.
    """
    cut = False
    if len(prompt_ids) > max_prompt_length:
        keep_bos = prompt_ids[:1] if prompt_ids[:1] == [tokenizer.bos_token_id] else []
        prompt_ids = keep_bos + prompt_ids[len(prompt_ids) - max_prompt_length + len(keep_bos):]
        cut = True
    room = max_length - len(prompt_ids)
    cut = cut or len(response_ids) > room
    return Encoded(prompt_ids, response_ids[:room]), cut


def encode(tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int) -> Encoded:
    """Tokenise plain-text prompt and response separately and concatenate the ids.

    The prompt gets the tokenizer's special tokens (BOS), the response none, plus EOS.
    """
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return truncate(tokenizer, prompt_ids, response_ids, max_length, max_prompt_length)[0]


def uses_template(tokenizer, chat_template: bool) -> bool:
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def _no_double_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def prompt_ids(tokenizer, prompt: list[dict], chat_template: bool = True) -> list[int]:
    """Token ids of a prompt conversation, ready for the model to continue."""
    if uses_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return _no_double_bos(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)
    return tokenizer(flatten_plain(prompt)).input_ids


def encode_messages(tokenizer, prompt: list[dict], response: list[dict], max_length: int, max_prompt_length: int,
                    chat_template: bool = True, at: str = "") -> tuple[Encoded, bool]:
    """Tokenise a (prompt, response) conversation; returns (example, truncated).

    With a chat template, prompt + response is rendered whole and the
    rendered prompt must be an exact prefix of it, as text and as token ids,
    so training sees exactly what generation will produce. The response ends
    at the tokenizer's EOS (text the template puts after it is dropped).
    """
    if not uses_template(tokenizer, chat_template):
        text = flatten_plain(response)
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return truncate(tokenizer, prompt_ids(tokenizer, prompt, False), ids, max_length, max_prompt_length)
    p_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full_text.startswith(p_text):
        raise UserError(f"{at}: the chat template does not render the prompt as a prefix of prompt + response; "
                        "use --no-chat-template or a template that does")
    p_ids = _no_double_bos(tokenizer, tokenizer(p_text, add_special_tokens=False).input_ids)
    full = _no_double_bos(tokenizer, tokenizer(full_text, add_special_tokens=False).input_ids)
    if full[: len(p_ids)] != p_ids:
        raise UserError(f"{at}: the tokenised prompt is not a prefix of the tokenised prompt + response "
                        "(the tokenizer merges across the boundary); use --no-chat-template")
    r_ids = full[len(p_ids):]
    eos = tokenizer.eos_token_id
    r_ids = r_ids[: len(r_ids) - r_ids[::-1].index(eos)] if eos in r_ids else r_ids + [eos]
    return truncate(tokenizer, p_ids, r_ids, max_length, max_prompt_length)


def load_data(config, kind: str, data: str | None = None) -> tuple[list[dict], dict]:
    """Rows of config.data (or data) normalised by sources.load_source; stats printed and returned."""
    from .sources import load_source
    from .training import stderr

    rows, stats = load_source(data or config.data, kind=kind, split=config.split, subset=config.subset,
                              data_format=config.data_format, prompt_key=config.prompt_key,
                              chosen_key=config.chosen_key, rejected_key=config.rejected_key,
                              messages_key=config.messages_key, skip_bad_rows=config.skip_bad_rows)
    summary = dataclasses.asdict(stats)
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items()) or "none"
    stderr.print(f"data {stats.source}: format {stats.format}, read {stats.read}, kept {stats.kept}, "
                 f"dropped {dropped}", markup=False, highlight=False)
    return rows, summary


def data_fingerprint(config, data: str | None = None) -> str:
    """The data's bytes (or hub id) plus every setting that changes how rows are read."""
    from .artifacts import fingerprint_data, sha256_json

    settings = {k: getattr(config, k) for k in ("split", "subset", "data_format", "prompt_key", "chosen_key",
                                                  "rejected_key", "messages_key", "skip_bad_rows", "chat_template")}
    return sha256_json({"data": fingerprint_data(data or config.data), **settings})


def data_input(config, data: str | None = None) -> dict:
    """The manifest's record of a data input: raw fingerprint plus how it was read."""
    from .artifacts import fingerprint_data, input_record

    path = data or config.data
    return {**input_record("data", path, fingerprint_data(path)), "read_as": data_fingerprint(config, data)}


def encode_rows(tokenizer, rows: list[dict], response_key: str, config, source: str) -> tuple[list[Encoded], int]:
    """Encode (prompt, rows[response_key]) for every row; returns examples and the truncated count."""
    examples, truncated = [], 0
    for i, row in enumerate(rows, start=1):
        example, cut = encode_messages(tokenizer, row["prompt"], row[response_key], config.max_length,
                                       config.max_prompt_length, config.chat_template, where(source, i, response_key))
        examples.append(example)
        truncated += cut
    return examples, truncated


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


def encode_pairs(tokenizer, rows: list[dict], config, source: str) -> tuple[list[tuple[Encoded, Encoded]], int]:
    """(chosen, rejected) examples of normalised preference rows, and how many were truncated."""
    chosen, cut_c = encode_rows(tokenizer, rows, "chosen", config, source)
    rejected, cut_r = encode_rows(tokenizer, rows, "rejected", config, source)
    return list(zip(chosen, rejected)), cut_c + cut_r
