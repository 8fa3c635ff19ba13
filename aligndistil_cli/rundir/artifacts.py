"""Output directories, manifests, fingerprints and atomic writes.

A stage's output directory is complete exactly when its manifest.json says so.
The manifest is written last, atomically (write to a temporary file, fsync,
rename), so a crash at any point leaves a directory no stage will consume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import sha256_cached, sha256_file, sha256_json
from aligndistil_cli.rundir import outdir

MANIFEST = "manifest.json"
CONFIG_FILE = "stage_config.json"
MANIFEST_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(path: Path) -> None:
    """Give a file we wrote the mode any other tool would: 0666 less the umask. mkstemp, and the libraries that
    write through temporary files (safetensors, transformers' model.safetensors), leave 0600, which other users
    of a shared machine cannot read."""
    mode = 0o666 & ~_umask()
    if stat.S_IMODE(Path(path).stat().st_mode) != mode:  # a chmod changes the ctime, which voids remembered hashes
        os.chmod(path, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_OS_ERROR = re.compile(r"I/O error: (.*?) \(os error (\d+)\)")


@contextmanager
def writing(path: Path):
    """safetensors' write errors (its own exception type, not OSError) as one line naming path."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))
        if not found:
            raise
        if int(found.group(2)) == errno.ENOSPC:
            raise UserError(f"no space left on device (writing {path})") from None
        raise UserError(f"cannot write {path}: {found.group(1)}") from None


def finite_json(obj: Any) -> Any:
    """obj with every non-finite float as None: JSON has no Infinity or NaN, and strict readers refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_line(obj: Any) -> str:
    """One strict JSON line (a metrics.jsonl record)."""
    return json.dumps(finite_json(obj), sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    text = json.dumps(finite_json(obj), indent=2, sort_keys=sort_keys, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def check_output_dir(out: Path) -> Path:
    """Fail in one line, before a stage loads any data or model, when out/ cannot be created or written.

    Nothing is created: the nearest existing directory on the way (out itself, or the parent that
    mkdir would start from) gets a temporary file that is removed at once.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create output directory {out}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {existing} is not writable "
                        f"({(e.strerror or type(e).__name__).lower()})") from None
    return out


def prepare_output(out: Path, stage: str, force: bool = False, keep: tuple[str, ...] = ()) -> Path:
    """Lock out/ for stage and empty it (previous manifest first) before writing anything.

    A directory holding anything but an earlier run of the same stage is refused
    unless force (outdir.claim). Entries matching keep (fnmatch on names) are
    the scratch a rerun continues from: checkpoints when resuming, finished
    teacher shards. force keeps nothing.
    """
    from aligndistil_cli.parallel import distributed

    # Under torchrun rank 0 claims (and locks) the directory for all ranks; its refusal, if any, is every rank's.
    error = None
    if distributed.is_main():
        try:
            outdir.claim(Path(out), stage, force, keep)
        except UserError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(error)
    return Path(out)


# Scratch for --resume, and tracker logs (tracking.py) that a tracker may still append to: not results.
UNLISTED_DIRS = ("checkpoints", "logs")


def output_files(out: Path) -> list[Path]:
    return sorted(
        p for p in out.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        and p.relative_to(out).parts[0] not in UNLISTED_DIRS
    )


def with_relpath(record: Any, out: Path) -> Any:
    """An input record plus its path relative to out, so that a moved run directory still finds its inputs."""
    if not isinstance(record, dict) or "path" not in record or not Path(record["path"]).exists():
        return record
    return {**record, "relpath": os.path.relpath(os.path.abspath(record["path"]), os.path.abspath(out))}




