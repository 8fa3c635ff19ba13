"""Telling a local path from a Hugging Face Hub id, whether the Hub can be asked at all, and uploading.

Loading a mistyped local path as a hub id costs transformers about a minute of retries
before it blames the network; these checks answer in one request, or none.

push (--push-to-hub) is called only after the stage returned, so the manifest is written and the
directory is complete: the Hub never gets a partial model. Any failure (offline, no token,
network) is one line, and the local directory stays complete.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def looks_like_path(name: str) -> bool:
    """True when `name` can only be meant as a local path: it starts with '.', '/' or '~', has more than
    one '/' or a backslash, or its first component is an existing directory ("runs/dpoo" when runs/ exists).
    A hub id is "name" or "owner/name"."""
    first = name.replace("\\", "/").split("/")[0]
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or ("/" in name and Path(first).is_dir()))


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    from huggingface_hub import constants

    # The constant is read once at import; the variable may have been set since.
    return constants.HF_HUB_OFFLINE or _env_on("HF_HUB_OFFLINE")


def datasets_offline() -> bool:
    """Whether `datasets` may not ask the Hub (HF_DATASETS_OFFLINE, or the Hub offline altogether)."""
    return hub_offline() or _env_on("HF_DATASETS_OFFLINE")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One quick request to the Hub's endpoint (any answer will do), instead of transformers' minute of retries."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # noqa: BLE001 - whatever the transport raises, the Hub is not reachable
        return False
    return True


def push(out: Path, repo_id: str, private: bool = False) -> str:
    """Upload out/ (its manifest must be complete) to the model repo repo_id; return the commit URL."""
    from aligndistil_cli.core.errors import UserError
    from aligndistil_cli.rundir.artifacts import read_manifest

    read_manifest(Path(out), role="output")
    where = f"--push-to-hub {repo_id}: {out} is saved and complete, but the upload"
    later = f"upload later with `hf upload {repo_id} {out}`"
    if hub_offline():
        raise UserError(f"{where} needs the Hub and HF_HUB_OFFLINE is set; {later}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                                   ignore_patterns=["checkpoints/*", ".*"],
                                   commit_message=f"Upload {Path(out).name} from aligndistil")
    except Exception as e:  # noqa: BLE001 - any HTTP, auth or network failure becomes the one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where} failed: {first}; {later}") from None
    return str(getattr(commit, "commit_url", commit))
