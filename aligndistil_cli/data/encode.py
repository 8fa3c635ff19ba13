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
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from aligndistil_cli.core.errors import UserError, where
from aligndistil_cli.data import chat
from aligndistil_cli.data.readers import read_jsonl as _read_jsonl
from aligndistil_cli.data.sources import Row, flatten_plain, is_conversational

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


class EncodeError(UserError):
    """A row the chat template or tokenizer cannot turn into ids; `reason` counts it under --skip-bad-rows."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


def _no_double_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def prompt_ids(tokenizer, prompt: list[dict], template: str | None = None) -> list[int]:
    """Token ids of a prompt conversation, ready for the model to continue: rendered with the Jinja template,
    or plain text when it is None (chat.ChatTemplate.for_row says which)."""
    if template is not None:
        text = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True, tokenize=False)
        return _no_double_bos(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)
    return tokenizer(flatten_plain(prompt)).input_ids


def encode_messages(tokenizer, prompt: list[dict], response: list[dict], max_length: int, max_prompt_length: int,
                    template: str | None = None) -> tuple[Encoded, bool]:
    """Tokenise a (prompt, response) conversation; returns (example, truncated).

    With a chat template (Jinja text; None: plain text), prompt + response is rendered whole and the
    rendered prompt must be an exact prefix of it, as text and as token ids,
    so training sees exactly what generation will produce. The response ends
    at the tokenizer's EOS (text the template puts after it is dropped).
    Raises EncodeError (without the row's location, which the caller knows).
    """
    with _as_encode_errors():
        return _encode_messages(tokenizer, prompt, response, max_length, max_prompt_length, template)


@contextmanager
def _as_encode_errors():
    """Template and tokenizer failures on one row's text, as EncodeError."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as e:  # a template's raise_exception, e.g. "roles must alternate user/assistant"
        raise EncodeError("template_error", f"the chat template refused the conversation ({_one_line(e)})") from None
    except (TypeError, ValueError) as e:  # what the tokenizer raises for input it cannot encode
        raise EncodeError("tokenizer_error", f"the tokenizer cannot encode it ({_one_line(e)})") from None


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _encode_messages(tokenizer, prompt: list[dict], response: list[dict], max_length: int, max_prompt_length: int,
                     template: str | None) -> tuple[Encoded, bool]:
    if template is None:
        text = flatten_plain(response)
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return truncate(tokenizer, prompt_ids(tokenizer, prompt), ids, max_length, max_prompt_length)
    p_text = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + response, chat_template=template, tokenize=False)
    if not full_text.startswith(p_text):
        raise EncodeError("template_not_prefix", "the chat template does not render the prompt as a prefix of "
                          "prompt + response; use --chat-template never or a template that does")
    p_ids = _no_double_bos(tokenizer, tokenizer(p_text, add_special_tokens=False).input_ids)
    full = _no_double_bos(tokenizer, tokenizer(full_text, add_special_tokens=False).input_ids)
    if full[: len(p_ids)] != p_ids:
        raise EncodeError("tokens_not_prefix", "the tokenised prompt is not a prefix of the tokenised prompt + "
                          "response (the tokenizer merges across the boundary); use --chat-template never")
    r_ids = full[len(p_ids):]
    eos = tokenizer.eos_token_id
    r_ids = r_ids[: len(r_ids) - r_ids[::-1].index(eos)] if eos in r_ids else r_ids + [eos]
    return truncate(tokenizer, p_ids, r_ids, max_length, max_prompt_length)


def load_data(config, kind: str, data: str | None = None) -> tuple[list[dict], dict]:
    """Rows of config.data (or data) normalised by sources.load_source; stats printed and returned."""
    from aligndistil_cli.core.console import stderr
    from aligndistil_cli.data.sources import load_source

    rows, stats = load_source(data or config.data, kind=kind, split=config.split, subset=config.subset,
                              data_format=config.data_format, prompt_key=config.prompt_key,
                              chosen_key=config.chosen_key, rejected_key=config.rejected_key,
                              messages_key=config.messages_key, skip_bad_rows=config.skip_bad_rows)
    summary = dataclasses.asdict(stats)
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items()) or "none"
    stderr.print(f"data {stats.source}: format {stats.format}, read {stats.read}, kept {stats.kept}, "
                 f"dropped {dropped}", markup=False, highlight=False, soft_wrap=True)
    return rows, summary