def record_outputs(out: Path, rels: list[str]) -> None:
    """Re-record these files of a complete directory in its manifest (a file rewritten after finalize)."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    for rel in rels:
        manifest["outputs"][rel] = {"bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
    atomic_write_json(out / MANIFEST, manifest)


def read_manifest(path: Path, stage: str | tuple[str, ...] | None = None, role: str = "input") -> dict:
    """The manifest of a complete output directory, or a one-line UserError.

    Also checks, cheaply, that every recorded output still exists with its size.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{role} {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{role} {path} has no {MANIFEST}: it is unfinished or not an aligndistil output")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest_path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not manifest.get("complete"):
        raise UserError(f"{role} {path} is incomplete (its manifest is not marked complete)")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest.get("stage") not in stages:
        raise UserError(f"{role} {path} was written by stage {manifest.get('stage')!r}, expected {' or '.join(stages)}")
    for rel, info in manifest.get("outputs", {}).items():
        f = path / rel
        if not f.is_file():
            raise UserError(f"{role} {path} is missing {rel}, which its manifest lists")
        if f.stat().st_size != info["bytes"]:
            raise UserError(f"{role} {path}: {rel} has {f.stat().st_size} bytes, its manifest says {info['bytes']}")
    return manifest


def verify_outputs(path: Path, manifest: dict, role: str = "input", names: list[str] | None = None) -> None:
    """Raise a one-line UserError unless each of names (default: every output) has its manifest's sha256.

    Hashes are remembered by (path, size, mtime, ctime, inode) (filehash.py), so an
    unchanged directory is checked at the cost of a stat per file.
    """
    outputs = manifest.get("outputs", {})
    for rel in outputs if names is None else names:
        if rel not in outputs:
            raise UserError(f"{role} {path}: its manifest does not list {rel}")
        if sha256_cached(Path(path) / rel) != outputs[rel]["sha256"]:
            raise UserError(f"{role} {path}: {rel} differs from its manifest (changed after the stage finished); "
                            f"rerun the stage that wrote {path}")


def verify_full(path: Path) -> list[str]:
    """Re-hash every output and compare the files with what the manifest's stage writes.

    Returns the problems found (empty when intact): a changed file, a file on
    disk the manifest does not list, or a listed file its stage never writes.
    """
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    for rel, info in manifest["outputs"].items():
        if sha256_file(path / rel) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    unlisted = [str(p.relative_to(path)) for p in output_files(path)
                if str(p.relative_to(path)) not in manifest["outputs"]]
    problems += [f"{rel}: not listed in the manifest" for rel in unlisted]
    problems += [f"{rel}: not a file that stage {manifest.get('stage')} writes"
                 for rel in outdir.foreign_files(manifest.get("stage"), list(manifest["outputs"]))]
    return problems


def check_model_input(path: Path, role: str = "model") -> dict | None:
    """Refuse a model directory we wrote that is unfinished or changed since; return its manifest.

    A plain directory we did not write (save_pretrained elsewhere) is accepted, and a
    hub id is not checked here: both return None.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, role=role)
        verify_outputs(path, manifest, role)
        return manifest
    if outdir.is_ours(path):
        raise UserError(f"{role} {path} is unfinished: aligndistil wrote it but it has no {MANIFEST} (the stage was "
                        "killed or failed); rerun that stage")
    return None


def is_complete(path: Path) -> bool:
    try:
        read_manifest(path)
    except UserError:
        return False
    return True


WEIGHT_SUFFIXES = (".safetensors", ".bin")
def fingerprint_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_cached(f).encode())
    return h.hexdigest()


def fingerprint_model(path: Path) -> str:
    """Fingerprint of a model directory's weights and config.

    Directories we wrote are first checked against their manifest (check_model_input),
    whose checksums then stand for the files; other directories are hashed file by file.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_json({"hub_id": str(path)})
    manifest = check_model_input(path)
    if manifest:
        outputs = manifest.get("outputs", {})
        picked = {k: v["sha256"] for k, v in outputs.items() if k.endswith(WEIGHT_SUFFIXES) or k == "config.json"}
        if picked:
            return sha256_json(picked)
    files = [p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json"]
    return fingerprint_files(files, path)


def tokenizer_parts(tokenizer) -> dict[str, str]:
    """Fingerprints of each part of a tokenizer, so a mismatch can be named."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {}) if isinstance(backend, dict) else {}
    return {
        "vocabulary": sha256_json(sorted(tokenizer.get_vocab().items())),
        "merges": sha256_json(model.get("merges")),
        "special tokens": sha256_json({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}),
        "chat template": sha256_json(getattr(tokenizer, "chat_template", None)),
        "normalisation": sha256_json({k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor",
                                                                   "decoder")} if backend else None),
    }


def fingerprint_tokenizer(tokenizer) -> str:
    """Fingerprint of what a tokenizer does: vocabulary, merges, special tokens, template."""
    return sha256_json(tokenizer_parts(tokenizer))


def tokenizer_difference(a: dict[str, str], b: dict[str, str]) -> str:
    """'vocabulary, chat template': the parts in which two tokenizer_parts() differ."""
    return ", ".join(k for k in a if a.get(k) != b.get(k)) or "nothing"


def fingerprint_data(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        return sha256_cached(path)
    if path.is_dir():
        return fingerprint_files([p for p in path.rglob("*") if p.is_file()], path)
    return sha256_json({"hub_id": str(path)})


_REFINGERPRINT = {"model": fingerprint_model, "data": fingerprint_data}
def recorded_path(record: dict, out: Path | None = None) -> Path:
    """An input's path as a manifest in out recorded it: relative to out first, so a moved run still finds it."""
    if out is not None and record.get("relpath") and (Path(out) / record["relpath"]).exists():
        return Path(out) / record["relpath"]
    return Path(record["path"])


def stale_inputs(manifest: dict, out: Path | None = None) -> list[str]:
    """Names of recorded model/data inputs whose fingerprint no longer matches (or that fail their own check).

    An input is looked up relative to out first (the path finalize recorded), so a
    run directory moved together with its inputs still matches.
    """
    stale = []
    for name, rec in manifest.get("inputs", {}).items():
        refingerprint = _REFINGERPRINT.get(rec.get("kind"))
        if not refingerprint:
            continue
        path = recorded_path(rec, out)
        try:
            same = refingerprint(path) == rec["fingerprint"]
        except UserError:
            same = False
        if not same:
            stale.append(name)
    return stale


def content_key(inputs: dict) -> dict:
    """inputs without their paths: what a cache key may depend on, so that moving files keeps it."""
    return {name: {k: v for k, v in rec.items() if k not in ("path", "relpath")} if isinstance(rec, dict) else rec
            for name, rec in inputs.items()}


def portable_config(config: dict, root: Path) -> dict:
    """config with every path under root written as "{root}/REL", so that runs compare equal after a move."""
    prefix = os.path.normpath(str(root))

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, str) and value:
            norm = os.path.normpath(value)
            if norm == prefix or norm.startswith(prefix + os.sep):
                return "{root}" + norm[len(prefix):]
        return value

    return convert(config)


def input_record(kind: str, path: Path, fingerprint: str) -> dict:
    return {"kind": kind, "path": str(path), "fingerprint": fingerprint}
