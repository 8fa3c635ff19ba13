"""Unit tests for aligndistil_cli.eval.export: question parsing, answer files, and the model-backed generate_fn.

The expected answer-file fields are those read by AlpacaEval (model_outputs.json),
FastChat llm_judge (model_answer/*.jsonl) and arena-hard-auto (v0.1 and v2.0).
"""

from __future__ import annotations

import json

import pytest

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.eval import export as ex


class FakeGenerate:
    """A generate_fn that answers "answer to: <last user turn>" and records every call."""

    def __init__(self):
        self.calls: list[list[list[dict]]] = []

    def __call__(self, conversations):
        self.calls.append([list(c) for c in conversations])
        return ["answer to: " + conv[-1]["content"] for conv in conversations]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- alpaca-eval


def test_alpaca_eval_json_list(tmp_path):
    rows = [
        {"instruction": "name a fruit", "output": "reference", "generator": "gpt4", "dataset": "helpful_base"},
        {"instruction": "say hi", "dataset": "oasst"},
        {"instruction": "no dataset"},
    ]
    src = tmp_path / "alpaca_eval.json"
    src.write_text(json.dumps(rows))
    questions = ex.read_questions("alpaca-eval", src)
    fake = FakeGenerate()
    out = ex.export("alpaca-eval", questions, "my-model", fake, tmp_path / "out")

    assert out == tmp_path / "out" / "alpaca_eval" / "my-model.json"
    got = json.loads(out.read_text())
    assert got == [
        {"instruction": "name a fruit", "output": "answer to: name a fruit", "generator": "my-model",
         "dataset": "helpful_base"},
        {"instruction": "say hi", "output": "answer to: say hi", "generator": "my-model", "dataset": "oasst"},
        {"instruction": "no dataset", "output": "answer to: no dataset", "generator": "my-model"},
    ]
    # Single turn: one batched call covering every question.
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 3
    assert fake.calls[0][0] == [{"role": "user", "content": "name a fruit"}]


def test_alpaca_eval_jsonl(write_jsonl, tmp_path):
    src = write_jsonl([{"instruction": "a"}, {"instruction": "b", "dataset": "x"}], "q.jsonl")
    questions = ex.read_questions("alpaca-eval", src)
    assert [q["turns"] for q in questions] == [["a"], ["b"]]
    got = json.loads(ex.export("alpaca-eval", questions, "m", FakeGenerate(), tmp_path).read_text())
    assert [r["instruction"] for r in got] == ["a", "b"] and got[1]["dataset"] == "x"


# --------------------------------------------------------------------------- mt-bench

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["write a poem", "make it shorter"]},
    {"question_id": 82, "category": "math", "turns": ["what is 2+2", "and 3+3"]},
]


def test_mt_bench_two_turns(write_jsonl, tmp_path):
    questions = ex.read_questions("mt-bench", write_jsonl(MT_BENCH, "question.jsonl"))
    assert questions[0]["id"] == 81 and questions[0]["extra"] == {"category": "writing"}
    fake = FakeGenerate()
    out = ex.export("mt-bench", questions, "m", fake, tmp_path / "out")
    assert out == tmp_path / "out" / "mt_bench" / "model_answer" / "m.jsonl"

    assert len(fake.calls) == 2  # one call per turn index, batched over questions
    a1 = "answer to: write a poem"
    assert fake.calls[1][0] == [
        {"role": "user", "content": "write a poem"},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "make it shorter"},
    ]
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [81, 82]
    assert rows[0]["choices"] == [{"index": 0, "turns": [a1, "answer to: make it shorter"]}]
    assert rows[0]["model_id"] == "m"
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert isinstance(rows[0]["tstamp"], float)
    assert len(rows[0]["answer_id"]) == 22 and rows[0]["answer_id"] != rows[1]["answer_id"]


def test_mt_bench_answer_id_deterministic(write_jsonl, tmp_path):
    questions = ex.read_questions("mt-bench", write_jsonl(MT_BENCH))
    first = read_jsonl(ex.export("mt-bench", questions, "m", FakeGenerate(), tmp_path / "a"))
    second = read_jsonl(ex.export("mt-bench", questions, "m", FakeGenerate(), tmp_path / "b"))
    assert [r["answer_id"] for r in first] == [r["answer_id"] for r in second]
    other = read_jsonl(ex.export("mt-bench", questions, "other", FakeGenerate(), tmp_path / "c"))
    assert first[0]["answer_id"] != other[0]["answer_id"]


def test_uneven_turn_counts(write_jsonl, tmp_path):
    rows = [{"question_id": 1, "turns": ["one"]}, {"question_id": 2, "turns": ["x", "y", "z"]}]
    fake = FakeGenerate()
    out = ex.export("mt-bench", ex.read_questions("mt-bench", write_jsonl(rows)), "m", fake, tmp_path)
    assert [len(c) for c in fake.calls] == [2, 1, 1]  # only questions that have turn t
    assert [len(r["choices"][0]["turns"]) for r in read_jsonl(out)] == [1, 3]


# --------------------------------------------------------------------------- arena-hard


