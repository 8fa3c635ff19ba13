"""Issue 24: a real tokenizer through the CLI chain train-dpo -> train-reverse-dpo -> precompute -> distill -> evaluate.

The tokenizer is Mistral-7B-Instruct-v0.3's SentencePiece model (32,768 pieces, with [INST] and [/INST] as
control tokens), which the mistral-common wheel ships as package data; a <pad> token is added, as fine-tuning
recipes do, and a Mistral chat template. The model is a random-weight Llama saved with save_pretrained, with
the real vocabulary padded to a multiple of 64 (32,769 tokens, 32,832 embedding rows). Its output rows past
the tokenizer are made loud (logits around ±15 against ±0.1 for real tokens), so that a padding row that
entered any softmax would take nearly all the probability and show.

The data mixes string rows and conversational rows. Templating is asserted on the conversational rows
only: string rows may be templated or plain text (--chat-template auto), so for them only what holds
either way is asserted (one BOS, the response ends in EOS and decodes back to its text).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aligndistil_cli.cli import main
from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import PrecomputeConfig
from aligndistil_cli.data.encode import collate, encode_pairs, load_data
from aligndistil_cli.model.loading import load_tokenizer
from aligndistil_cli.teacher.cache import TeacherCache
from aligndistil_cli.teacher.compose import logq_fn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mistral_common") is None or importlib.util.find_spec("sentencepiece") is None,
    reason="needs mistral-common[sentencepiece] (in the test extra, Python >= 3.11): it ships the real tokenizer")

SPM_FILE = "mistral_instruct_tokenizer_240323.model.v3"
# Mistral-7B-Instruct-v0.1's template: BOS once, [INST] ... [/INST] around user turns, EOS after each answer.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Agrees with the SentencePiece model itself (the HF conversion differs from it on repeated whitespace only).
TEXT = "The quick brown fox jumps over 12345 lazy dogs. Ünïcödé, 你好!"
ROWS = 32832


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


STRING_ROWS = [
    {"prompt": "Name a colour of the sky.", "chosen": "Blue, on a clear day.", "rejected": "Green."},
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five, probably."},
    {"prompt": "Say hello in French.", "chosen": "Bonjour !", "rejected": "Hola."},
]
CONVERSATIONAL_ROWS = [
    {"prompt": [user("Give me a fruit.")], "chosen": [assistant("An apple.")], "rejected": [assistant("A chair.")]},
    {"prompt": [user("Hi!"), assistant("Hello, how can I help?"), user("Tell me a short joke.")],
     "chosen": [assistant("Why did the chicken cross the road? To get to the other side.")],
     "rejected": [assistant("No.")]},
    {"prompt": [user("Translate 'cat' to German.")], "chosen": [assistant("Katze.")], "rejected": [assistant("Hund.")]},
]


def spm_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SPM_FILE
    assert path.is_file(), f"mistral-common no longer ships data/{SPM_FILE}; pin a version that does"
    return path


def build_tokenizer(workdir: Path):
    from transformers import LlamaTokenizerFast

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_model(), workdir / "tokenizer.model")
    tok = LlamaTokenizerFast.from_pretrained(str(workdir), add_bos_token=True, add_eos_token=False, padding_side="left")
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def save_models(root: Path) -> Path:
    """A random Llama and a reward model (one output) next to the tokenizer; returns the Llama's directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = build_tokenizer(root / "spm")
    assert len(tok) == 32769 and ROWS == -(-len(tok) // 64) * 64
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = torch.randn(ROWS - len(tok), cfg.hidden_size)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root / "base"


def cli(*argv) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code in (0, None), f"aligndistil {argv[0]} exited with {e.value.code}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real-tokenizer")
    base = save_models(root)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in STRING_ROWS + CONVERSATIONAL_ROWS))
    lengths = ["--max-length", 64, "--max-prompt-length", 48, "--device", "cpu"]
    train = ["--batch-size", 2, "--max-steps", 2, "--lr", 1e-3, *lengths]
    cli("train-dpo", "--model", base, "--data", data, "--ref-cache", root / "ref", "--out", root / "dpo", *train)
    cli("train-reverse-dpo", "--model", base, "--data", data, "--ref-cache", root / "ref", "--out", root / "rev", *train)
    cli("precompute", "--dpo", root / "dpo", "--rev", root / "rev", "--data", data, "--out", root / "teacher", *lengths)
    cli("distill", "--student", base, "--cache", root / "teacher", "--data", data, "--out", root / "student", *train)
    cli("evaluate", "--ref", base, "--model", f"dpo={root / 'dpo'}", "--model", f"student={root / 'student'}",
        "--teacher", root / "teacher", "--pairs", data, "--dpo", root / "dpo", "--rev", root / "rev",
        "--prompts", data, "--reward-model", root / "rm", "--max-new-tokens", 8, "--out", root / "eval", *lengths)
    return root