def data_fingerprint(config, data: str | None = None) -> str:
    """The data's bytes (or hub id) plus every setting that changes how rows are read."""
    from aligndistil_cli.core.hashing import sha256_json
    from aligndistil_cli.rundir.artifacts import fingerprint_data

    settings = {k: getattr(config, k) for k in ("split", "subset", "data_format", "prompt_key", "chosen_key",
                                                  "rejected_key", "messages_key", "skip_bad_rows",
                                                  "refuse_special_tokens")}
    return sha256_json({"data": fingerprint_data(data or config.data), **settings,
                        "chat_template": chat.setting(config.chat_template)})


def data_input(config, data: str | None = None) -> dict:
    """The manifest's record of a data input: raw fingerprint plus how it was read."""
    from aligndistil_cli.rundir.artifacts import fingerprint_data, input_record

    path = data or config.data
    return {**input_record("data", path, fingerprint_data(path)), "read_as": data_fingerprint(config, data)}


def special_token_texts(tokenizer) -> list[str]:
    """The text of every special token, longest first: written inside a message, it becomes the control token."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return sorted({t for t in [*added, *tokenizer.all_special_tokens] if t}, key=len, reverse=True)


def _special_token_in(row: dict, keys: tuple[str, ...], specials: re.Pattern | None) -> tuple[str, str] | None:
    """(field, problem) for the first special-token text inside a message of the row, if any."""
    for key in ("prompt", *keys) if specials else ():
        for i, message in enumerate(row[key], start=1):
            found = specials.search(message["content"])
            if found:
                return key, f"message {i} contains the special token {found.group()!r} as text"
    return None


# No token is this many characters on average: a field longer than this many per token of --max-length is far
# beyond what the stage keeps after truncation, and tokenising it whole would cost time and memory for nothing
# (a 10 MB row: 10 s and 1.2 GB with the toy tokenizer, minutes with a large BPE one).
CHARS_PER_TOKEN = 64


def _too_long(row: dict, keys: tuple[str, ...], max_length: int | None) -> tuple[str, str] | None:
    """(field, problem) for the first field of the row whose messages hold more text than max_length tokens could."""
    limit = CHARS_PER_TOKEN * max_length if max_length else None
    for key in ("prompt", *keys) if limit else ():
        size = sum(len(message["content"]) for message in row[key])
        if size > limit:
            return key, (f"too long: {size:,} characters, far beyond what --max-length {max_length} tokens can hold "
                         f"({limit:,} characters at most)")
    return None


def _encode_table(tokenizer, rows: list[dict], keys: tuple[str, ...], config, stats: dict,
                  encode_row: Callable[[dict, str, str | None], tuple[list, bool]]) -> list[tuple[dict, list, bool]]:
    """(row, encode_row(row, key, template) results, whether any was truncated) for each row that encodes;
    template is the row's chat template under --chat-template (chat.py), None for plain text.

    A row that cannot be encoded (chat template, tokenizer, special-token text under
    --refuse-special-tokens, or a field far too long for --max-length) stops the run naming
    its file, row and field, or with --skip-bad-rows is dropped. stats (load_data's summary,
    written to the manifest) gets the drops, the chat template's mode and the rows it rendered,
    and the rows with special-token text.
    """
    templates = chat.resolve(tokenizer, config.chat_template)
    texts = special_token_texts(tokenizer)
    specials = re.compile("|".join(map(re.escape, texts))) if texts else None
    refuse = getattr(config, "refuse_special_tokens", False)
    out, with_specials, dropped, rendered = [], [], Counter(), Counter()
    for i, row in enumerate(rows, start=1):
        label, number = row.origin if isinstance(row, Row) else (stats.get("source", "data"), i)
        template = templates.for_row(is_conversational(row))
        try:
            long = _too_long(row, keys, getattr(config, "max_length", None))
            if long:
                raise _FieldError(long[0], EncodeError("too_long", long[1]))
            found = _special_token_in(row, keys, specials)
            if found:
                with_specials.append(f"{where(label, number, found[0])}: {found[1]}")
                if refuse:
                    raise _FieldError(found[0], EncodeError("special_token", found[1] + " (--refuse-special-tokens)"))
            encoded, cut = [], False
            for key in keys or ("prompt",):
                try:
                    item, c = encode_row(row, key, template)
                except EncodeError as e:
                    raise _FieldError(key, e) from None
                encoded.append(item)
                cut = cut or c
            out.append((row, encoded, cut))
            rendered["templated" if template is not None else "plain_conversations" if is_conversational(row)
                     else "plain"] += 1
        except _FieldError as f:
            if not config.skip_bad_rows:
                raise UserError(f"{where(label, number, f.field)}: {f.error.problem}") from None
            dropped[f.error.reason] += 1
    _record(stats, dropped, len(out), with_specials)
    templates.record(stats, rendered)
    return out


class _FieldError(Exception):
    def __init__(self, field: str, error: EncodeError):
        super().__init__(error.problem)
        self.field, self.error = field, error


def _record(stats: dict, dropped: Counter, kept: int, with_specials: list[str]) -> None:
    from aligndistil_cli.core.console import stderr

    if dropped:
        stats["dropped"] = dict(sorted((Counter(stats.get("dropped", {})) + dropped).items()))
        stats["kept"] = kept
        stderr.print(f"data {stats.get('source')}: dropped at tokenisation "
                     + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())), markup=False, highlight=False,
                     soft_wrap=True)
    if not kept:
        raise UserError(f"data {stats.get('source')}: every row was dropped "
                        f"({', '.join(f'{k} {v}' for k, v in sorted(stats['dropped'].items()))})")
    stats["special_token_rows"] = len(with_specials)
    if with_specials:
        stderr.print(f"warning: data {stats.get('source')}: {len(with_specials)} rows have special-token text inside "
                     f"a message (first {with_specials[0]}); it becomes a control token such as a turn boundary. "
                     "--refuse-special-tokens stops at such rows.", markup=False, highlight=False, soft_wrap=True)


def encode_rows(tokenizer, rows: list[dict], response_key: str, config, stats: dict) -> tuple[list[Encoded], int]:
    """Encode (prompt, rows[response_key]) for every row; returns examples and the number truncated.

    stats is load_data's summary: rows dropped here (see _encode_table) are counted in it.
    """
    encoded = _encode_table(tokenizer, rows, (response_key,), config, stats, _messages_encoder(tokenizer, config))
    return [examples[0] for _, examples, _ in encoded], sum(cut for _, _, cut in encoded)


def _messages_encoder(tokenizer, config) -> Callable[[dict, str, str | None], tuple[Encoded, bool]]:
    return lambda row, key, template: encode_messages(tokenizer, row["prompt"], row[key], config.max_length,
                                                      config.max_prompt_length, template)


def encode_prompts(tokenizer, rows: list[dict], config, stats: dict) -> tuple[list[dict], list[list[int]]]:
    """The prompt rows that can be rendered, and their token ids (prompt_ids); failures as in encode_rows."""

    def encode(row: dict, _key: str, template: str | None) -> tuple[list[int], bool]:
        with _as_encode_errors():
            return prompt_ids(tokenizer, row["prompt"], template), False

    encoded = _encode_table(tokenizer, rows, (), config, stats, encode)
    return [row for row, _, _ in encoded], [ids[0] for _, ids, _ in encoded]


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


def encode_pairs(tokenizer, rows: list[dict], config, stats: dict) -> tuple[list[tuple[Encoded, Encoded]], int]:
    """(chosen, rejected) examples of normalised preference rows, and how many rows (pairs) had either cut.

    A pair is kept or dropped whole (see _encode_table).
    """
    encoded = _encode_table(tokenizer, rows, ("chosen", "rejected"), config, stats, _messages_encoder(tokenizer, config))
    return [(chosen, rejected) for _, (chosen, rejected), _ in encoded], sum(cut for _, _, cut in encoded)
