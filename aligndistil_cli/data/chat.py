"""--chat-template: which rows are rendered with a chat template, and with which one, as TRL does it.

- auto (the default): conversational rows (message lists, role/content dicts, Anthropic HH turns) get the
  tokenizer's chat template; rows of plain strings stay plain text: the prompt with the tokenizer's special
  tokens (BOS), the response after it, then EOS. This is what TRL's trainers do with the "standard" and
  "conversational" formats.
- always: string rows are templated too, the prompt as a user turn and the response as the assistant's.
- never: no template. Conversational rows are read as plain text, their contents joined by newlines (roles
  dropped), and a warning counts them: the boolean `chat_template: false` of earlier versions did this, and a
  pipeline that set it keeps working.
- FILE: a Jinja template file used instead of the tokenizer's (TRL's chat_template_path), for the rows auto
  templates: conversational rows; string rows stay plain text. It is not saved into the trained model's
  tokenizer, so give it to every stage that reads the data.

A conversational row under auto whose tokenizer has no chat template is read as plain text, as under never,
with the same warning. In a YAML file `chat_template: true` means auto and `false` means never.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aligndistil_cli.core.console import say
from aligndistil_cli.core.errors import ConfigError, UserError, shown

MODES = ("auto", "always", "never")
# The YAML booleans of earlier versions, as the string field reads them (str(True) is "True").
_BOOLEANS = {"true": "auto", "false": "never"}


def mode_of(value) -> str:
    """auto, always, never, or a template file's path."""
    text = str(value)
    return _BOOLEANS.get(text.lower(), text)


def check(value) -> None:
    """Refuse, in one line (a usage error), a --chat-template that is neither a mode nor an existing file."""
    mode = mode_of(value)
    if mode not in MODES and not Path(mode).expanduser().is_file():
        raise ConfigError(f"config field 'chat_template' must be auto, always, never or an existing Jinja template "
                          f"file; got {shown(value)}")


@dataclass(frozen=True)
class ChatTemplate:
    """--chat-template resolved against one tokenizer."""

    mode: str  # auto, always, never, or file
    text: str | None  # the Jinja template rows are rendered with (FILE's, else the tokenizer's); None: it has none
    file: str | None = None
    sha256: str | None = None  # of FILE's bytes

    def for_row(self, conversational: bool) -> str | None:
        """The template a row is rendered with, or None: plain text."""
        if self.mode == "never" or not (conversational or self.mode == "always"):
            return None
        return self.text

    def record(self, stats: dict, rendered: Counter) -> None:
        """Into stats (the manifest's data section): the mode, FILE and its hash, and the rows rendered with a
        template; and a warning for the conversational rows read as plain text. rendered counts the kept rows
        as templated, plain_conversations and plain."""
        stats.update({"chat_template_used": rendered["templated"] > 0, "chat_template_mode": self.mode,
                      **({"chat_template_file": self.file, "chat_template_sha256": self.sha256} if self.file else {}),
                      "templated_rows": rendered["templated"]})
        if rendered["plain_conversations"]:
            why = ("--chat-template never" if self.mode == "never"
                   else "the tokenizer has no chat template; --chat-template FILE gives one")
            say(f"warning: data {stats.get('source')}: {rendered['plain_conversations']} conversational rows read "
                f"as plain text, their messages joined by newlines without their roles ({why})")


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own chat template; of a set of named ones, the one called default."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def resolve(tokenizer, value) -> ChatTemplate:
    """value (a config's chat_template) for this tokenizer; always without any template is refused."""
    mode = mode_of(value)
    if mode in MODES:
        text = tokenizer_template(tokenizer)
        if mode == "always" and text is None:
            raise UserError(f"--chat-template always: the tokenizer of {tokenizer.name_or_path} has no chat template; "
                            "pass a Jinja template file instead (--chat-template FILE)")
        return ChatTemplate(mode, text)
    check(value)
    raw = Path(mode).expanduser().read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--chat-template {mode}: not UTF-8 text") from None
    return ChatTemplate("file", text, mode, hashlib.sha256(raw).hexdigest())


def setting(value) -> str | dict:
    """The chat template as a data fingerprint records it: the mode, or a file's path and content hash (an edited
    template reads the same data differently)."""
    mode = mode_of(value)
    if mode in MODES or not Path(mode).expanduser().is_file():
        return mode
    return {"file": mode, "sha256": hashlib.sha256(Path(mode).expanduser().read_bytes()).hexdigest()}