def test_saved_tokenizers_round_trip_as_the_sentencepiece_model(chain):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model()))
    for name in ("base", "dpo", "rev", "student"):
        tok = AutoTokenizer.from_pretrained(chain / name)
        assert type(tok).__name__.startswith("LlamaTokenizer"), name
        assert tok(TEXT).input_ids == [sp.bos_id()] + sp.encode(TEXT), name
        assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) == TEXT
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
        assert tok.convert_tokens_to_ids(["[INST]", "[/INST]"]) == [sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")]
        assert (len(tok), tok.pad_token, tok.pad_token_id) == (32769, "<pad>", 32768)
        assert tok.padding_side == "left" and tok.chat_template == MISTRAL_TEMPLATE


def test_next_to_a_qwen2_config_it_still_encodes_as_saved(chain, tmp_path):
    """transformers 5 loads it as Qwen2Tokenizer there, with Qwen2's pre-tokeniser (tokenizer_file.as_saved)."""
    import sentencepiece
    from transformers import Qwen2Config

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model()))
    Qwen2Config(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(tmp_path)
    for file in (chain / "base").iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, tmp_path / file.name)
    tok = load_tokenizer(tmp_path)
    assert tok(TEXT).input_ids == [sp.bos_id()] + sp.encode(TEXT)
    assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) == TEXT
    assert (tok.pad_token, tok.chat_template) == ("<pad>", MISTRAL_TEMPLATE)


def encoded_pairs(chain: Path):
    """The (chosen, rejected) examples precompute encoded, read with its recorded config."""
    config = load_config(PrecomputeConfig, None, json.loads((chain / "teacher" / "stage_config.json").read_text()))
    tok = load_tokenizer(chain / "dpo")
    rows, stats = load_data(config, "pairs")
    return tok, encode_pairs(tok, rows, config, stats)[0]


def test_special_tokens_and_the_chat_template(chain):
    tok, pairs = encoded_pairs(chain)
    rows = STRING_ROWS + CONVERSATIONAL_ROWS
    assert len(pairs) == len(rows)
    for row, examples in zip(rows, pairs):
        for example, key in zip(examples, ("chosen", "rejected")):
            ids = example.prompt + example.response
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, "one BOS, never doubled"
            assert example.response[-1] == tok.eos_token_id and example.response.count(tok.eos_token_id) == 1
            text = row[key] if isinstance(row[key], str) else row[key][0]["content"]
            assert tok.decode(example.response[:-1]).strip() == text
            if isinstance(row["prompt"], str):
                continue
            # Conversational rows are rendered by the template, tokenised as transformers tokenises a chat.
            prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
            full = tok.apply_chat_template(row["prompt"] + row[key], return_dict=True)["input_ids"]
            assert (example.prompt, example.response) == (prompt, full[len(prompt):])
            turns = sum(m["role"] == "user" for m in row["prompt"])
            assert example.prompt.count(tok.convert_tokens_to_ids("[INST]")) == turns
            assert example.prompt[-1] == tok.convert_tokens_to_ids("[/INST]")
    manifest = json.loads((chain / "dpo" / "manifest.json").read_text())
    assert manifest["metrics"]["data"]["chat_template_used"] is True


