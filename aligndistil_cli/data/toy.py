"""The embedded default task: short restaurant/film reviews with a readable gold reward.

A prompt asks for a review of two things, e.g.
    "we visited on monday . write a review about the pizza and the staff ."
and a response is one to four short sentences ending in EOS, e.g.
    "the pizza was very good . i did not like the staff ."

Gold reward (what a person would call the sentiment of the response):
  * every sentiment word has a value: great/excellent/loved +2, good/nice/tasty/liked +1,
    bland/bad/disliked -1, awful/terrible/hated -2; other words are 0;
  * "very" right before a sentiment word doubles it;
  * "not" earlier in the same sentence flips the sign and halves it
    ("not bad" = +0.5, "not great" = -1);
  * each sentence's total is clipped to [-2, 2], and the reward is the mean over
    sentences, so it lies in [-2, 2] and a longer answer is not a better one.
Text after the last "." counts as a sentence too, so an answer cut off at the
length cap is scored on what it says.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
ITEMS = [
    "pizza", "pasta", "soup", "coffee", "dessert", "bread", "staff", "service",
    "music", "movie", "plot", "actors", "ending", "room", "view", "price",
]
SENTIMENT = {
    "great": 2.0, "excellent": 2.0, "loved": 2.0,
    "good": 1.0, "nice": 1.0, "tasty": 1.0, "liked": 1.0, "like": 1.0,
    "bland": -1.0, "bad": -1.0, "disliked": -1.0,
    "awful": -2.0, "terrible": -2.0, "hated": -2.0,
}
ADJECTIVES = ["great", "excellent", "good", "nice", "tasty", "okay", "bland", "bad", "awful", "terrible"]
VERBS = ["loved", "liked", "disliked", "hated"]
FUNCTION_WORDS = [
    "we", "visited", "on", "write", "a", "review", "about", "the", "and", ".", "was", "not",
    "very", "i", "did", "it", "will", "come", "back", "also", "but", "overall",
]
WORDS = FUNCTION_WORDS + DAYS + ITEMS + ADJECTIVES + VERBS + ["like"]
MAX_SENTENCE_SCORE = 2.0


def vocabulary() -> dict[str, int]:
    """Token -> id; special tokens first so pad=0, bos=1, eos=2, unk=3."""
    ordered = SPECIAL_TOKENS + sorted(set(WORDS))
    return {tok: i for i, tok in enumerate(ordered)}


def build_tokenizer():
    """A word-level Hugging Face fast tokenizer for the task (adds BOS, never EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece with cleanup off is a plain " ".join of the tokens: decode(encode(s)) == s.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def gold_reward(text: str) -> float:
    """The task's gold reward of a response (see the module docstring), in [-2, 2]."""
    sentences = [s.split() for s in text.replace("<eos>", " ").split(".")]
    sentences = [s for s in sentences if s]
    if not sentences:
        return 0.0
    total = 0.0
    for words in sentences:
        score, negated = 0.0, False
        for i, word in enumerate(words):
            if word == "not":
                negated = True
                continue
            value = SENTIMENT.get(word, 0.0)
            if value and i > 0 and words[i - 1] == "very":
                value *= 2.0
            if value and negated:
                value *= -0.5
            score += value
        total += max(-MAX_SENTENCE_SCORE, min(MAX_SENTENCE_SCORE, score))
    return total / len(sentences)


def make_prompt(day: str, first: str, second: str) -> str:
    return f"we visited on {day} . write a review about the {first} and the {second} ."


def all_prompts() -> list[str]:
    return [make_prompt(d, a, b) for d in DAYS for a in ITEMS for b in ITEMS if a != b]


def split_prompts(seed: int = 0, heldout_fraction: float = 0.35) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the 1,680 prompts."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    cut = int(len(prompts) * (1 - heldout_fraction))
    return prompts[:cut], prompts[cut:]


def _sentence(rng: random.Random, item: str) -> str:
    form = rng.randrange(6)
    adj = rng.choice(ADJECTIVES)
    very = "very " if rng.random() < 0.3 else ""
    if form == 0:
        return f"the {item} was {very}{adj} ."
    if form == 1:
        return f"the {item} was not {very}{adj} ."
    if form == 2:
        return f"i {rng.choice(VERBS)} the {item} ."
    if form == 3:
        return f"i did not like the {item} ."
    if form == 4:
        return f"overall it was {very}{adj} ."
    return rng.choice(["i will come back .", "i will not come back .", f"we also visited on {rng.choice(DAYS)} ."])


def sample_response(rng: random.Random, prompt: str) -> str:
    """A grammatical response to a prompt: 1-4 sentences about its two items."""
    words = prompt.split()
    first, second = words[-5], words[-2]
    sentences = [_sentence(rng, first)]
    for _ in range(rng.randrange(4)):
        sentences.append(_sentence(rng, rng.choice([first, second, second])))
    return " ".join(sentences)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sft_rows(prompts: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": p, "response": sample_response(rng, p)} for p in (rng.choice(prompts) for _ in range(n))]


def model_config(vocab_size: int, hidden_size: int, layers: int, heads: int, intermediate_size: int, pad_to: int):
    """A small Llama config whose embedding is padded past the tokenizer, as real models are."""
    from transformers import LlamaConfig

    vocab = vocabulary()
    padded = ((vocab_size + pad_to - 1) // pad_to) * pad_to
    if padded == vocab_size:
        padded += pad_to
    return LlamaConfig(
        vocab_size=padded,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
