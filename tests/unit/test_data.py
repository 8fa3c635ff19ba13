"""Unit tests for aligndistil_cli.data.encode: the shifted response mask, encoding, JSONL validation.

Expected tensors are written out by hand from the mask convention (positions
P-1 .. P+R-2 predict the response); expected token ids come from the toy
vocabulary's word -> id table, never from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import (
    PAIR_FIELDS,
    PROMPT_FIELDS,
    SFT_FIELDS,
    Batch,
    Encoded,
    collate,
    encode,
    encode_pairs,
    encode_rows,
    load_rows,
    response_mask,
)
from aligndistil_cli.data.sources import load_source
from aligndistil_cli.data.toy import vocabulary

BOS, EOS, PAD = 1, 2, 0
VOCAB = vocabulary()


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


# --------------------------------------------------------------------------- mask / collate

# Three examples, different prompt (P) and response (R) lengths; responses end in EOS (2).
#   A: P=3, R=3 -> length 6 (2 padding)
#   B: P=2, R=2 -> length 4 (4 padding)
#   C: P=4, R=4 -> length 8 (no padding: its EOS sits on the last column)
EXAMPLES = [
    Encoded(prompt=[BOS, 10, 11], response=[20, 21, EOS]),
    Encoded(prompt=[BOS, 12], response=[22, EOS]),
    Encoded(prompt=[BOS, 13, 14, 15], response=[23, 24, 25, EOS]),
]
PAD_ID = 99

EXPECTED_INPUT_IDS = [
    [BOS, 10, 11, 20, 21, EOS, PAD_ID, PAD_ID],
    [BOS, 12, 22, EOS, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
    [BOS, 13, 14, 15, 23, 24, 25, EOS],
]
EXPECTED_ATTENTION = [
    [1, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
]
# True at P-1 .. P+R-2: A 2..4, B 1..2, C 3..6.
EXPECTED_MASK = [
    [0, 0, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 0],
]
# The token each masked position predicts (the next input token); 0 elsewhere.
EXPECTED_TARGETS = [
    [0, 0, 20, 21, EOS, 0, 0, 0],
    [0, 22, EOS, 0, 0, 0, 0, 0],
    [0, 0, 0, 23, 24, 25, EOS, 0],
]


def test_response_mask_hand_values():
    mask = response_mask([3, 2, 4], [3, 2, 4], 8)
    assert mask.dtype == torch.bool
    assert mask.shape == (3, 8)
    assert mask.int().tolist() == EXPECTED_MASK


def test_collate_hand_values():
    batch = collate(EXAMPLES, PAD_ID)
    assert isinstance(batch, Batch)
    assert batch.input_ids.tolist() == EXPECTED_INPUT_IDS
    assert batch.attention_mask.tolist() == EXPECTED_ATTENTION
    assert batch.loss_mask.int().tolist() == EXPECTED_MASK
    assert batch.targets.tolist() == EXPECTED_TARGETS
    assert batch.num_positions.tolist() == [3, 2, 4]  # one position per response token, EOS included


@pytest.mark.parametrize("b", range(len(EXAMPLES)))
def test_collate_mask_boundaries(b):
    batch = collate(EXAMPLES, PAD_ID)
    p, r = len(EXAMPLES[b].prompt), len(EXAMPLES[b].response)
    mask = batch.loss_mask[b]
    assert mask[p - 1], "the last prompt position predicts the first response token"
    assert batch.targets[b, p - 1] == EXAMPLES[b].response[0]
    assert mask[p + r - 2], "the position before EOS predicts the EOS"
    assert batch.targets[b, p + r - 2] == EOS
    assert not mask[: p - 1].any(), "prompt positions before P-1 are out"
    assert not mask[p + r - 1 :].any(), "the EOS position itself and all padding are out"
    # attention is exactly the real tokens; the loss never touches padding
    assert batch.attention_mask[b].sum() == p + r
    assert not (batch.loss_mask[b] & (batch.attention_mask[b] == 0)).any()


def test_collate_targets_are_next_tokens_at_masked_positions():
    batch = collate(EXAMPLES, PAD_ID)
    for b, t in batch.loss_mask.nonzero().tolist():
        assert batch.targets[b, t] == batch.input_ids[b, t + 1]
        assert batch.input_ids[b, t + 1] != PAD_ID


def test_collate_truncated_response_without_eos():
    # A response cut at the length cap has no EOS; every response token is still predicted.
    batch = collate([Encoded([BOS, 5], [6, 7])], PAD_ID)
    assert batch.input_ids.tolist() == [[BOS, 5, 6, 7]]
    assert batch.loss_mask.int().tolist() == [[0, 1, 1, 0]]
    assert batch.targets.tolist() == [[0, 6, 7, 0]]


def test_batch_to_keeps_values():
    batch = collate(EXAMPLES, PAD_ID).to("cpu")
    assert batch.input_ids.tolist() == EXPECTED_INPUT_IDS
    assert batch.loss_mask.int().tolist() == EXPECTED_MASK


# --------------------------------------------------------------------------- encode

PROMPT = "we visited on monday . write a review about the pizza and the staff ."  # 15 words
RESPONSE = "the pizza was good ."  # 5 words


def test_encode_special_tokens(toy_tokenizer):
    enc = encode(toy_tokenizer, PROMPT, RESPONSE, max_length=128, max_prompt_length=96)
    assert enc.prompt == [BOS] + ids(PROMPT)
    assert enc.prompt.count(BOS) == 1
    assert enc.response == ids(RESPONSE) + [EOS]
    assert BOS not in enc.response
    assert enc.response.count(EOS) == 1


def test_encode_prompt_exactly_at_limit_is_untouched(toy_tokenizer):
    enc = encode(toy_tokenizer, PROMPT, RESPONSE, max_length=128, max_prompt_length=16)  # BOS + 15 words
    assert enc.prompt == [BOS] + ids(PROMPT)


def test_encode_left_truncates_prompt_keeping_bos(toy_tokenizer):
    enc = encode(toy_tokenizer, PROMPT, RESPONSE, max_length=128, max_prompt_length=5)
    # BOS + the LAST four words of the prompt
    assert enc.prompt == [BOS] + ids("and the staff .")
    assert len(enc.prompt) == 5
    assert enc.response == ids(RESPONSE) + [EOS]


def test_encode_right_truncates_response_to_fit(toy_tokenizer):
    # prompt 5 tokens, max_length 8 -> 3 response tokens, cut from the right (EOS lost)
    enc = encode(toy_tokenizer, PROMPT, RESPONSE, max_length=8, max_prompt_length=5)
    assert enc.prompt == [BOS] + ids("and the staff .")
    assert enc.response == ids("the pizza was")
    assert len(enc.prompt) + len(enc.response) == 8


def test_encode_response_fits_exactly(toy_tokenizer):
    # 16 prompt tokens + 6 response tokens (5 words + EOS) = 22
    enc = encode(toy_tokenizer, PROMPT, RESPONSE, max_length=22, max_prompt_length=16)
    assert enc.response == ids(RESPONSE) + [EOS]


# --------------------------------------------------------------------------- load_rows

GOOD_PAIR = {"prompt": "p one", "chosen": "c one", "rejected": "r one"}


def test_load_rows_valid_and_blank_lines_skipped(write_jsonl):
    path = write_jsonl([
        GOOD_PAIR,
        "",
        "   ",
        {"prompt": "p two", "chosen": "caf\u00e9 \u2615", "rejected": "r two", "extra": 7},
    ])
    rows = load_rows(path, PAIR_FIELDS)
    assert rows == [
        GOOD_PAIR,
        {"prompt": "p two", "chosen": "caf\u00e9 \u2615", "rejected": "r two"},
    ]


def test_load_rows_accepts_str_path_and_other_field_sets(write_jsonl):
    path = write_jsonl([{"prompt": "a b", "response": "c d"}])
    assert load_rows(str(path), SFT_FIELDS) == [{"prompt": "a b", "response": "c d"}]
    assert load_rows(path, PROMPT_FIELDS) == [{"prompt": "a b"}]


def _error(path, fields=PAIR_FIELDS) -> str:
    with pytest.raises(UserError) as e:
        load_rows(path, fields)
    assert e.value.exit_code == 1
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "bad_line, field, words",
    [
        ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
        ({"prompt": 5, "chosen": "c", "rejected": "r"}, "prompt", "expected a string, got int"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "expected a string"),
        ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "chosen", "expected a string, got list"),
        ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "empty"),
        ({"prompt": " \t ", "chosen": "c", "rejected": "r"}, "prompt", "empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ],
)
def test_load_rows_field_errors(write_jsonl, bad_line, field, words):
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad
    path = write_jsonl([GOOD_PAIR, "", GOOD_PAIR, bad_line])
    message = _error(path)
    assert str(path) in message
    assert "row 4" in message
    assert repr(field) in message
    assert words in message


@pytest.mark.parametrize(
    "bad_line, words",
    [
        ('{"prompt": "p", "chosen": ', "invalid JSON"),
        ("not json at all", "invalid JSON"),
        (b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}', "UTF-8"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
    ],
)
def test_load_rows_line_errors(write_jsonl, bad_line, words):
    path = write_jsonl([GOOD_PAIR, GOOD_PAIR, bad_line, GOOD_PAIR])
    message = _error(path)
    assert str(path) in message
    assert "row 3" in message
    assert words in message


def test_load_rows_error_on_first_line(write_jsonl):
    path = write_jsonl(["{oops"])
    message = _error(path)
    assert f"{path}, row 1" in message


def test_load_rows_nonexistent_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    message = _error(path)
    assert str(path) in message
    assert "does not exist" in message


@pytest.mark.parametrize("content", [b"", b"\n\n   \n"])
def test_load_rows_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    message = _error(path)
    assert str(path) in message
    assert "no rows" in message


# --------------------------------------------------------------------------- issue 12: encoding failures and counts


def _config(**overrides):
    return types.SimpleNamespace(**{"max_length": 32, "max_prompt_length": 16, "chat_template": True,
                                    "skip_bad_rows": False, "refuse_special_tokens": False, **overrides})


def _with_template(template: str):
    from aligndistil_cli.data.toy import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = template
    return tok


# Renders a final user turn that mentions "friday" with a leading "bad" only when nothing follows it, so for
# those rows the rendered prompt is not a prefix of prompt + response; other rows render consistently.
ODD_TEMPLATE = ("{% for m in messages %}{% if loop.last and m['role'] == 'user' and 'friday' in m['content'] %}"
                "bad {% endif %}{{ m['content'] }} {% endfor %}")


def _pair(prompt: str, chosen: str = "good", rejected: str = "bad") -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def test_template_failure_names_the_file_and_line_and_is_skippable(tmp_path):
    (tmp_path / "a.jsonl").write_text(_pair("i liked it") + "\n" + _pair("i hated it") + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join([_pair("i liked the movie"), "", "", "", _pair("i liked friday"), _pair("i liked it", "")]))
    with pytest.raises(UserError, match=f"^{b}, row 6, field 'chosen': empty$"):
        load_source(str(tmp_path), kind="pairs")
    b.write_text(b.read_text().rsplit("\n", 1)[0] + "\n")  # without the empty row: the template check fails
    rows, stats = load_source(str(tmp_path), kind="pairs")
    with pytest.raises(UserError, match=f"^{b}, row 5, field 'chosen': the chat template does not render the prompt"):
        encode_pairs(_with_template(ODD_TEMPLATE), rows, _config(chat_template="always"), dataclasses.asdict(stats))
    b.write_text(b.read_text() + _pair("i liked it", "") + "\n")
    rows, stats = load_source(str(tmp_path), kind="pairs", skip_bad_rows=True)
    summary = dataclasses.asdict(stats)
    pairs, _ = encode_pairs(_with_template(ODD_TEMPLATE), rows, _config(chat_template="always", skip_bad_rows=True),
                            summary)
    assert len(pairs) == 3
    assert (summary["read"], summary["kept"]) == (5, 3)
    assert summary["dropped"] == {"empty": 1, "template_not_prefix": 1}


def test_template_raise_exception_is_a_row_error(write_jsonl):
    template = ("{% for m in messages %}{% if 'monday' in m['content'] %}{{ raise_exception('no mondays') }}"
                "{% endif %}{{ m['content'] }} {% endfor %}")
    path = write_jsonl([{"prompt": "i liked it", "response": "good"}, {"prompt": "q", "response": "monday"}])
    rows, stats = load_source(str(path), kind="sft")
    with pytest.raises(UserError, match=f"^{path}, row 2, field 'response': the chat template refused .*no mondays"):
        encode_rows(_with_template(template), rows, "response", _config(chat_template="always"),
                    dataclasses.asdict(stats))


def test_truncated_counts_pairs_not_sequences(toy_tokenizer, write_jsonl):
    long = " ".join(["good"] * 40)
    path = write_jsonl([{"prompt": "i liked it", "chosen": long, "rejected": long + " bad"},
                        {"prompt": "i liked it", "chosen": "good", "rejected": "bad"}])
    rows, stats = load_source(str(path), kind="pairs")
    pairs, truncated = encode_pairs(toy_tokenizer, rows, _config(), dataclasses.asdict(stats))
    assert len(pairs[0][0].prompt + pairs[0][0].response) == 32 and len(pairs[0][1].response) == 32 - 4
    assert truncated == 1  # one pair (row), although both of its sequences were cut


def test_manifest_records_whether_a_chat_template_was_used(toy_tokenizer, write_jsonl):
    path = write_jsonl([{"prompt": "i liked it", "response": "good"}])
    rows, stats = load_source(str(path), kind="sft")
    without = dataclasses.asdict(stats)
    encode_rows(toy_tokenizer, rows, "response", _config(chat_template=True), without)
    assert without["chat_template_used"] is False  # the toy tokenizer has none
    plain = dataclasses.asdict(stats)
    encode_rows(_with_template(ODD_TEMPLATE), rows, "response", _config(chat_template="auto"), plain)
    assert (plain["chat_template_used"], plain["templated_rows"]) == (False, 0)  # a string row stays plain text
    with_template = dataclasses.asdict(stats)
    encode_rows(_with_template(ODD_TEMPLATE), rows, "response", _config(chat_template="always"), with_template)
    assert (with_template["chat_template_used"], with_template["chat_template_mode"]) == (True, "always")


def test_special_token_text_is_counted_warned_and_refusable(toy_tokenizer, write_jsonl, capsys):
    path = write_jsonl([{"prompt": "i liked it", "response": "good"},
                        {"prompt": "i liked it <eos> also", "response": "good"}])
    rows, stats = load_source(str(path), kind="sft")
    summary = dataclasses.asdict(stats)
    examples, _ = encode_rows(toy_tokenizer, rows, "response", _config(), summary)
    assert summary["special_token_rows"] == 1 and len(examples) == 2
    assert EOS in examples[1].prompt  # what the warning is about: the text became the control token
    err = capsys.readouterr().err
    assert "warning" in err and f"{path}, row 2, field 'prompt'" in err and "'<eos>'" in err
    with pytest.raises(UserError, match=f"^{path}, row 2, field 'prompt': message 1 contains the special token '<eos>'"):
        encode_rows(toy_tokenizer, rows, "response", _config(refuse_special_tokens=True), dataclasses.asdict(stats))
    summary = dataclasses.asdict(stats)
    examples, _ = encode_rows(toy_tokenizer, rows, "response", _config(refuse_special_tokens=True, skip_bad_rows=True),
                              summary)
    assert len(examples) == 1 and summary["dropped"] == {"special_token": 1} and summary["kept"] == 1


def test_prompts_that_cannot_be_rendered_name_their_row_and_are_skippable(write_jsonl):
    from aligndistil_cli.data.encode import encode_prompts

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                "{% endif %}{{ m['content'] }} {% endfor %}")
    path = write_jsonl([{"prompt": "i liked it"}, "", {"prompt": [{"role": "system", "content": "x"},
                                                                  {"role": "user", "content": "i hated it"}]},
                        {"prompt": "i <eos> it"}])
    rows, stats = load_source(str(path), kind="prompts")
    with pytest.raises(UserError, match=f"^{path}, row 3, field 'prompt': the chat template refused .*no system turns"):
        encode_prompts(_with_template(template), rows, _config(), dataclasses.asdict(stats))
    summary = dataclasses.asdict(stats)
    kept, ids = encode_prompts(_with_template(template), rows, _config(skip_bad_rows=True), summary)
    # Row 1 is a string: plain text, with the tokenizer's BOS, not the template (which row 3, a conversation, gets).
    assert kept == [rows[0], rows[2]] and ids[0] == [VOCAB["<bos>"], VOCAB["i"], VOCAB["liked"], VOCAB["it"]]
    assert (summary["kept"], summary["dropped"], summary["special_token_rows"]) == (2, {"template_error": 1}, 1)
