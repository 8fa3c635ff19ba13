"""A tiny chat model (byte-level BPE + ChatML template) through DPO, precompute and distill on UltraFeedback rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from pathlib import Path

import pytest
import torch

from aligndistil_cli.config.stages import DistillConfig, DpoConfig, PrecomputeConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data.encode import encode_messages
from aligndistil_cli.stages import distill, dpo, precompute

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sources" / "ultrafeedback.jsonl"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(template: str = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = [m["content"] for line in FIXTURE.read_text().splitlines() for key in ("chosen", "rejected")
            for m in json.loads(line)[key]] + ["user assistant system"]
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)


def save_chat_model(path: Path, template: str = CHATML) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(template)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 11, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    base = save_chat_model(root / "base")
    common = dict(model=str(base), data=str(FIXTURE), max_steps=2, batch_size=2, max_length=64, max_prompt_length=48,
                  lr=1e-3, ref_cache=str(root / "ref-cache"))
    dpo.run(DpoConfig(out=str(root / "dpo"), **common))
    dpo.run(DpoConfig(out=str(root / "rev"), reverse=True, **common))
    return root


def test_saved_chat_model_round_trips(chat):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat / "dpo")
    reference = build_tokenizer()
    text = "<|im_start|>user\nName a colour.<|im_end|>\n"
    assert tok(text).input_ids == reference(text).input_ids and tok(text).input_ids
    assert tok.chat_template == CHATML


def test_template_rendering_is_a_prefix_and_ends_at_eos(chat):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat / "base")
    prompt = [{"role": "user", "content": "Name a colour."}]
    example, cut = encode_messages(tok, prompt, [{"role": "assistant", "content": "Blue."}], 64, 48, tok.chat_template)
    assert not cut
    assert tok.decode(example.prompt) == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(example.response) == "Blue.<|im_end|>", "the newline the template adds after EOS is not trained"
    assert example.response[-1] == tok.eos_token_id


def test_ultrafeedback_rows_train_through_precompute_and_distill(chat):
    manifest = json.loads((chat / "dpo" / "manifest.json").read_text())
    assert manifest["metrics"]["data"]["format"] == "ultrafeedback"
    assert manifest["metrics"]["data"]["kept"] == 3
    cache = precompute.run(PrecomputeConfig(out=str(chat / "teacher"), dpo=str(chat / "dpo"), rev=str(chat / "rev"),
                                            data=str(FIXTURE), format="hidden", max_length=64, max_prompt_length=48))
    out = distill.run(DistillConfig(out=str(chat / "student"), student=str(chat / "base"), cache=str(cache),
                                    data=str(FIXTURE), max_steps=2, batch_size=2, max_length=64, max_prompt_length=48))
    *steps, final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and final["step"] == 2 and final["final_kl_teacher"] >= 0


def test_mismatched_tokenizers_are_refused_by_part(chat, tmp_path):
    other = save_chat_model(tmp_path / "other", CHATML.replace("<|im_start|>assistant\n{% endif %}",
                                                               "<|im_start|>assistant\n\n{% endif %}"))
    with pytest.raises(UserError, match="differs .* in: chat template"):
        precompute.run(PrecomputeConfig(out=str(tmp_path / "t"), dpo=str(chat / "dpo"), rev=str(other),
                                        data=str(FIXTURE), max_length=64, max_prompt_length=48))


def test_a_non_prefix_chat_template_is_refused(chat, tmp_path):
    bad = save_chat_model(tmp_path / "bad", CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant",
                                                           "{% if add_generation_prompt %}<|im_start|>bot"))
    with pytest.raises(UserError, match="prefix"):
        dpo.run(DpoConfig(out=str(tmp_path / "d"), model=str(bad), data=str(FIXTURE), max_steps=1, batch_size=2,
                          max_length=64, max_prompt_length=48))
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_rows_cut_by_truncation_are_counted(chat, tmp_path):
    out = dpo.run(DpoConfig(out=str(tmp_path / "d"), model=str(chat / "base"), data=str(FIXTURE), max_steps=1,
                            batch_size=2, max_length=14, max_prompt_length=10, ref_cache=str(tmp_path / "rc")))
    assert json.loads((out / "manifest.json").read_text())["metrics"]["truncated"] > 0


def test_no_template_renders_plain_text(chat):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat / "base")
    example, _ = encode_messages(tok, [{"role": "user", "content": "Name a colour."}],
                                 [{"role": "assistant", "content": "Blue."}], 64, 48, template=None)
    assert "<|im_start|>" not in tok.decode(example.prompt)
    assert example.response[-1] == tok.eos_token_id


# --------------------------------------------------------------------------- --chat-template auto|always|never|FILE

PROMPT, RESPONSE = "Name a colour.", "Blue."
CHATML_PROMPT = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
# Another layout, so a FILE template shows in the rendered text.
BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _rows(tmp_path: Path):
    """Row 1 plain strings, row 2 the same exchange as messages (both read as the sft layout)."""
    from aligndistil_cli.data.sources import load_source

    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "response": RESPONSE}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": PROMPT}], "response": [{"role": "assistant", "content": RESPONSE}]})
        + "\n")
    rows, stats = load_source(str(path), kind="sft")
    return rows, dataclasses.asdict(stats)


def _encode(tok, rows, stats, mode: str) -> list[tuple[str, str]]:
    """(prompt text, response text) of each row as encode_rows tokenised it under --chat-template mode."""
    from aligndistil_cli.data.encode import encode_rows

    config = types.SimpleNamespace(max_length=64, max_prompt_length=48, chat_template=mode, skip_bad_rows=False,
                                   refuse_special_tokens=False)
    examples, _ = encode_rows(tok, rows, "response", config, stats)
    return [(tok.decode(e.prompt), tok.decode(e.response)) for e in examples]


def test_auto_keeps_string_rows_plain_and_templates_conversational_rows(tok, tmp_path):
    rows, stats = _rows(tmp_path)
    assert [r.conversational for r in rows] == [False, True]
    assert _encode(tok, rows, stats, "auto") == [(PROMPT, RESPONSE + "<|im_end|>"),
                                                 (CHATML_PROMPT, RESPONSE + "<|im_end|>")]
    assert (stats["chat_template_mode"], stats["chat_template_used"], stats["templated_rows"]) == ("auto", True, 1)
    assert _encode(tok, rows, stats, "True") == _encode(tok, rows, stats, "auto")  # YAML's `chat_template: true`


def test_always_templates_string_rows_as_a_user_and_an_assistant_turn(tok, tmp_path):
    rows, stats = _rows(tmp_path)
    assert _encode(tok, rows, stats, "always") == [(CHATML_PROMPT, RESPONSE + "<|im_end|>")] * 2
    assert (stats["chat_template_mode"], stats["templated_rows"]) == ("always", 2)


def test_a_template_file_replaces_the_tokenizers_for_conversational_rows(tok, tmp_path):
    rows, stats = _rows(tmp_path)
    template = tmp_path / "brackets.jinja"
    template.write_text(BRACKETS)
    assert _encode(tok, rows, stats, str(template)) == [(PROMPT, RESPONSE + "<|im_end|>"),
                                                        (f"[user] {PROMPT}\n[assistant] ", RESPONSE + "\n<|im_end|>")]
    assert stats["chat_template_mode"] == "file" and stats["chat_template_file"] == str(template)
    assert stats["chat_template_sha256"] == hashlib.sha256(BRACKETS.encode()).hexdigest()


def test_never_reads_conversational_rows_as_plain_text_and_says_so(tok, tmp_path, capsys):
    rows, stats = _rows(tmp_path)
    assert _encode(tok, rows, stats, "never") == [(PROMPT, RESPONSE + "<|im_end|>")] * 2
    assert (stats["chat_template_mode"], stats["chat_template_used"], stats["templated_rows"]) == ("never", False, 0)
    assert "1 conversational rows read as plain text" in capsys.readouterr().err
    assert _encode(tok, rows, stats, "False") == _encode(tok, rows, stats, "never")  # YAML's `chat_template: false`


def test_always_without_a_template_and_an_unknown_mode_are_one_line_errors(toy_tokenizer, tmp_path):
    from aligndistil_cli.core.errors import ConfigError
    from aligndistil_cli.data import chat

    with pytest.raises(UserError, match="^--chat-template always: the tokenizer of .* has no chat template; pass"):
        chat.resolve(toy_tokenizer, "always")
    with pytest.raises(ConfigError, match="must be auto, always, never or an existing Jinja template file; got 'alway'"):
        chat.check("alway")


def test_make_prefs_writes_pairs_in_the_layout_of_their_prompt():
    from aligndistil_cli.stages.make_prefs import as_row

    pair = {"prompt": [{"role": "user", "content": PROMPT}], "chosen": "Blue.", "rejected": "Red."}
    assert as_row(pair, conversational=False) == {**pair, "prompt": PROMPT}
    assert as_row(pair, conversational=True) == {**pair, "chosen": [{"role": "assistant", "content": "Blue."}],
                                                 "rejected": [{"role": "assistant", "content": "Red."}]}
