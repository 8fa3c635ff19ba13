"""Load preference, prompt and SFT data in the common public layouts and normalise it.

Every row becomes chat messages ({"role": "system"|"user"|"assistant", "content": str}):

- pairs:   {"prompt": [...], "chosen": [...], "rejected": [...]}
- prompts: {"prompt": [...]}
- sft:     {"prompt": [...], "response": [...]}

The prompt is the conversation up to the final assistant turn (earlier turns of a
multi-turn conversation stay in it) and always ends with a user turn; responses are
assistant messages. Messages keep only role and content.

Row numbers in errors are the line number for .jsonl (what an editor shows, blank lines
counted) and the 1-based record index for a .json array, .parquet, .csv (header not
counted) and hub data. Each normalised row is a Row that remembers its file and row
number, so that later failures (tokenisation, chat template) name them too.

JSON files are read here, line by line, rather than through `datasets`: a line that is
not valid UTF-8 or not valid JSON is then one bad row (skippable with skip_bad_rows),
and a byte-order mark at the start of a file (Windows exports) is accepted.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, where

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
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class LoadStats:
    """Counts written to the manifest and printed: rows read, kept, and dropped per reason."""

    source: str
    format: str
    read: int
    kept: int
    dropped: dict[str, int]


class _RowError(Exception):
    """A problem with one row: `field` is the column name as it appears in the data (None: the whole line)."""

    def __init__(self, field: str | None, reason: str, problem: str):
        super().__init__(problem)
        self.field, self.reason, self.problem = field, reason, problem


class Row(dict):
    """A normalised row plus `origin`, the (file label, row number) errors name. Equal to the plain dict."""

    __slots__ = ("origin",)

    def __init__(self, values: dict, origin: tuple[str, int]):
        super().__init__(values)
        self.origin = origin


BOM = b"\xef\xbb\xbf"


def _parse_line(raw: bytes) -> dict | _RowError | None:
    """One JSONL line as an object, a _RowError saying why it is not one, or None when it is blank."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _RowError(None, "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the line)")
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except RecursionError:
        return _RowError(None, "invalid_json", "invalid JSON (nested too deeply)")
    # JSONDecodeError, and ValueError for integers longer than Python's digit limit.
    except ValueError as e:
        return _RowError(None, "invalid_json", f"invalid JSON ({getattr(e, 'msg', None) or str(e).splitlines()[0]})")
    if not isinstance(row, dict):
        return _RowError(None, "not_an_object", f"expected a JSON object, got {_kind_of(row)}")
    return row


def jsonl_records(path: Path) -> Iterator[tuple[int, dict | _RowError]]:
    """(line number, object or the _RowError of an unreadable line) for every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = _parse_line(raw[len(BOM):] if lineno == 1 and raw.startswith(BOM) else raw)
            if record is not None:
                yield lineno, record


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; the first unreadable line is a UserError."""
    for lineno, record in jsonl_records(path):
        if isinstance(record, _RowError):
            raise UserError(f"{where(path, lineno)}: {record.problem}")
        yield lineno, record


def _json_records(path: Path) -> list[tuple[int, dict | _RowError]]:
    """A .json file: an array of records (numbered from 1), one object, or JSON Lines under a .json name."""
    raw = path.read_bytes()
    raw = raw[len(BOM):] if raw.startswith(BOM) else raw
    if not raw.lstrip().startswith(b"["):
        try:
            whole = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not one document: JSON Lines
            return list(jsonl_records(path))
        return [(1, whole if isinstance(whole, dict) else
                 _RowError(None, "not_an_object", f"expected a JSON object, got {_kind_of(whole)}"))]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}, line {line}: not valid UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    return [(i, r if isinstance(r, dict) else _RowError(None, "not_an_object", f"expected a JSON object, got {_kind_of(r)}"))
            for i, r in enumerate(records, start=1)]

