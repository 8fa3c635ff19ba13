"""A tokenizer as saved: what transformers loads, checked against the directory's own tokenizer.json.

transformers 5 picks a tokenizer's class from config.json's model_type in some cases (a qwen2 model
gets Qwen2Tokenizer whatever tokenizer_config.json names) and rebuilds the normaliser, pre-tokeniser
and decoder that class defines instead of those saved in tokenizer.json (huggingface/transformers
#45920: OLMo2, Yi, DeepSeek-R1-Distill-Llama). The ids then differ, silently, from the ones the model
was trained on: Mistral's SentencePiece tokenizer next to a qwen2 config encodes "Hello world" to other
tokens, the embedded task's word-level one to unknown words. transformers 4 always used tokenizer.json.
"""

from __future__ import annotations

from aligndistil_cli.core.console import say
from aligndistil_cli.core.errors import UserError

# What tells tokenizer pipelines apart: repeated spaces, tabs and newlines, a contraction, runs of digits
# (split one by one, in threes or whole), a decomposed accent (NFC or not), upper case, CJK and an emoji.
PROBE = "Hello world!  It's 2023:\t650841823 apples.\n\nCafe\u0301 HELLO 你好 🙂"


def saved_tokenizer_json(path: str, revision: str | None, source: dict) -> str | None:
    """The tokenizer.json of a local directory or an already downloaded hub model, if it has one."""
    from transformers.utils import cached_file

    return cached_file(path, "tokenizer.json", revision=revision, local_files_only=True,
                       _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
                       **{k: v for k, v in source.items() if k != "local_files_only"})


def _saved_ids(file: str) -> list[int]:
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(file)
    saved.no_padding()
    saved.no_truncation()
    return saved.encode(PROBE, add_special_tokens=False).ids


def _probe_ids(tok) -> list[int]:
    return tok(PROBE, add_special_tokens=False).input_ids


def as_saved(tok, path: str, revision: str | None = None, source: dict | None = None):
    """tok, or, when it encodes PROBE otherwise than path's tokenizer.json, tokenizer.json as saved (with a warning).

    Tokenizers of remote code and those without a tokenizer.json are taken as they are.
    """
    source = source or {}
    if not type(tok).__module__.startswith("transformers.") or not hasattr(tok, "backend_tokenizer"):
        return tok
    file = saved_tokenizer_json(path, revision, source)
    if file is None:
        return tok
    expected = _saved_ids(file)
    if _probe_ids(tok) == expected:
        return tok
    from transformers import PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast.from_pretrained(path, revision=revision, **source)
    if _probe_ids(saved) != expected:
        raise UserError(f"the tokenizer of {path} encodes text differently from its tokenizer.json, even when "
                        "loaded from that file alone; re-save it with save_pretrained")
    say(f"warning: transformers loads the tokenizer of {path} as {type(tok).__name__}, which encodes text "
        "differently from its tokenizer.json (it rebuilds the pre-tokeniser its config.json's model type implies); "
        "using tokenizer.json as saved")
    return saved