@pytest.mark.parametrize("key, qid", [("question_id", "328c149ed45a41c0b9d6f14659e63599"), ("uid", "abc123")])
def test_arena_hard_v01(write_jsonl, tmp_path, key, qid):
    rows = [{key: qid, "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "explain x"}]},
            {key: qid + "2", "turns": ["plain string turn"]}]
    questions = ex.read_questions("arena-hard", write_jsonl(rows))
    out = ex.export("arena-hard", questions, "m", FakeGenerate(), tmp_path / "out")
    assert out == tmp_path / "out" / "arena_hard" / "model_answer" / "m.jsonl"
    got = read_jsonl(out)
    assert [r[key] for r in got] == [qid, qid + "2"]
    other = {"uid", "question_id"} - {key}
    assert not any(k in r for r in got for k in other)
    assert got[0]["choices"] == [{"index": 0, "turns": [{"content": "answer to: explain x"}]}]
    assert got[1]["choices"][0]["turns"] == [{"content": "answer to: plain string turn"}]
    assert set(got[0]) == {key, "answer_id", "model_id", "choices", "tstamp"}


def test_arena_hard_v2(write_jsonl, tmp_path):
    rows = [{"uid": "u1", "category": "hard_prompt", "subcategory": "coding", "prompt": "write code"}]
    questions = ex.read_questions("arena-hard", write_jsonl(rows))
    got = read_jsonl(ex.export("arena-hard", questions, "m", FakeGenerate(), tmp_path))
    assert set(got[0]) == {"uid", "ans_id", "model", "messages", "tstamp"}
    assert got[0]["uid"] == "u1" and got[0]["model"] == "m"
    # arena-hard v2.0's gen_judgment reads messages[-1]["content"]["answer"].
    assert got[0]["messages"][-1]["content"]["answer"] == "answer to: write code"


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "benchmark, lines, row, needle",
    [
        ("mt-bench", [{"question_id": 1, "turns": ["a"]}, {"question_id": 2}], 2, "'turns': missing"),
        ("mt-bench", [{"question_id": 1, "turns": "a question"}], 1, "'turns': expected a non-empty list"),
        ("mt-bench", [{"question_id": 1, "turns": []}], 1, "'turns': expected a non-empty list"),
        ("mt-bench", [{"question_id": 1, "turns": ["a", 3]}], 1, "'turns[1]': expected a string"),
        ("mt-bench", [{"turns": ["a"]}], 1, "'question_id': missing"),
        ("mt-bench", [{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}], 2, "duplicate id"),
        ("mt-bench", [{"question_id": 1, "turns": ["a"]}, '{"question_id": 2, "turns": ['], 2, "invalid JSON"),
        ("alpaca-eval", [{"instruction": "ok"}, {"instruction": "   "}], 2, "'instruction': empty"),
        ("alpaca-eval", [{"dataset": "x"}], 1, "'instruction': missing"),
        ("arena-hard", [{"uid": "u", "turns": [{"text": "x"}]}], 1, "'content': missing"),
        ("arena-hard", [{"uid": "u"}], 1, "'turns': missing"),
        ("arena-hard", [{"question_id": True, "turns": ["x"]}], 1, "'question_id': expected an integer"),
    ],
)
def test_malformed_rows(write_jsonl, benchmark, lines, row, needle):
    path = write_jsonl(lines, "bad.jsonl")
    with pytest.raises(UserError) as err:
        ex.read_questions(benchmark, path)
    msg = str(err.value)
    assert str(path) in msg and f"row {row}" in msg and needle in msg, msg


def test_malformed_json_list(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": "ok"}, {"instruction": ""}]))
    with pytest.raises(UserError, match=r"eval\.json, row 2, field 'instruction': empty"):
        ex.read_questions("alpaca-eval", path)
    path.write_text('[{"instruction": "ok"},\n {"instruction": ')
    with pytest.raises(UserError, match=r"eval\.json: invalid JSON at line 2"):
        ex.read_questions("alpaca-eval", path)


def test_file_level_errors(tmp_path, write_jsonl):
    with pytest.raises(UserError, match="does not exist"):
        ex.read_questions("mt-bench", tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no questions"):
        ex.read_questions("mt-bench", write_jsonl([], "empty.jsonl"))
    with pytest.raises(UserError, match="unknown benchmark"):
        ex.read_questions("mmlu", write_jsonl([{"question_id": 1, "turns": ["a"]}]))
    questions = [{"id": 1, "turns": ["a"], "extra": {}}]
    with pytest.raises(UserError, match="model name"):
        ex.export("mt-bench", questions, "org/model", FakeGenerate(), tmp_path)


def test_generate_fn_wrong_count(tmp_path):
    questions = [{"id": 1, "turns": ["a"], "extra": {}}, {"id": 2, "turns": ["b"], "extra": {}}]
    with pytest.raises(ValueError, match="1 replies for 2"):
        ex.export("mt-bench", questions, "m", lambda convs: ["only one"], tmp_path)
    assert not (tmp_path / "mt_bench" / "model_answer" / "m.jsonl").exists()


# --------------------------------------------------------------------------- real sampler


def test_make_generate_fn_tiny_model(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from aligndistil_cli.data import toy

    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = LlamaForCausalLM(toy.model_config(len(tok), 32, 1, 2, 64, 32))
    gen = ex.make_generate_fn(model, tok, template=None, max_new_tokens=4, temperature=1.0,
                              top_p=1.0, batch_size=2, seed=0)
    conversations = [
        [{"role": "user", "content": "write a review about the pizza ."}],
        [{"role": "user", "content": "write a review about the soup and the staff ."},
         {"role": "assistant", "content": "the soup was good ."},
         {"role": "user", "content": "and the staff ."}],
    ]
    replies = gen(conversations)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert all(len(r.split()) <= 4 for r in replies)  # word-level tokenizer: <= max_new_tokens words

    # End to end through export with the real sampler: one two-turn question.
    questions = [{"id": 7, "turns": ["write a review about the pizza .", "and the staff ."], "extra": {}}]
    rows = read_jsonl(ex.export("mt-bench", questions, "tiny", gen, tmp_path))
    assert rows[0]["question_id"] == 7 and len(rows[0]["choices"][0]["turns"]) == 2
