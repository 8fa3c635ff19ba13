"""Unit tests for aligndistil_cli.data.sources: format detection, normalisation, row errors.

The fixtures under tests/fixtures/sources hold the same three logical rows in each
layout (row B is multi-turn); the expected internal rows are written out by hand
below. standard.jsonl/.csv hold only rows A and C: a string prompt cannot carry the
earlier turns of row B.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import types
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import encode_pairs, encode_rows
from aligndistil_cli.data.sources import FORMATS, LoadStats, detect_format, flatten_plain, load_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ROW_A = {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
ROW_B = {
    "prompt": [user("Name a colour."), assistant("Blue."), user("Name another one.")],
    "chosen": [assistant("Green.")],
    "rejected": [assistant("I will not.")],
}
ROW_C = {
    "prompt": [user('Translate "chat" from French, please.')],
    "chosen": [assistant("cat")],
    "rejected": [assistant("chat")],
}
PAIRS = [ROW_A, ROW_B, ROW_C]
PROMPTS = [{"prompt": r["prompt"]} for r in PAIRS]
SFT = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIRS]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow cache that load_dataset writes for local files out of the home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def to_parquet(path: Path, source: Path) -> Path:
    datasets.Dataset.from_list(read_jsonl(source)).to_parquet(str(path))
    return path


# --------------------------------------------------------------------------- same content, every layout

PAIR_FIXTURES = [
    ("conversational.jsonl", "conversational", PAIRS),
    ("ultrafeedback.jsonl", "ultrafeedback", PAIRS),
    ("implicit.jsonl", "implicit", PAIRS),
    ("hh.jsonl", "hh", PAIRS),
    ("dir", "implicit", PAIRS),
    ("standard.jsonl", "standard", [ROW_A, ROW_C]),
    ("standard.csv", "standard", [ROW_A, ROW_C]),
]


@pytest.mark.parametrize("name, fmt, expected", PAIR_FIXTURES)
def test_pair_layouts_normalise_to_identical_rows(name, fmt, expected):
    rows, stats = load_source(str(FIXTURES / name), kind="pairs")
    assert rows == expected
    assert stats == LoadStats(str(FIXTURES / name), fmt, len(expected), len(expected), {})


@pytest.mark.parametrize("name, fmt", [("conversational.jsonl", "conversational"), ("ultrafeedback.jsonl", "ultrafeedback"),
                                       ("implicit.jsonl", "implicit")])
def test_parquet_and_json_array_match_jsonl(tmp_path, name, fmt):
    parquet = to_parquet(tmp_path / "data.parquet", FIXTURES / name)
    json_array = tmp_path / "data.json"
    json_array.write_text(json.dumps(read_jsonl(FIXTURES / name)))
    for path in (parquet, json_array):
        rows, stats = load_source(str(path), kind="pairs")
        assert rows == PAIRS
        assert stats.format == fmt


def test_directory_files_load_in_name_order(tmp_path):
    parts = read_jsonl(FIXTURES / "conversational.jsonl")
    write_rows(tmp_path / "b.jsonl", parts[2:])
    write_rows(tmp_path / "a.jsonl", parts[:2])
    to_parquet(tmp_path / "c.parquet", FIXTURES / "conversational.jsonl")
    (tmp_path / "notes.txt").write_text("not data")
    rows, stats = load_source(str(tmp_path), kind="pairs")
    assert rows == PAIRS + PAIRS
    assert (stats.read, stats.kept) == (6, 6)


@pytest.mark.parametrize("name", ["prompt.jsonl", "messages.jsonl", "conversational.jsonl", "ultrafeedback.jsonl",
                                  "implicit.jsonl", "hh.jsonl", "sft.jsonl"])
def test_prompts_from_any_layout(name):
    rows, _ = load_source(str(FIXTURES / name), kind="prompts")
    assert rows == PROMPTS


@pytest.mark.parametrize("name", ["sft.jsonl", "messages.jsonl", "conversational.jsonl", "hh.jsonl"])
def test_sft_rows_train_on_the_chosen_response(name):
    rows, _ = load_source(str(FIXTURES / name), kind="sft")
    assert rows == SFT


def test_system_message_and_empty_system_content_kept():
    row = {"prompt": [{"role": "system", "content": ""}, user("hi")], "chosen": [assistant("a")],
           "rejected": [assistant("b")]}
    with tempfile.TemporaryDirectory() as tmp:
        rows, _ = load_source(str(write_rows(Path(tmp) / "d.jsonl", [row])), kind="pairs")
    assert rows == [row]
    assert flatten_plain(rows[0]["prompt"]) == "hi"


def test_flatten_plain_joins_contents_with_newlines():
    assert flatten_plain(ROW_B["prompt"]) == "Name a colour.\nBlue.\nName another one."
    assert flatten_plain(ROW_A["prompt"]) == "What is 2+2?"


# --------------------------------------------------------------------------- detection and overrides


@pytest.mark.parametrize("name, kind, fmt", [
    ("standard.jsonl", "pairs", "standard"), ("standard.csv", "pairs", "standard"),
    ("conversational.jsonl", "pairs", "conversational"), ("ultrafeedback.jsonl", "pairs", "ultrafeedback"),
    ("implicit.jsonl", "pairs", "implicit"), ("hh.jsonl", "pairs", "hh"),
    ("prompt.jsonl", "prompts", "prompt"), ("messages.jsonl", "prompts", "messages"),
    ("hh.jsonl", "prompts", "hh"), ("sft.jsonl", "sft", "sft"), ("messages.jsonl", "sft", "messages"),
])
def test_detection(name, kind, fmt):
    assert load_source(str(FIXTURES / name), kind=kind)[1].format == fmt


def test_detect_format_directly():
    assert detect_format(["prompt", "chosen", "rejected"], {"prompt": "p", "chosen": "a"}, "pairs") == "standard"
    assert detect_format(["prompt", "chosen", "rejected"], {"prompt": "p", "chosen": [assistant("a")]}, "pairs") \
        == "conversational"
    assert detect_format(["chosen", "rejected"], {"chosen": [user("q"), assistant("a")]}, "pairs") == "implicit"
    with pytest.raises(UserError, match="cannot tell"):
        detect_format(["question", "answer"], {}, "pairs")
    assert set(FORMATS) == {"standard", "conversational", "ultrafeedback", "implicit", "hh", "prompt", "messages", "sft"}


def test_data_format_override():
    # ultrafeedback rows read as implicit ignore the prompt column and give the same rows.
    rows, stats = load_source(str(FIXTURES / "ultrafeedback.jsonl"), kind="pairs", data_format="implicit")
    assert (rows, stats.format) == (PAIRS, "implicit")
    with pytest.raises(UserError, match="hh.jsonl, row 1, field 'chosen': expected a list of messages, got string"):
        load_source(str(FIXTURES / "hh.jsonl"), kind="pairs", data_format="implicit")
    with pytest.raises(UserError, match="does not hold pairs"):
        load_source(str(FIXTURES / "messages.jsonl"), kind="pairs", data_format="messages")
    with pytest.raises(UserError, match="unknown data format 'alpaca'"):
        load_source(str(FIXTURES / "hh.jsonl"), kind="pairs", data_format="alpaca")


def test_key_overrides(tmp_path):
    pairs = write_rows(tmp_path / "renamed.jsonl", [{"question": "What is 2+2?", "good": "4", "bad": "5"}])
    rows, stats = load_source(str(pairs), kind="pairs", prompt_key="question", chosen_key="good", rejected_key="bad")
    assert (rows, stats.format) == ([ROW_A], "standard")
    messages = read_jsonl(FIXTURES / "messages.jsonl")
    chats = write_rows(tmp_path / "chats.jsonl", [{"conversation": r["messages"]} for r in messages])
    assert load_source(str(chats), kind="sft", messages_key="conversation")[0] == SFT
    write_rows(pairs, [{"question": "q", "good": "4", "bad": "4"}])
    with pytest.raises(UserError, match=r"row 1, field 'bad': identical to 'good'"):
        load_source(str(pairs), kind="pairs", prompt_key="question", chosen_key="good", rejected_key="bad")


# --------------------------------------------------------------------------- stats and skipping


def test_skip_bad_rows_counts_reasons(tmp_path):
    good = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    path = write_rows(tmp_path / "mixed.jsonl", [
        good,
        {"prompt": "q", "chosen": "4"},
        {"prompt": "q", "chosen": 4, "rejected": "5"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "  ", "rejected": "5"},
        {"prompt": "q", "chosen": [user("4")], "rejected": "5"},
        good,
    ])
    rows, stats = load_source(str(path), kind="pairs", skip_bad_rows=True)
    assert rows == [ROW_A, ROW_A]
    assert stats == LoadStats(str(path), "standard", 7, 2,
                              {"bad_role": 1, "empty": 1, "identical": 1, "missing": 1, "wrong_type": 1})
    with pytest.raises(UserError, match=r"mixed.jsonl, row 2, field 'rejected': missing$"):
        load_source(str(path), kind="pairs")


def test_all_rows_dropped_is_an_error(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError, match=r"all 1 rows were dropped \(identical 1\)"):
        load_source(str(path), kind="pairs", skip_bad_rows=True)


# --------------------------------------------------------------------------- malformed rows

STANDARD_OK = {"prompt": "q", "chosen": "a", "rejected": "b"}
CONV_OK = {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
UF_OK = {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
IMPLICIT_OK = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
HH_OK = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}

MALFORMED = [
    # (first valid row fixing the layout, bad row, field, problem)
    (STANDARD_OK, {"prompt": "q", "rejected": "b"}, "chosen", "missing"),
    (STANDARD_OK, {"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", "missing (null)"),
    (STANDARD_OK, {"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen",
     "expected a string or a list of messages, got number"),
    (STANDARD_OK, {"prompt": "q", "chosen": "a", "rejected": " \n"}, "rejected", "empty"),
    (STANDARD_OK, {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    (STANDARD_OK, {"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical to 'chosen'"),
    (CONV_OK, {**CONV_OK, "chosen": [user("a")]}, "chosen", "message 1: a response must have role 'assistant', got 'user'"),
    (CONV_OK, {**CONV_OK, "prompt": [{"role": "bot", "content": "q"}]}, "prompt",
     "message 1: role 'bot' is not one of system, user, assistant"),
    (CONV_OK, {**CONV_OK, "prompt": [{"content": "q"}]}, "prompt", "message 1: role null is not one of"),
    (CONV_OK, {**CONV_OK, "rejected": [{"role": "assistant"}]}, "rejected", "message 1: content must be a string, got null"),
    (CONV_OK, {**CONV_OK, "rejected": ["b"]}, "rejected", "message 1: expected an object, got string"),
    (CONV_OK, {**CONV_OK, "rejected": []}, "rejected", "no messages"),
    (CONV_OK, {**CONV_OK, "prompt": [user("q"), assistant("a")]}, "prompt", "the prompt must end with a user turn"),
    (UF_OK, {**UF_OK, "chosen": [user("q")]}, "chosen", "the conversation does not end with an assistant turn"),
    (UF_OK, {**UF_OK, "prompt": "other"}, "chosen", "the conversation does not match 'prompt'"),
    (UF_OK, {**UF_OK, "rejected": [user("other"), assistant("b")]}, "rejected",
     "the turns before the response differ from 'chosen'"),
    (UF_OK, {**UF_OK, "chosen": [assistant("a")]}, "chosen", "the prompt must end with a user turn"),
    (IMPLICIT_OK, {**IMPLICIT_OK, "chosen": [user("q"), assistant("a"), assistant("c")]}, "chosen",
     "expected one assistant turn after the shared prompt, found 2 turns"),
    (IMPLICIT_OK, {**IMPLICIT_OK, "chosen": [user("q"), user("a")]}, "chosen",
     "the conversation does not end with an assistant turn"),
    (IMPLICIT_OK, {"chosen": [assistant("a")], "rejected": [assistant("b")]}, "chosen",
     "the prompt must end with a user turn"),
    (IMPLICIT_OK, {**IMPLICIT_OK, "rejected": IMPLICIT_OK["chosen"]}, "rejected", "identical to 'chosen'"),
    (HH_OK, {**HH_OK, "chosen": "just text"}, "chosen", "expected text of the form"),
    (HH_OK, {**HH_OK, "rejected": "\n\nHuman: q\n\nAssistant: b\n\nHuman: more"}, "rejected",
     "the conversation does not end with an assistant turn"),
    (HH_OK, {**HH_OK, "rejected": "\n\nHuman: other\n\nAssistant: b"}, "rejected",
     "the turns before the response differ from 'chosen'"),
    (HH_OK, {**HH_OK, "chosen": "\n\nHuman: q\n\nAssistant:  "}, "chosen", "message 2: empty content"),
    (HH_OK, {**HH_OK, "chosen": "\n\nHuman: q\n\nAssistant: b "}, "rejected", "identical to 'chosen'"),
]


@pytest.mark.parametrize("first, bad, field, problem", MALFORMED)
def test_malformed_row_names_file_row_and_field(tmp_path, first, bad, field, problem):
    path = write_rows(tmp_path / "bad.jsonl", [first, bad])
    with pytest.raises(UserError) as err:
        load_source(str(path), kind="pairs")
    assert str(err.value).startswith(f"{path}, row 2, field {field!r}: {problem}")
    assert "\n" not in str(err.value)
    rows, stats = load_source(str(path), kind="pairs", skip_bad_rows=True)
    assert (stats.read, stats.kept, sum(stats.dropped.values())) == (2, 1, 1)


@pytest.mark.parametrize("kind, row, field, problem", [
    ("prompts", {"messages": [assistant("a")]}, "messages", "the prompt must end with a user turn"),
    ("prompts", {"prompt": 7}, "prompt", "expected a string or a list of messages, got number"),
    ("sft", {"messages": [user("q"), user("a")]}, "messages", "the conversation does not end with an assistant turn"),
    ("sft", {"prompt": "q", "response": [user("a")]}, "response", "message 1: a response must have role 'assistant'"),
])
def test_malformed_prompt_and_sft_rows(tmp_path, kind, row, field, problem):
    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UserError, match=f"^{path}, row 1, field {field!r}: {problem}"):
        load_source(str(path), kind=kind)


@pytest.mark.parametrize("content, problem", [
    (b'{"prompt": "q"}\n{"prompt": \n', "invalid JSON"),
    (b'{"prompt": "q"}\n{"prompt": "\xff"}\n', "not valid UTF-8"),
    (b'{"prompt": "q"}\n[1, 2]\n', "expected a JSON object, got list"),
])
def test_unreadable_jsonl_lines(tmp_path, content, problem):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"^{path}, row 2: {problem}"):
        load_source(str(path), kind="prompts")


def test_csv_and_parquet_errors_name_the_file_and_row(tmp_path):
    csv = tmp_path / "pairs.csv"
    # Numbers and "NA" are text in a CSV of responses, not numbers and nulls.
    csv.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nq,NA,null\nq,,b\n")
    with pytest.raises(UserError, match=f"^{csv}, row 3, field 'chosen': empty$"):
        load_source(str(csv), kind="pairs")
    rows, stats = load_source(str(csv), kind="pairs", skip_bad_rows=True)
    assert rows[0] == ROW_A and rows[1]["chosen"] == [assistant("NA")]
    assert stats.dropped == {"empty": 1}
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(UserError, match=f"^{garbage}: could not be loaded") as err:
        load_source(str(garbage), kind="pairs")
    assert "\n" not in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match=f"^data file {tmp_path / 'missing.jsonl'} does not exist$"):
        load_source(str(tmp_path / "missing.jsonl"), kind="pairs")
    with pytest.raises(UserError, match="does not exist"):
        load_source("./no/such/dir", kind="pairs")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        load_source(str(tmp_path / "empty.jsonl"), kind="pairs")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load_source(str(tmp_path / "data.txt"), kind="pairs")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="has no .jsonl"):
        load_source(str(tmp_path / "sub"), kind="pairs")
    with pytest.raises(UserError, match="cannot tell the pairs data format"):
        load_source(str(write_rows(tmp_path / "odd.jsonl", [{"text": "x"}])), kind="pairs")
    with pytest.raises(UserError, match="unknown data kind"):
        load_source(str(FIXTURES / "hh.jsonl"), kind="dpo")


# --------------------------------------------------------------------------- hub


def test_hub_dataset_passes_split_and_subset(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(read_jsonl(FIXTURES / "ultrafeedback.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, stats = load_source("HuggingFaceH4/ultrafeedback_binarized", kind="pairs", split="test_prefs", subset="default")
    assert calls == [(("HuggingFaceH4/ultrafeedback_binarized", "default"), {"split": "test_prefs"})]
    assert (rows, stats.format, stats.source) == (PAIRS, "ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized")


def test_hub_errors_are_one_line(monkeypatch):
    def unreachable(*args, **kwargs):
        try:
            raise FileNotFoundError("Dataset org/name is not cached")
        except FileNotFoundError as e:
            raise ConnectionError("Couldn't reach 'org/name' on the Hub\nretry later") from e

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError) as err:
        load_source("org/name", kind="prompts")
    assert str(err.value) == ("org/name (split train): could not be loaded "
                              "(Couldn't reach 'org/name' on the Hub; Dataset org/name is not cached)")


def test_bad_row_from_hub_names_the_split(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"prompt": ""}]))
    with pytest.raises(UserError, match=r"^org/name \(subset s, split test\), row 1, field 'prompt': empty$"):
        load_source("org/name", kind="prompts", split="test", subset="s")


# --------------------------------------------------------------------------- property: never a traceback

ROLE = st.sampled_from(["system", "user", "assistant", "bot", "", "Human"]) | st.none() | st.integers()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": st.text(max_size=6) | JSON})
FIELD_VALUE = (JSON | st.lists(MESSAGE | JSON, max_size=4) | st.text(max_size=20)
               | st.sampled_from(["\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q", "Assistant: x"]))
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "messages", "extra"]), FIELD_VALUE, max_size=4)
VALID = [STANDARD_OK, CONV_OK, UF_OK, IMPLICIT_OK, HH_OK]


def mutate(row: dict, key: str, value, delete: bool) -> dict:
    """A valid row with one field replaced or removed, so the checks past 'missing' get exercised."""
    row = dict(row)
    if delete:
        row.pop(key, None)
    else:
        row[key] = value
    return row


MUTATED = st.builds(mutate, st.sampled_from(VALID), st.sampled_from(["prompt", "chosen", "rejected"]), FIELD_VALUE,
                    st.booleans())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid=st.sampled_from(VALID), bad=st.lists(ROW | MUTATED, min_size=1, max_size=3), first=st.booleans(),
       skip=st.booleans(), fmt=st.just("auto") | st.sampled_from(FORMATS))
def test_random_rows_end_in_user_error_or_counted_skip(valid, bad, first, skip, fmt):
    rows = [valid, *bad] if first else [*bad, valid]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(Path(tmp) / "random.jsonl", rows)
        try:
            kept, stats = load_source(str(path), kind="pairs", data_format=fmt, skip_bad_rows=skip)
        except UserError as e:
            assert "\n" not in str(e)
            return
    assert stats.read == len(rows)
    assert stats.kept == len(kept) == stats.read - sum(stats.dropped.values())
    assert skip or not stats.dropped
    for row in kept:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"][-1]["role"] == "user"
        assert all(m["role"] == "assistant" for m in row["chosen"] + row["rejected"])


# --------------------------------------------------------------------------- issue 12: undecodable input

GOOD_LINE = json.dumps(STANDARD_OK).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_skip_bad_rows_drops_undecodable_lines(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(b"\n".join([GOOD_LINE, b'{"prompt": "x", "chosen": }', b"", b'{"prompt": "\xff\xfe"}', GOOD_LINE]))
    with pytest.raises(UserError, match=f"^{path}, row 2: invalid JSON"):
        load_source(str(path), kind="pairs")
    rows, stats = load_source(str(path), kind="pairs", skip_bad_rows=True)
    assert rows == [CONV_OK, CONV_OK]
    assert stats == LoadStats(str(path), "standard", 4, 2, {"invalid_json": 1, "invalid_utf8": 1})
    # The kept rows remember their own lines (the blank line 3 is counted).
    assert [r.origin for r in rows] == [(str(path), 1), (str(path), 5)]


def test_only_undecodable_lines_all_dropped(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"{]\n\xc3\x28\n")
    with pytest.raises(UserError, match=r"all 2 rows were dropped \(invalid_json 1, invalid_utf8 1\)"):
        load_source(str(path), kind="pairs", skip_bad_rows=True)


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", b"\xef\xbb\xbf" + GOOD_LINE + b"\n"),
    ("bom.json", b"\xef\xbb\xbf[" + GOOD_LINE + b"]"),
    ("bom.csv", b"\xef\xbb\xbfprompt,chosen,rejected\nq,a,b\n"),
])
def test_utf8_bom_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    rows, stats = load_source(str(path), kind="pairs")
    assert (rows, stats.format) == ([CONV_OK], "standard")


@pytest.mark.parametrize("row, field, prefix", [
    ({"prompt": "q", "chosen": "a\ud800", "rejected": "b"}, "chosen", ""),
    ({**CONV_OK, "prompt": [user("q \udfff")]}, "prompt", "message 1: "),
])
def test_lone_surrogate_is_a_bad_field(tmp_path, row, field, prefix):
    path = write_rows(tmp_path / "surrogate.jsonl", [STANDARD_OK if isinstance(row["prompt"], str) else CONV_OK, row])
    assert "\\ud800" in path.read_text() or "\\udfff" in path.read_text()  # written as a JSON escape
    with pytest.raises(UserError, match=f"^{path}, row 2, field {field!r}: {prefix}contains the lone surrogate"):
        load_source(str(path), kind="pairs")
    rows, stats = load_source(str(path), kind="pairs", skip_bad_rows=True)
    assert (len(rows), stats.dropped) == (1, {"invalid_unicode": 1})


def test_json_array_errors_name_the_record(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([STANDARD_OK, {**STANDARD_OK, "prompt": 3}]))
    with pytest.raises(UserError, match=f"^{path}, row 2, field 'prompt': expected a string or a list"):
        load_source(str(path), kind="pairs")
    path.write_text('[\n {"prompt": "q",\n  "chosen": }\n]')
    with pytest.raises(UserError, match=f"^{path}, line 3, column 13: invalid JSON"):
        load_source(str(path), kind="pairs")


def test_subdirectories_of_a_data_directory_are_read(tmp_path):
    write_rows(tmp_path / "a.jsonl", [STANDARD_OK])
    (tmp_path / "more").mkdir()
    sub = write_rows(tmp_path / "more" / "b.jsonl", [STANDARD_OK, {**STANDARD_OK, "chosen": ""}])
    (tmp_path / ".cache").mkdir()
    write_rows(tmp_path / ".cache" / "junk.jsonl", [{"x": 1}])
    with pytest.raises(UserError, match=f"^{sub}, row 2, field 'chosen': empty"):
        load_source(str(tmp_path), kind="pairs")
    rows, stats = load_source(str(tmp_path), kind="pairs", skip_bad_rows=True)
    assert (len(rows), stats.read, stats.dropped) == (2, 3, {"empty": 1})
    assert [r.origin for r in rows] == [(str(tmp_path / "a.jsonl"), 1), (str(sub), 1)]


def test_undetectable_format_names_the_row_it_looked_at(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('\n{"text": "x"}\n')
    with pytest.raises(UserError, match=f"^{path}, row 2: cannot tell the pairs data format"):
        load_source(str(path), kind="pairs")


def test_csv_load_error_is_one_line_via_console_script(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq,a,b,extra\n")
    (tmp_path / "m").mkdir()  # apart from --out, which may not be inside an input
    proc = subprocess.run([sys.executable, "-m", "aligndistil_cli", "sft", "--model", str(tmp_path / "m"), "--data", str(path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")})
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}: could not be loaded")
    assert "line 3" in proc.stderr


# --------------------------------------------------------------------------- property: random bytes and JSON values

SURROGATE_TEXT = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=4)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | SURROGATE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
MUTATED_TEXT = st.builds(mutate, st.sampled_from(VALID), st.sampled_from(["prompt", "chosen", "rejected"]),
                         SURROGATE_TEXT | st.lists(st.fixed_dictionaries({"role": ROLE, "content": SURROGATE_TEXT}),
                                                   max_size=2), st.just(False))
LINE = (st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" "))  # random bytes: mostly not UTF-8 or JSON
        | JSON_VALUE.map(lambda v: json.dumps(v).encode())
        | (ROW | MUTATED | MUTATED_TEXT | st.sampled_from(VALID)).map(lambda r: json.dumps(r).encode()))
ROW_NUMBER = re.compile(r", (?:row|line) (\d+)")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=5), bom=st.booleans(), suffix=st.sampled_from([".jsonl", ".json"]),
       skip=st.booleans(), kind=st.sampled_from(["pairs", "sft", "prompts"]))
def test_random_bytes_and_json_values_never_crash_the_loader(toy_tokenizer, lines, bom, suffix, skip, kind):
    """Every failure is a one-line UserError naming the file (and the line, for a row's failure);
    under skip_bad_rows every row is kept or counted as dropped. Kept rows then encode."""
    config = types.SimpleNamespace(max_length=32, max_prompt_length=16, chat_template=True, skip_bad_rows=skip,
                                   refuse_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"random{suffix}"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines))
        try:
            rows, stats = load_source(str(path), kind=kind, skip_bad_rows=skip)
            summary = dataclasses.asdict(stats)
            if kind == "pairs":
                encode_pairs(toy_tokenizer, rows, config, summary)
            elif kind == "sft":
                encode_rows(toy_tokenizer, rows, "response", config, summary)
        except UserError as e:
            message = str(e)
            assert "\n" not in message
            assert message.startswith((str(path), f"data {path}"))
            numbers = [int(n) for n in ROW_NUMBER.findall(message)]
            # Whole-file failures: nothing readable, or no layout fits (named by the row it was judged from).
            whole_file = any(words in message for words in ("rows were dropped", "has no rows", "every row was dropped",
                                                             "cannot tell the"))
            # A .json array with a syntax error, or bytes that are not UTF-8, cannot be split into rows: its error
            # names the line instead (found by hypothesis: b"[]\n\x80").
            broken_array = suffix == ".json" and ("invalid JSON" in message or "not valid UTF-8" in message)
            assert numbers or whole_file or broken_array
            assert not (skip and numbers) or whole_file or broken_array, "under skip_bad_rows a bad row is dropped"
            assert suffix == ".json" or all(1 <= n <= len(lines) for n in numbers)
            return
    assert stats.read == stats.kept + sum(stats.dropped.values())
    assert stats.kept == len(rows) and (skip or not stats.dropped)


def test_a_mistyped_data_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    def hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match=r"^data file runs/prefs does not exist$"):
        load_source("runs/prefs", kind="pairs")
