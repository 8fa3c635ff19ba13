"""Write a model's answers in the file formats the public benchmarks' own tooling reads.

The judges (GPT-4 and the like) need API keys, so this tool never calls them: it
only produces the answer files that these tools take as input:
  * AlpacaEval: model_outputs.json, a JSON list of {instruction, output, generator, dataset};
  * MT-Bench (FastChat llm_judge): model_answer/<model>.jsonl with choices[0].turns = [str, ...];
  * Arena-Hard-Auto: model_answer/<model>.jsonl. v0.1 question files (question_id and
    turns [{content}]) get v0.1 answers (choices[0].turns = [{content}]); v2.0 question
    files (uid and prompt) get v2.0 answers (uid, ans_id, model, messages), since that
    is what v2.0's gen_judgment reads (messages[-1].content.answer).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from aligndistil_cli.core.errors import UserError, where
from aligndistil_cli.data.readers import read_jsonl
from aligndistil_cli.rundir.artifacts import atomic_write_bytes

BENCHMARKS = ("alpaca-eval", "mt-bench", "arena-hard")


# --------------------------------------------------------------------------- reading


def read_questions(benchmark: str, path: Path) -> list[dict]:
    """Questions of a benchmark file as [{"id", "turns": [str, ...], "extra": {...}}], in file order.

    extra holds the row's other fields (category, dataset, ...). arena-hard rows also
    carry "id_key" ("question_id" or "uid", echoed in the answers) and "format" ("v0.1" or "v2.0").
    """
    _check_benchmark(benchmark)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"question file {path} does not exist")
    parse = {"alpaca-eval": _alpaca_row, "mt-bench": _mt_bench_row, "arena-hard": _arena_hard_row}[benchmark]
    questions, seen = [], {}
    for row_no, row in _rows(path, allow_list=benchmark == "alpaca-eval"):
        question = parse(row, path, row_no)
        # Duplicate ids would give two answers the same answer_id, and the judges'
        # loaders key answers by id, so one answer would silently vanish.
        if benchmark != "alpaca-eval":
            key = json.dumps(question["id"])
            if key in seen:
                raise UserError(f"{where(path, row_no, _id_key(question))}: duplicate id "
                                f"{question['id']!r} (first on row {seen[key]})")
            seen[key] = row_no
        questions.append(question)
    if not questions:
        raise UserError(f"question file {path} has no questions")
    return questions


def _rows(path: Path, allow_list: bool) -> list[tuple[int, dict]]:
    """(row number, object) pairs; AlpacaEval ships a JSON list, the others JSONL."""
    raw = path.read_bytes()
    if not (allow_list and raw.lstrip().startswith(b"[")):
        return list(read_jsonl(path))
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where(path)}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where(path)}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(items, list):
        raise UserError(f"{where(path)}: expected a JSON list of objects")
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{where(path, n)}: expected a JSON object, got {type(item).__name__}")
    return list(enumerate(items, start=1))


def _text(value, path: Path, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where(path, row, field)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where(path, row, field)}: empty")
    return value


def _required(row: dict, field: str, path: Path, row_no: int):
    if field not in row:
        raise UserError(f"{where(path, row_no, field)}: missing")
    return row[field]


def _question_id(value, path: Path, row: int, field: str):
    # bool is an int subclass, but true/false is never a meaningful question id.
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise UserError(f"{where(path, row, field)}: expected an integer or a non-empty string")
    return value


def _turn_texts(row: dict, path: Path, row_no: int, dicts_ok: bool) -> list[str]:
    turns = _required(row, "turns", path, row_no)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where(path, row_no, 'turns')}: expected a non-empty list")
    texts = []
    for i, turn in enumerate(turns):
        field = f"turns[{i}]"
        if dicts_ok and isinstance(turn, dict):
            turn, field = _required(turn, "content", path, row_no), f"turns[{i}].content"
        texts.append(_text(turn, path, row_no, field))
    return texts


def _alpaca_row(row: dict, path: Path, row_no: int) -> dict:
    instruction = _text(_required(row, "instruction", path, row_no), path, row_no, "instruction")
    # The eval set's own output/generator are the reference model's; never carry them.
    extra = {k: v for k, v in row.items() if k not in ("instruction", "output", "generator")}
    return {"id": row_no, "turns": [instruction], "extra": extra}


def _mt_bench_row(row: dict, path: Path, row_no: int) -> dict:
    qid = _question_id(_required(row, "question_id", path, row_no), path, row_no, "question_id")
    turns = _turn_texts(row, path, row_no, dicts_ok=False)
    extra = {k: v for k, v in row.items() if k not in ("question_id", "turns")}
    return {"id": qid, "turns": turns, "extra": extra}


def _arena_hard_row(row: dict, path: Path, row_no: int) -> dict:
    key = "uid" if "uid" in row else "question_id"
    qid = _question_id(_required(row, key, path, row_no), path, row_no, key)
    if "turns" in row or "prompt" not in row:
        turns, fmt = _turn_texts(row, path, row_no, dicts_ok=True), "v0.1"
    else:
        turns, fmt = [_text(row["prompt"], path, row_no, "prompt")], "v2.0"
    extra = {k: v for k, v in row.items() if k not in (key, "turns", "prompt")}
    return {"id": qid, "turns": turns, "extra": extra, "id_key": key, "format": fmt}


# --------------------------------------------------------------------------- writing


def export(benchmark: str, questions: list[dict], model_name: str, generate_fn, out_dir: Path) -> Path:
    """Answer every question with generate_fn and write the benchmark's answer file; returns its path."""
    _check_benchmark(benchmark)
    if not model_name or any(c in model_name for c in "/\\") or model_name in (".", ".."):
        # The judges take the model's name from the file name, so it must be one path component.
        raise UserError(f"model name {model_name!r} must be a non-empty name without path separators")
    answers = _answer_all(questions, generate_fn)
    out_dir = Path(out_dir)
    if benchmark == "alpaca-eval":
        rows = [_alpaca_answer(q, a, model_name) for q, a in zip(questions, answers)]
        path = out_dir / "alpaca_eval" / f"{model_name}.json"
        # ASCII escapes: the tools open these files with the platform's default encoding.
        data = json.dumps(rows, indent=2) + "\n"
    else:
        make = _mt_bench_answer if benchmark == "mt-bench" else _arena_hard_answer
        sub = "mt_bench" if benchmark == "mt-bench" else "arena_hard"
        path = out_dir / sub / "model_answer" / f"{model_name}.jsonl"
        data = "".join(json.dumps(make(q, a, model_name)) + "\n" for q, a in zip(questions, answers))
    atomic_write_bytes(path, data.encode("utf-8"))
    return path


