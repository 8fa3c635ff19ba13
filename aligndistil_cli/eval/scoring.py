"""Scorers of sampled responses: the embedded task's gold reward, or a reward model.

Both take Samples (prompt messages + response text) and return one float each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.data import chat, toy
from aligndistil_cli.data.sources import flatten_plain
from aligndistil_cli.model.loading import refuse_pickle_weights
from aligndistil_cli.model.tokenizer_file import as_saved


class ToyScorer:
    """The embedded task's gold reward (toy.gold_reward): a function of the response text."""

    name = column = "toy gold reward"

    def score(self, samples) -> list[float]:
        return [toy.gold_reward(s.text) for s in samples]


class RewardModelScorer:
    """An AutoModelForSequenceClassification with one output, scored on the chat-templated conversation."""

    def __init__(self, path: str | Path, device: torch.device, batch_size: int = 32, chat_template: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from aligndistil_cli.model.loading import quiet_transformers

        quiet_transformers()
        if not Path(path).exists():
            raise UserError(f"reward model {path} does not exist")
        refuse_pickle_weights(path)
        try:
            self.tokenizer = as_saved(AutoTokenizer.from_pretrained(str(path)), str(path))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a reward model from {path}: {str(e).splitlines()[0]}") from None
        if self.model.config.num_labels != 1:
            raise UserError(f"reward model {path} has {self.model.config.num_labels} outputs; a reward model has 1")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.name = f"reward model {path}"
        self.column = f"reward ({Path(path).name})"
        self.batch_size = batch_size
        self.chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: list[dict], response: str) -> str:
        conversation = prompt + [{"role": "assistant", "content": response}]
        if self.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return flatten_plain(conversation)

    @torch.no_grad()
    def score(self, samples) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        self.tokenizer.padding_side = "right"
        for start in range(0, len(samples), self.batch_size):
            texts = [self.render(s.prompt, s.text) for s in samples[start : start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                                 add_special_tokens=not self.chat_template).to(device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def make_scorer(reward_model: str | None, chat_template: str, device: torch.device):
    """--reward-model PATH when given, else the embedded gold reward.

    The reward model reads each conversation in its own tokenizer's chat template, unless --chat-template never:
    it is another model, trained on its own format, whatever the policy's rows were (a FILE is the policy's)."""
    if reward_model:
        return RewardModelScorer(reward_model, device, chat_template=chat.mode_of(chat_template) != "never")
    return ToyScorer()


def refuse_foreign_prompts(prompts: list, source: str) -> None:
    """Without --reward-model the only scorer is the toy gold reward, which means nothing on another task's prompts."""
    known = set(toy.all_prompts())
    for i, prompt in enumerate(prompts, start=1):
        text = flatten_plain(prompt)
        if text not in known:
            raise UserError(f"{source}: prompt {i} ({text[:60]!r}) is not one of the embedded task's, and the toy gold "
                            "reward scores only those; pass a reward model for these prompts: --reward-model PATH "
                            "(an AutoModelForSequenceClassification with one output)")