def _kind_of(value) -> str:
    """JSON-style type names, since users think of their data as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


class _Fields:
    """One row seen through the column renames (*_key arguments)."""

    def __init__(self, row: dict, keys: dict[str, str]):
        self.row, self.keys = row, keys

    def name(self, key: str) -> str:
        return self.keys[key]

    def value(self, key: str):
        name = self.keys[key]
        value = self.row.get(name)
        # Arrow-backed files fill absent keys with null, so both read as missing.
        if value is None:
            raise _RowError(name, "missing", "missing" if name not in self.row else "missing (null)")
        return value


# --------------------------------------------------------------------------- messages


# JSON's \\uXXXX escapes can spell half of a surrogate pair: Python's json accepts it, but it is not a
# character, and tokenizers refuse it (TypeError) long after loading.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: str, name: str, what: str = "") -> str:
    found = _SURROGATE.search(value)
    if found:
        raise _RowError(name, "invalid_unicode", f"{what}contains the lone surrogate \\u{ord(found.group()):04x} "
                        "(half of a UTF-16 pair), which is not a character")
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(name, "wrong_type", f"expected a string, got {_kind_of(value)}")
    if not value.strip():
        raise _RowError(name, "empty", "empty")
    return _check_text(value, name)


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError(name, "wrong_type", f"expected a list of messages, got {_kind_of(value)}")
    if not value:
        raise _RowError(name, "empty", "no messages")
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise _RowError(name, "bad_message", f"message {i}: expected an object, got {_kind_of(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role)[:40] if isinstance(role, str) else _kind_of(role)
            raise _RowError(name, "bad_role", f"message {i}: role {shown} is not one of system, user, assistant")
        if not isinstance(content, str):
            raise _RowError(name, "bad_message", f"message {i}: content must be a string, got {_kind_of(content)}")
        # An empty system prompt is common in exported chats and harmless.
        if role != "system" and not content.strip():
            raise _RowError(name, "empty", f"message {i}: empty content")
        _check_text(content, name, f"message {i}: ")
        out.append({"role": role, "content": content})
    return out


def _as_prompt(messages: list[dict], name: str) -> list[dict]:
    if not messages or messages[-1]["role"] != "user":
        raise _RowError(name, "bad_conversation", "the prompt must end with a user turn")
    return messages


def _split_last(messages: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """A full conversation -> (prompt, [final assistant message])."""
    if messages[-1]["role"] != "assistant":
        raise _RowError(name, "no_assistant_turn", "the conversation does not end with an assistant turn")
    return _as_prompt(messages[:-1], name), messages[-1:]


def _prompt_field(r: _Fields, key: str = "prompt") -> list[dict]:
    value, name = r.value(key), r.name(key)
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, name)}]
    if isinstance(value, list):
        return _as_prompt(_messages(value, name), name)
    raise _RowError(name, "wrong_type", f"expected a string or a list of messages, got {_kind_of(value)}")


def _response_field(r: _Fields, key: str) -> list[dict]:
    value, name = r.value(key), r.name(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, name)}]
    if not isinstance(value, list):
        raise _RowError(name, "wrong_type", f"expected a string or a list of messages, got {_kind_of(value)}")
    messages = _messages(value, name)
    for i, message in enumerate(messages, start=1):
        if message["role"] != "assistant":
            raise _RowError(name, "bad_role", f"message {i}: a response must have role 'assistant', got {message['role']!r}")
    return messages


# --------------------------------------------------------------------------- formats


def _pair(r: _Fields, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    if chosen == rejected:
        raise _RowError(r.name("rejected"), "identical", f"identical to {r.name('chosen')!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _same_prompt(r: _Fields, chosen_prompt: list[dict], rejected_prompt: list[dict]) -> list[dict]:
    if rejected_prompt != chosen_prompt:
        raise _RowError(r.name("rejected"), "prompt_mismatch", f"the turns before the response differ from {r.name('chosen')!r}")
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
        raise _RowError(r.name("chosen"), "prompt_mismatch", f"the conversation does not match {r.name('prompt')!r}")
    return _pair(r, _same_prompt(r, chosen_prompt, rejected_prompt), chosen, rejected)


def _implicit(r: _Fields) -> dict:
    """Full conversations without a prompt column: the longest shared prefix is the prompt."""
    chosen = _messages(r.value("chosen"), r.name("chosen"))
    rejected = _messages(r.value("rejected"), r.name("rejected"))
    if chosen == rejected:
        raise _RowError(r.name("rejected"), "identical", f"identical to {r.name('chosen')!r}")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[n:]
        if len(rest) != 1:
            problem = f"expected one assistant turn after the shared prompt, found {len(rest)} turns"
            raise _RowError(r.name(key), "bad_conversation", problem)
        if rest[0]["role"] != "assistant":
            raise _RowError(r.name(key), "no_assistant_turn", "the conversation does not end with an assistant turn")
    return _pair(r, _as_prompt(chosen[:n], r.name("chosen")), chosen[n:], rejected[n:])


# Turn markers of Anthropic HH text; the first turn may lack the leading blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(value, name: str) -> list[dict]:
    parts = _HH_TURN.split(_text(value, name))
    if len(parts) < 3 or parts[0].strip():
        raise _RowError(name, "bad_conversation", "expected text of the form '\\n\\nHuman: ...\\n\\nAssistant: ...'")
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


def detect_format(columns: list[str], first_row: dict, kind: str) -> str:
    """The layout of data with these (canonical) column names, judged from the first row.

    Raises UserError when no layout fits the columns.
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
    raise UserError(
        f"cannot tell the {kind} data format from the columns {sorted(cols)}; "
        f"rename columns with the *-key options or choose one of {', '.join(ALLOWED_FORMATS.get(kind, FORMATS))} with --data-format"
    )


def flatten_plain(messages: list[dict]) -> str:
    """Text for a tokenizer without a chat template: the message contents joined with "\\n".

    Roles are dropped and empty contents (an empty system prompt) skipped, so a
    single-turn prompt or response flattens to exactly its original string.
    """
    return "\n".join(m["content"] for m in messages if m["content"])


# --------------------------------------------------------------------------- reading


