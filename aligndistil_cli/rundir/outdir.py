"""Who owns an output directory: one marker file, which is also the directory's lock.

OUT/.aligndistil holds {"stage": ..., "pid": ...}. It is written when a stage
starts on OUT and stays there, so a directory we wrote is recognised even when
it has no manifest (a killed run), and a stage refuses a directory that holds
another stage's output or files we did not write. While a stage runs, it holds
an exclusive fcntl.flock on the marker: a second process on the same OUT is
refused with the holder's PID instead of deleting the first one's files.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
from pathlib import Path

from aligndistil_cli.core.errors import UserError

MARKER = ".aligndistil"
_held: dict[str, int] = {}

# The files each stage writes (fnmatch patterns on paths relative to OUT). A pattern
# without "/" matches top-level files only; "DIR/*" matches anything under DIR.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.*", "merges.txt", "*.model",
                "*.tiktoken", "*.py", "README.md")
# The model card's plots, which evaluate adds to each model it evaluated (card.py).
_TRAINED_MODEL = (*_MODEL_FILES, "metrics.jsonl", "evaluation/*")
STAGE_FILES = {
    "init-toy": ("sft.jsonl", "prompts.jsonl", "heldout_prompts.jsonl", "model/*"),
    "sft": _TRAINED_MODEL,
    "make-prefs": ("pairs.jsonl",),
    "train-dpo": _TRAINED_MODEL,
    "train-reverse-dpo": _TRAINED_MODEL,
    "precompute": ("index.json", "heads.safetensors", "shard-*.safetensors"),
    "distill": _TRAINED_MODEL,
    "evaluate": ("report.json", "report.md", "*.png", "exports/*"),
}
COMMON_FILES = ("manifest.json", "stage_config.json")


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(("/" in rel) == ("/" in p) and fnmatch.fnmatchcase(rel, p) for p in patterns)


def foreign_files(stage: str, names: list[str]) -> list[str]:
    """Those of names (relative paths) that stage never writes (none for a stage this version does not know)."""
    if stage not in STAGE_FILES:
        return []
    patterns = STAGE_FILES[stage] + COMMON_FILES
    return [n for n in names if not _matches(n, patterns)]


def owner(out: Path) -> str | None:
    """The stage that wrote out (from its marker, else from a manifest of an older version), or None."""
    for name in (MARKER, "manifest.json"):
        try:
            return json.loads((Path(out) / name).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def is_ours(path: Path) -> bool:
    """Written by aligndistil: the marker, or what older versions left (checkpoints, stage_config.json)."""
    path = Path(path)
    return (path / MARKER).is_file() or (path / "checkpoints").is_dir() or (path / "stage_config.json").is_file()


def _check_owner(out: Path, stage: str, force: bool) -> None:
    entries = sorted(p.name for p in out.iterdir() if p.name != MARKER) if out.is_dir() else []
    if not entries or force:
        return
    found = owner(out)
    if found == stage:
        return
    if found:
        raise UserError(f"{out} holds the output of stage {found}, not {stage}; choose another --out, "
                        "or pass --force to replace it")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(f"{out} is not empty ({shown}) and is not an earlier run of {stage}; choose another --out, "
                    "or pass --force to delete its contents")


def _lock(out: Path) -> int:
    key = os.path.realpath(out)
    if key in _held:  # this process already holds it (an earlier attempt that failed in-process)
        return _held[key]
    fd = os.open(out / MARKER, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = json.loads(os.pread(fd, 4096, 0) or b"{}").get("pid", "unknown")
        except ValueError:
            pid = "unknown"
        os.close(fd)
        raise UserError(f"{out} is in use by another aligndistil process (PID {pid}); wait for it to finish, "
                        "or choose another --out") from None
    _held[key] = fd
    return fd


def claim(out: Path, stage: str, force: bool = False, keep: tuple[str, ...] = ()) -> Path:
    """Make out the locked, marked output directory of stage.

    Refuses (unless force) a non-empty directory that is not an earlier run of
    stage. Then deletes everything in it except the entries matching keep (the
    scratch a rerun continues from); force keeps nothing.
    """
    out = Path(out)
    _check_owner(out, stage, force)
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out)
    _check_owner(out, stage, force)  # again, now that no other process can change it
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"stage": stage, "pid": os.getpid()}).encode(), 0)
    # The manifest goes first: a kill while clearing must not leave a "complete" directory behind.
    (out / "manifest.json").unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry.name == MARKER or (not force and any(fnmatch.fnmatchcase(entry.name, k) for k in keep)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return out


def release(out: Path) -> None:
    fd = _held.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)
