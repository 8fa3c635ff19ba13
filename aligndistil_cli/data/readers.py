"""Read data files (and hub splits) into tables of (row number, raw row), before any normalisation.

Row numbers are the line number for .jsonl (what an editor shows, blank lines counted)
and the 1-based record index for a .json array, .parquet, .csv (header not counted) and
hub data.

JSON files are read here, line by line, rather than through `datasets`: a line that is
not valid UTF-8 or not valid JSON is then one bad row (a RowError in its table, which
skip_bad_rows can drop), and a byte-order mark at the start of a file (Windows exports)
is accepted.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from aligndistil_cli.core.errors import UserError, where
from aligndistil_cli.rundir.hub import datasets_offline, looks_like_path

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class RowError(Exception):
    """A problem with one row: `field` is the column name as it appears in the data (None: the whole line)."""

    def __init__(self, field: str | None, reason: str, problem: str):
        super().__init__(problem)
        self.field, self.reason, self.problem = field, reason, problem


BOM = b"\xef\xbb\xbf"


def _parse_line(raw: bytes) -> dict | RowError | None:
    """One JSONL line as an object, a RowError saying why it is not one, or None when it is blank."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(None, "invalid_utf8", f"not valid UTF-8 (byte {e.start + 1} of the line)")
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except RecursionError:
        return RowError(None, "invalid_json", "invalid JSON (nested too deeply)")
    # JSONDecodeError, and ValueError for integers longer than Python's digit limit.
    except ValueError as e:
        return RowError(None, "invalid_json", f"invalid JSON ({getattr(e, 'msg', None) or str(e).splitlines()[0]})")
    if not isinstance(row, dict):
        return RowError(None, "not_an_object", f"expected a JSON object, got {kind_of(row)}")
    return row


def jsonl_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    """(line number, object or the RowError of an unreadable line) for every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = _parse_line(raw[len(BOM):] if lineno == 1 and raw.startswith(BOM) else raw)
            if record is not None:
                yield lineno, record


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; the first unreadable line is a UserError."""
    for lineno, record in jsonl_records(path):
        if isinstance(record, RowError):
            raise UserError(f"{where(path, lineno)}: {record.problem}")
        yield lineno, record


def _json_records(path: Path) -> list[tuple[int, dict | RowError]]:
    """A .json file: an array of records (numbered from 1), one object, or JSON Lines under a .json name."""
    raw = path.read_bytes()
    raw = raw[len(BOM):] if raw.startswith(BOM) else raw
    if not raw.lstrip().startswith(b"["):
        try:
            whole = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not one document: JSON Lines
            return list(jsonl_records(path))
        return [(1, whole if isinstance(whole, dict) else
                 RowError(None, "not_an_object", f"expected a JSON object, got {kind_of(whole)}"))]
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
    return [(i, r if isinstance(r, dict) else RowError(None, "not_an_object", f"expected a JSON object, got {kind_of(r)}"))
            for i, r in enumerate(records, start=1)]


def kind_of(value) -> str:
    """JSON-style type names, since users think of their data as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


@dataclass
class Table:
    label: str  # names the file (or hub split) in errors
    columns: list[str]
    rows: list[tuple[int, dict | RowError]]  # (row number shown to the user, row or why it is unreadable)

    @classmethod
    def of(cls, label: str, rows: list[tuple[int, dict | RowError]]) -> "Table":
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


def read_file(path: Path) -> Table:
    # JSON is read directly rather than via Arrow: Arrow would fill absent keys with null, reject
    # mixed-type columns and stop at the first undecodable line, before a row-level error could
    # name the row and field or skip_bad_rows could drop it.
    if path.suffix.lower() == ".jsonl":
        return Table.of(str(path), list(jsonl_records(path)))
    if path.suffix.lower() == ".json":
        return Table.of(str(path), _json_records(path))
    builder = BUILDERS[path.suffix.lower()]
    ds = _call_datasets(str(path), lambda d: d.load_dataset(
        builder, data_files=str(path), split="train", **(_csv_options(d, path) if builder == "csv" else {})))
    return Table(str(path), list(ds.column_names), list(enumerate(ds.to_list(), start=1)))


def _read_hub(data: str, split: str, subset: str | None) -> Table:
    label = f"{data} ({'subset ' + subset + ', ' if subset else ''}split {split})"
    try:
        ds = _call_datasets(label, lambda d: d.load_dataset(data, subset, split=split))
    except UserError as e:
        if not (datasets_offline() and "not cached" in str(e)):
            raise
        # datasets' own words end "is not cached in None" (the cache directory it was not given).
        raise UserError(f"{label}: not in the local datasets cache, and the Hub may not be asked (HF_HUB_OFFLINE or "
                        "HF_DATASETS_OFFLINE is set); load it once online, or give a local file") from None
    return Table(label, list(ds.column_names), list(enumerate(ds.to_list(), start=1)))


def _looks_local(data: str, path: Path) -> bool:
    # Hub ids are "name" or "owner/name": never a suffix like .jsonl, never a path (hub.looks_like_path).
    return path.exists() or path.suffix.lower() in BUILDERS or looks_like_path(data)


def read_tables(data: str, split: str, subset: str | None) -> list[Table]:
    path = Path(data).expanduser()
    if not _looks_local(data, path):
        return [_read_hub(data, split, subset)]
    if path.is_dir():
        return [read_file(p) for p in data_files(path)]
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.suffix.lower() not in BUILDERS:
        raise UserError(f"data file {path}: unsupported file type; expected .jsonl, .json, .parquet or .csv")
    return [read_file(path)]


def data_files(directory: Path) -> list[Path]:
    """The data files of a directory and its subdirectories, by relative path; hidden entries are skipped."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise UserError(f"data directory {directory} has no .jsonl, .json, .parquet or .csv files")
    return files