@dataclass
class _Table:
    label: str  # names the file (or hub split) in errors
    columns: list[str]
    rows: list[tuple[int, dict | _RowError]]  # (row number shown to the user, row or why it is unreadable)

    @classmethod
    def of(cls, label: str, rows: list[tuple[int, dict | _RowError]]) -> "_Table":
        columns = dict.fromkeys(key for _, row in rows if isinstance(row, dict) for key in row)
        return cls(label, list(columns), rows)


def _first_lines(error: BaseException) -> str:
    """The outermost and innermost messages of an exception chain, one line each."""
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(nxt)
    lines = []
    for e in (chain[0], chain[-1]):
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if text not in lines:
            lines.append(text)
    return "; ".join(lines)


def _call_datasets(what: str, load: Callable):
    import datasets

    datasets.disable_progress_bars()
    # datasets also logs (at ERROR) the failure it raises: the UserError below is the one line the user sees.
    library_logger = logging.getLogger("datasets")
    level = library_logger.level
    library_logger.setLevel(logging.CRITICAL)
    try:
        return load(datasets)
    # datasets/pyarrow raise many exception types for bad input; all become one line.
    except Exception as e:
        raise UserError(f"{what}: could not be loaded ({_first_lines(e)})") from None
    finally:
        library_logger.setLevel(level)


def _csv_options(datasets, path: Path) -> dict:
    """Every column as text: pandas would read a column of "4"s as numbers and "NA" as null."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise UserError(f"{path}, line 1: not valid UTF-8") from None
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "encoding": "utf-8-sig"}


def _read_file(path: Path) -> _Table:
    # JSON is read directly rather than via Arrow: Arrow would fill absent keys with null, reject
    # mixed-type columns and stop at the first undecodable line, before a row-level error could
    # name the row and field or skip_bad_rows could drop it.
    if path.suffix.lower() == ".jsonl":
        return _Table.of(str(path), list(jsonl_records(path)))
    if path.suffix.lower() == ".json":
        return _Table.of(str(path), _json_records(path))
    builder = BUILDERS[path.suffix.lower()]
    ds = _call_datasets(str(path), lambda d: d.load_dataset(
        builder, data_files=str(path), split="train", **(_csv_options(d, path) if builder == "csv" else {})))
    return _Table(str(path), list(ds.column_names), list(enumerate(ds.to_list(), start=1)))


def _read_hub(data: str, split: str, subset: str | None) -> _Table:
    label = f"{data} ({'subset ' + subset + ', ' if subset else ''}split {split})"
    ds = _call_datasets(label, lambda d: d.load_dataset(data, subset, split=split))
    return _Table(label, list(ds.column_names), list(enumerate(ds.to_list(), start=1)))


def _looks_local(data: str, path: Path) -> bool:
    # Hub ids are "name" or "owner/name": never a suffix like .jsonl, never ./ or /.
    return path.exists() or path.suffix.lower() in BUILDERS or data.startswith((".", "/", "~"))


def _read(data: str, split: str, subset: str | None) -> list[_Table]:
    path = Path(data).expanduser()
    if not _looks_local(data, path):
        return [_read_hub(data, split, subset)]
    if path.is_dir():
        return [_read_file(p) for p in data_files(path)]
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.suffix.lower() not in BUILDERS:
        raise UserError(f"data file {path}: unsupported file type; expected .jsonl, .json, .parquet or .csv")
    return [_read_file(path)]


def data_files(directory: Path) -> list[Path]:
    """The data files of a directory and its subdirectories, by relative path; hidden entries are skipped."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise UserError(f"data directory {directory} has no .jsonl, .json, .parquet or .csv files")
    return files


def _choose_format(tables: list[_Table], keys: dict[str, str], kind: str, data_format: str) -> str:
    if data_format == "auto":
        # The first readable row decides; the error names it, since its columns are the ones shown.
        table, number, first = next((t, n, r) for t in tables for n, r in t.rows if isinstance(r, dict))
        columns = [key for key, name in keys.items() if any(name in t.columns for t in tables)]
        try:
            data_format = detect_format(columns, {key: first.get(name) for key, name in keys.items()}, kind)
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
    tables = _read(str(data), split, subset)
    if not any(t.rows for t in tables):
        raise UserError(f"data {data} has no rows")
    if any(isinstance(row, dict) for t in tables for _, row in t.rows):
        data_format = _choose_format(tables, keys, kind, data_format)
    rows, dropped, read = [], Counter(), 0
    for table in tables:
        for number, row in table.rows:
            read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                rows.append(Row(_normalise(_Fields(row, keys), data_format, kind), (table.label, number)))
            except _RowError as e:
                if not skip_bad_rows:
                    raise UserError(f"{where(table.label, number, e.field)}: {e.problem}") from None
                dropped[e.reason] += 1
    if not rows:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items()))
        raise UserError(f"data {data}: all {read} rows were dropped ({reasons})")
    return rows, LoadStats(str(data), data_format, read, len(rows), dict(sorted(dropped.items())))
