"""User-facing errors: each becomes one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import reprlib


class UserError(Exception):
    """Bad input from the user (file, row, field, value). Exit code 1."""

    exit_code = 1


class UsageError(UserError):
    """Bad command-line usage or configuration keys. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value or key is invalid; the message names the field."""


def where(path, row: int | None = None, field: str | None = None) -> str:
    """'file.jsonl, row 12, field "chosen"' — the prefix every data error carries."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def shown(value, limit: int = 100) -> str:
    """A value as an error message shows it: repr, cut short without rendering the rest (a huge or deeply
    shared structure costs no more than a small one)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
