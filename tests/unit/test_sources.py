"""Unit tests for aligndistil_cli.sources: format detection, normalisation, row errors.

The fixtures under tests/fixtures/sources hold the same three logical rows in each
layout (row B is multi-turn); the expected internal rows are written out by hand
below. standard.jsonl/.csv hold only rows A and C: a string prompt cannot carry the
earlier turns of row B.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aligndistil_cli.errors import UserError
from aligndistil_cli.sources import FORMATS, LoadStats, detect_format, flatten_plain, load_source

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
    chats = write_rows(tmp_path / "chats.jsonl", [{"conversation": r["messages"]} for r in read_jsonl(FIXTURES / "messages.jsonl")])
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