def _answer_all(questions: list[dict], generate_fn) -> list[list[str]]:
    """answers[i][t]: the model's reply to turn t of question i, one generate_fn call per turn index.

    Turn t's conversation replays the model's own earlier answers, as FastChat and
    arena-hard do, so a second turn is judged in the context the model produced.
    """
    answers: list[list[str]] = [[] for _ in questions]
    for t in range(max((len(q["turns"]) for q in questions), default=0)):
        active = [i for i, q in enumerate(questions) if len(q["turns"]) > t]
        conversations = [_conversation(questions[i]["turns"][: t + 1], answers[i]) for i in active]
        replies = list(generate_fn(conversations))
        if len(replies) != len(conversations) or not all(isinstance(r, str) for r in replies):
            raise ValueError(f"generate_fn returned {len(replies)} replies for {len(conversations)} "
                             "conversations; expected one string each")
        for i, reply in zip(active, replies):
            answers[i].append(reply)
    return answers


def _conversation(user_turns: list[str], replies: list[str]) -> list[dict]:
    messages = []
    for n, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        if n < len(user_turns) - 1:
            messages.append({"role": "assistant", "content": replies[n]})
    return messages


def _answer_id(model_name: str, qid) -> str:
    # Deterministic (unlike the tools' shortuuid) so a rerun writes an identical file
    # apart from tstamp; JSON-encoding keeps "m"+"12" apart from "m1"+"2", 1 from "1".
    return hashlib.sha256(json.dumps([model_name, qid]).encode("utf-8")).hexdigest()[:22]


def _alpaca_answer(question: dict, answer: list[str], model_name: str) -> dict:
    row = {"instruction": question["turns"][0], "output": answer[0], "generator": model_name}
    if "dataset" in question.get("extra", {}):
        row["dataset"] = question["extra"]["dataset"]
    return row


def _mt_bench_answer(question: dict, answer: list[str], model_name: str) -> dict:
    return {"question_id": question["id"], "answer_id": _answer_id(model_name, question["id"]),
            "model_id": model_name, "choices": [{"index": 0, "turns": answer}], "tstamp": time.time()}


def _arena_hard_answer(question: dict, answer: list[str], model_name: str) -> dict:
    key = _id_key(question)
    if question.get("format") == "v2.0":
        messages = [{"role": "user", "content": question["turns"][0]},
                    {"role": "assistant", "content": {"answer": answer[0]}}]
        return {key: question["id"], "ans_id": _answer_id(model_name, question["id"]), "model": model_name,
                "messages": messages, "tstamp": time.time()}
    return {key: question["id"], "answer_id": _answer_id(model_name, question["id"]), "model_id": model_name,
            "choices": [{"index": 0, "turns": [{"content": a} for a in answer]}], "tstamp": time.time()}


def _id_key(question: dict) -> str:
    return question.get("id_key", "question_id")


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


# --------------------------------------------------------------------------- sampling


def make_generate_fn(model, tokenizer, *, template: str | None, max_new_tokens: int, temperature: float,
                     top_p: float, batch_size: int, seed: int, kv_cache: str = "auto") -> Callable[[list[list[dict]]], list[str]]:
    """A generate_fn for export(): conversations -> the model's sampled replies (stripped text); template is the
    chat template they are rendered with (None: plain text)."""
    from aligndistil_cli.data.encode import prompt_ids
    from aligndistil_cli.model.sampling import generate

    calls = [0]

    def generate_fn(conversations: list[list[dict]]) -> list[str]:
        # A new seed per call (per turn index): reusing one seed would replay the same
        # random stream for turn 2 as for turn 1, yet reruns stay reproducible.
        call_seed = seed + calls[0]
        calls[0] += 1
        ids = [prompt_ids(tokenizer, conv, template) for conv in conversations]
        samples = generate(model, tokenizer, conversations, ids, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, batch_size=batch_size, seed=call_seed,
                           desc=f"export turn {calls[0]}", kv_cache=kv_cache)
        # Stripped as FastChat and arena-hard strip theirs: stray edge whitespace would
        # otherwise be fed back into turn 2 and shown to the judge.
        return [s.text.strip() for s in samples]

    return generate_fn