def test_loss_mask_starts_at_the_first_response_token(chain):
    tok, pairs = encoded_pairs(chain)
    chosen = [c for c, _ in pairs]
    batch = collate(chosen, tok.pad_token_id)
    for b, example in enumerate(chosen):
        p, r = len(example.prompt), len(example.response)
        assert batch.loss_mask[b].nonzero().flatten().tolist() == list(range(p - 1, p + r - 1))
        assert batch.targets[b, p - 1] == example.response[0] and batch.targets[b, p + r - 2] == tok.eos_token_id
        assert batch.input_ids[b, p + r:].eq(tok.pad_token_id).all(), "right-padded whatever the tokenizer's side"
    # The cache holds exactly those positions per row, first response token and EOS included.
    cache = TeacherCache(chain / "teacher")
    assert [cache.fetch([i])["tvd"].numel() for i in range(len(chosen))] == [len(e.response) for e in chosen]


def full_logits(model_dir: Path, ids: list[int], vocab: int) -> torch.Tensor:
    """[len(ids), vocab] float64 logits of one unpadded row, from one plain forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, :, :vocab].double()


def test_padding_rows_get_no_probability_in_the_teacher_cache(chain):
    tok, pairs = encoded_pairs(chain)
    cache = TeacherCache(chain / "teacher")
    assert cache.index["vocab_size"] == len(tok) < ROWS
    with safe_open(str(chain / "teacher" / "heads.safetensors"), framework="pt") as f:
        assert f.get_slice("dpo.weight").get_shape()[0] == ROWS, "the heads keep their padding rows"
    heads = cache.heads(torch.device("cpu"))
    for i in (0, 4):  # a string row, and the multi-turn conversation
        fields = cache.fetch([i])
        n = fields["tvd"].numel()
        logq = logq_fn("hidden", fields, heads, cache.spec, len(tok), torch.device("cpu"))(0, n).double()
        assert logq.shape == (n, len(tok))
        torch.testing.assert_close(logq.logsumexp(-1), torch.zeros(n, dtype=torch.float64), atol=1e-5, rtol=0)
        # The paper's teacher over the real tokens only, in float64, from unpadded forwards of the row alone.
        example = pairs[i][0]
        ids, p = example.prompt + example.response, len(example.prompt)
        at = slice(p - 1, p - 1 + n)
        z_dpo, z_rev = (full_logits(chain / m, ids, len(tok))[at] for m in ("dpo", "rev"))
        tvd = 0.5 * (z_dpo.softmax(-1) - z_rev.softmax(-1)).abs().sum(-1)
        expected = torch.log_softmax(z_dpo + (20 * tvd + 1e-3).unsqueeze(-1) * (z_dpo - z_rev), -1)
        torch.testing.assert_close(fields["tvd"].double(), tvd, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logq, expected, atol=1e-4, rtol=1e-4)


def test_padding_rows_are_never_trained(chain):
    def padding_rows(name: str) -> torch.Tensor:
        with safe_open(str(chain / name / "model.safetensors"), framework="pt") as f:
            return f.get_tensor("lm_head.weight")[32769:]

    for name in ("dpo", "rev", "student"):
        assert torch.equal(padding_rows(name), padding_rows("base")), f"{name} moved rows past the tokenizer"


def test_evaluate_generations_decode_to_text(chain):
    report = json.loads((chain / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"reference", "dpo", "student", "teacher"}
    for name, result in report["models"].items():
        assert 0 < result["length"]["mean"] <= 8, name
        assert result["reward"]["n"] == len(STRING_ROWS + CONVERSATIONAL_ROWS)
        for example in result["examples"]:
            assert isinstance(example["response"], str) and example["response"].strip(), (name, example)
            assert not any(t in example["response"] for t in ("<s>", "</s>", "<pad>", "[INST]", "[/INST]"))
    assert report["implicit_accuracy"]["num_pairs"] == len(STRING_ROWS + CONVERSATIONAL_ROWS)
