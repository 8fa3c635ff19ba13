"""Telling a local path from a Hugging Face Hub id, and whether the Hub can be asked at all.

Loading a mistyped local path as a hub id costs transformers about a minute of retries
before it blames the network; these checks answer in one request, or none.
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


def hub_offline() -> bool:
    from huggingface_hub import constants

    # The constant is read once at import; the variable may have been set since.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One quick request to the Hub's endpoint (any answer will do), instead of transformers' minute of retries."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # noqa: BLE001 - whatever the transport raises, the Hub is not reachable
        return False
    return True
