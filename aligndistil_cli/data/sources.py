"""Load preference, prompt and SFT data in the common public layouts and normalise it.

Every row becomes chat messages ({"role": "system"|"user"|"assistant", "content": str}):

- pairs:   {"prompt": [...], "chosen": [...], "rejected": [...]}
- prompts: {"prompt": [...]}
- sft:     {"prompt": [...], "response": [...]}

The prompt is the conversation up to the final assistant turn (earlier turns of a
multi-turn conversation stay in it) and always ends with a user turn; responses are
assistant messages. Messages keep only role and content.

Files are read by readers.py; errors name the file and row as described there. Each
normalised row is a Row that remembers its file and row number, so that later failures
(tokenisation, chat template) name them too, and whether the data gave it as a conversation
or as plain strings (only conversations get a chat template by default, chat.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from aligndistil_cli.core.errors import UserError, shown, where
from aligndistil_cli.data.readers import RowError, Table, kind_of, read_tables

FORMATS = ("standard", "conversational", "ultrafeedback", "implicit", "hh", "prompt", "messages", "sft")
KINDS = ("pairs", "prompts", "sft")
ROLES = ("system", "user", "assistant")
PAIR_FORMATS = ("standard", "conversational", "ultrafeedback", "implicit", "hh")
# Prompts can be taken from any layout; SFT can train on the 'chosen' side of pairs.
ALLOWED_FORMATS = {
    "pairs": PAIR_FORMATS,
    "prompts": FORMATS,
    "sft": ("sft", "messages") + PAIR_FORMATS,
}


@dataclass
class LoadStats:
    """Counts written to the manifest and printed: rows read, kept, and dropped per reason."""

    source: str
    format: str
    read: int
    kept: int
    dropped: dict[str, int]


class Row(dict):
    """A normalised row plus `origin`, the (file label, row number) errors name, and `conversational`: whether
    the data gave it as a conversation (message lists, or HH turns) rather than plain strings, which decides
    whether it gets a chat template (chat.py). Equal to the plain dict."""

    __slots__ = ("origin", "conversational")

    def __init__(self, values: dict, origin: tuple[str, int], conversational: bool):
        super().__init__(values)
        self.origin, self.conversational = origin, conversational


def is_conversational(row: dict) -> bool:
    """Whether a row is a conversation; a plain dict of messages (not read by load_source) is one."""
    return getattr(row, "conversational", True)


class _Fields:
    """One row seen through the column renames (*_key arguments); `conversational` once a list was read."""

    def __init__(self, row: dict, keys: dict[str, str]):
        self.row, self.keys = row, keys
        self.conversational = False

    def name(self, key: str) -> str:
        return self.keys[key]

    def value(self, key: str):
        name = self.keys[key]
        value = self.row.get(name)
        # Arrow-backed files fill absent keys with null, so both read as missing.
        if value is None:
            raise RowError(name, "missing", "missing" if name not in self.row else "missing (null)")
        self.conversational = self.conversational or isinstance(value, list)
        return value


# --------------------------------------------------------------------------- messages


# JSON's \\uXXXX escapes can spell half of a surrogate pair: Python's json accepts it, but it is not a
# character, and tokenizers refuse it (TypeError) long after loading.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: str, name: str, what: str = "") -> str:
    found = _SURROGATE.search(value)
    if found:
        raise RowError(name, "invalid_unicode", f"{what}contains the lone surrogate \\u{ord(found.group()):04x} "
                        "(half of a UTF-16 pair), which is not a character")
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(name, "wrong_type", f"expected a string, got {kind_of(value)}")
    if not value.strip():
        raise RowError(name, "empty", "empty")
    return _check_text(value, name)


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(name, "wrong_type", f"expected a list of messages, got {kind_of(value)}")
    if not value:
        raise RowError(name, "empty", "no messages")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise RowError(name, "bad_message", f"message {i}: expected an object, got {kind_of(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role)[:40] if isinstance(role, str) else kind_of(role)
            raise RowError(name, "bad_role", f"message {i}: role {shown} is not one of system, user, assistant")
        if not isinstance(content, str):
            raise RowError(name, "bad_message", f"message {i}: content must be a string, got {kind_of(content)}")
        # An empty system prompt is common in exported chats and harmless.
        if role != "system" and not content.strip():
            raise RowError(name, "empty", f"message {i}: empty content")
        _check_text(content, name, f"message {i}: ")
        out.append({"role": role, "content": content})
    return out


def _as_prompt(messages: list[dict], name: str) -> list[dict]:
    if not messages or messages[-1]["role"] != "user":
        raise RowError(name, "bad_conversation", "the prompt must end with a user turn")
    return messages


def _split_last(messages: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """A full conversation -> (prompt, [final assistant message])."""
    if messages[-1]["role"] != "assistant":
        raise RowError(name, "no_assistant_turn", "the conversation does not end with an assistant turn")
    return _as_prompt(messages[:-1], name), messages[-1:]


def _prompt_field(r: _Fields, key: str = "prompt") -> list[dict]:
    value, name = r.value(key), r.name(key)
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, name)}]
    if isinstance(value, list):
        return _as_prompt(_messages(value, name), name)
    raise RowError(name, "wrong_type", f"expected a string or a list of messages, got {kind_of(value)}")


def _response_field(r: _Fields, key: str) -> list[dict]:
    value, name = r.value(key), r.name(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, name)}]
    if not isinstance(value, list):
        raise RowError(name, "wrong_type", f"expected a string or a list of messages, got {kind_of(value)}")
    messages = _messages(value, name)
    for i, message in enumerate(messages, start=1):
        if message["role"] != "assistant":
            raise RowError(name, "bad_role", f"message {i}: a response must have role 'assistant', got {message['role']!r}")
    return messages


# --------------------------------------------------------------------------- formats


def _pair(r: _Fields, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    if chosen == rejected:
        raise RowError(r.name("rejected"), "identical", f"identical to {r.name('chosen')!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _same_prompt(r: _Fields, chosen_prompt: list[dict], rejected_prompt: list[dict]) -> list[dict]:
    if rejected_prompt != chosen_prompt:
        raise RowError(r.name("rejected"), "prompt_mismatch", f"the turns before the response differ from {r.name('chosen')!r}")
    return chosen_prompt


def _explicit(r: _Fields) -> dict:
    """standard and conversational: a prompt column plus response-only chosen/rejected."""
    return _pair(r, _prompt_field(r), _response_field(r, "chosen"), _response_field(r, "rejected"))


def _ultrafeedback(r: _Fields) -> dict:
    """A prompt column plus full conversations: the conversation must agree with the prompt."""
    prompt_value = r.value("prompt")
    chosen_prompt, chosen = _split_last(_messages(r.value("chosen"), r.name("chosen")), r.name("chosen"))
    rejected_prompt, rejected = _split_last(_messages(r.value("rejected"), r.name("rejected")), r.name("rejected"))
    if isinstance(prompt_value, str):
        matches = chosen_prompt[-1]["content"].strip() == _text(prompt_value, r.name("prompt")).strip()
    else:
        matches = _prompt_field(r) == chosen_prompt
    if not matches:
        raise RowError(r.name("chosen"), "prompt_mismatch", f"the conversation does not match {r.name('prompt')!r}")
    return _pair(r, _same_prompt(r, chosen_prompt, rejected_prompt), chosen, rejected)


def _implicit(r: _Fields) -> dict:
    """Full conversations without a prompt column: the longest shared prefix is the prompt."""
    chosen = _messages(r.value("chosen"), r.name("chosen"))
    rejected = _messages(r.value("rejected"), r.name("rejected"))
    if chosen == rejected:
        raise RowError(r.name("rejected"), "identical", f"identical to {r.name('chosen')!r}")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[n:]
        if len(rest) != 1:
            problem = f"expected one assistant turn after the shared prompt, found {len(rest)} turns"
            raise RowError(r.name(key), "bad_conversation", problem)
        if rest[0]["role"] != "assistant":
            raise RowError(r.name(key), "no_assistant_turn", "the conversation does not end with an assistant turn")
    return _pair(r, _as_prompt(chosen[:n], r.name("chosen")), chosen[n:], rejected[n:])


# Turn markers of Anthropic HH text; the first turn may lack the leading blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(value, name: str) -> list[dict]:
    parts = _HH_TURN.split(_text(value, name))
    if len(parts) < 3 or parts[0].strip():
        raise RowError(name, "bad_conversation", "expected text of the form '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    # The space after 'Human:'/'Assistant:' and the blank lines are separators, not content.
    turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
             for role, text in zip(parts[1::2], parts[2::2])]
    return _messages(turns, name)


def _hh(r: _Fields) -> dict:
    chosen_prompt, chosen = _split_last(_hh_turns(r.value("chosen"), r.name("chosen")), r.name("chosen"))
    rejected_prompt, rejected = _split_last(_hh_turns(r.value("rejected"), r.name("rejected")), r.name("rejected"))
    return _pair(r, _same_prompt(r, chosen_prompt, rejected_prompt), chosen, rejected)


def _prompt_only(r: _Fields) -> dict:
    return {"prompt": _prompt_field(r)}


def _sft(r: _Fields) -> dict:
    return {"prompt": _prompt_field(r), "response": _response_field(r, "response")}


def _conversation(r: _Fields) -> dict:
    """A 'messages' column ending with the assistant turn that is the response."""
    name = r.name("messages")
    prompt, response = _split_last(_messages(r.value("messages"), name), name)
    return {"prompt": prompt, "response": response}


def _conversation_prompt(r: _Fields) -> dict:
    name = r.name("messages")
    messages = _messages(r.value("messages"), name)
    # For generation the reference answer, if present, is not part of the prompt.
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"prompt": _as_prompt(messages, name)}


_NORMALISERS: dict[str, Callable[[_Fields], dict]] = {
    "standard": _explicit, "conversational": _explicit, "ultrafeedback": _ultrafeedback,
    "implicit": _implicit, "hh": _hh, "prompt": _prompt_only, "messages": _conversation, "sft": _sft,
}


def _normalise(r: _Fields, data_format: str, kind: str) -> dict:
    if data_format == "messages" and kind == "prompts":
        return _conversation_prompt(r)
    row = _NORMALISERS[data_format](r)
    if kind == "prompts":
        return {"prompt": row["prompt"]}
    if kind == "sft" and "chosen" in row:
        return {"prompt": row["prompt"], "response": row["chosen"]}
    return row


def _has_user_turn(value) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") == "user" for m in value)


def detect_format(columns: list[str], first_row: dict, kind: str, found: list[str] | None = None) -> str:
    """The layout of data with these (canonical) column names, judged from the first row.

    Raises UserError when no layout fits the columns, naming found (every column of the data; default: columns).
    """
    cols = set(columns)
    if kind == "sft" and "messages" in cols:
        return "messages"
    if kind == "sft" and {"prompt", "response"} <= cols:
        return "sft"
    # An ultrafeedback-style prompt column holds only the last user turn; the
    # conversations hold the earlier turns too, so they are read instead.
    if kind == "prompts" and "prompt" in cols and not _has_user_turn(first_row.get("chosen")):
        return "prompt"
    if kind == "prompts" and "messages" in cols:
        return "messages"
    if {"chosen", "rejected"} <= cols:
        chosen, prompt = first_row.get("chosen"), first_row.get("prompt")
        if "prompt" not in cols:
            return "implicit" if isinstance(chosen, list) else "hh"
        if _has_user_turn(chosen):
            return "ultrafeedback"
        return "standard" if isinstance(prompt, str) and isinstance(chosen, str) else "conversational"
    raise UserError(unknown_layout(kind, columns if found is None else found))


# What each layout reads, as the error for data that fits none of them lists it.
LAYOUT_COLUMNS = {
    "standard": "prompt, chosen, rejected strings",
    "conversational": "prompt, chosen, rejected message lists",
    "ultrafeedback": "prompt; chosen, rejected whole conversations",
    "implicit": "chosen, rejected conversations sharing their prompt turns",
    "hh": "chosen, rejected 'Human: ... Assistant: ...' text",
    "prompt": "prompt",
    "messages": "messages",
    "sft": "prompt, response",
}
# Columns named in that error; a table with thousands of columns (a wide CSV) is cut there.
SHOWN_COLUMNS = 20


def unknown_layout(kind: str, found: list[str]) -> str:
    """The one-line error for data whose columns fit no layout: every column found (up to SHOWN_COLUMNS), the
    layouts that hold this kind with their columns, and the options that rename columns or pick a layout."""
    names = ", ".join(shown(str(c), 40) for c in found[:SHOWN_COLUMNS]) or "none"
    if len(found) > SHOWN_COLUMNS:
        names += f" and {len(found) - SHOWN_COLUMNS} more"
    layouts = "; ".join(f"{f} ({LAYOUT_COLUMNS[f]})" for f in ALLOWED_FORMATS.get(kind, FORMATS))
    return (f"cannot tell the {kind} data format from the columns {names}; the {kind} layouts: {layouts}; "
            "name the columns that hold them with --prompt-key/--chosen-key/--rejected-key/--messages-key COLUMN, "
            "or pick a layout with --data-format")


def flatten_plain(messages: list[dict]) -> str:
    """Text for a tokenizer without a chat template: the message contents joined with "\\n".

    Roles are dropped and empty contents (an empty system prompt) skipped, so a
    single-turn prompt or response flattens to exactly its original string.
    """
    return "\n".join(m["content"] for m in messages if m["content"])


def _choose_format(tables: list[Table], keys: dict[str, str], kind: str, data_format: str) -> str:
    if data_format == "auto":
        # The first readable row decides; the error names it, since its columns are the ones shown.
        table, number, first = next((t, n, r) for t in tables for n, r in t.rows if isinstance(r, dict))
        columns = [key for key, name in keys.items() if any(name in t.columns for t in tables)]
        found = list(dict.fromkeys(c for t in tables for c in t.columns))
        try:
            data_format = detect_format(columns, {key: first.get(name) for key, name in keys.items()}, kind, found)
        except UserError as e:
            raise UserError(f"{where(table.label, number)}: {e}") from None
    if data_format not in ALLOWED_FORMATS[kind]:
        raise UserError(f"data format {data_format!r} does not hold {kind}; use one of {', '.join(ALLOWED_FORMATS[kind])}")
    return data_format


def load_source(data: str, *, kind: str, split: str = "train", subset: str | None = None, data_format: str = "auto",
                prompt_key: str | None = None, chosen_key: str | None = None, rejected_key: str | None = None,
                messages_key: str | None = None, skip_bad_rows: bool = False) -> tuple[list[Row], LoadStats]:
    """Rows of `data` (a local file or directory, or a hub dataset id) in the internal form.

    kind is "pairs", "prompts" or "sft". A bad row raises a one-line UserError naming
    the file, row and field, or with skip_bad_rows is dropped and counted by reason.
    `split` and `subset` apply to hub datasets only.
    """
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if data_format != "auto" and data_format not in FORMATS:
        raise UserError(f"unknown data format {data_format!r}; expected auto or one of {', '.join(FORMATS)}")
    keys = {"prompt": prompt_key or "prompt", "chosen": chosen_key or "chosen", "rejected": rejected_key or "rejected",
            "messages": messages_key or "messages", "response": "response"}
    tables = read_tables(str(data), split, subset)
    if not any(t.rows for t in tables):
        raise UserError(f"data {data} has no rows")
    if any(isinstance(row, dict) for t in tables for _, row in t.rows):
        data_format = _choose_format(tables, keys, kind, data_format)
    rows, dropped, read = [], Counter(), 0
    for table in tables:
        for number, row in table.rows:
            read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                fields = _Fields(row, keys)
                values = _normalise(fields, data_format, kind)
                # HH text marks its turns (Human:/Assistant:), which are parsed into messages: a conversation.
                rows.append(Row(values, (table.label, number), fields.conversational or data_format == "hh"))
            except RowError as e:
                if not skip_bad_rows:
                    raise UserError(f"{where(table.label, number, e.field)}: {e.problem}") from None
                dropped[e.reason] += 1
    if not rows:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items()))
        raise UserError(f"data {data}: all {read} rows were dropped ({reasons})")
    return rows, LoadStats(str(data), data_format, read, len(rows), dict(sorted(dropped.items())))
