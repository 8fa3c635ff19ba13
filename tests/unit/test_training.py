"""The shared training loop: the non-finite guard, checkpoints and length grouping."""

from __future__ import annotations

import json

import pytest
import torch

from aligndistil_cli.config.stages import SftConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.parallel.distributed import micro_batches
from aligndistil_cli.train import checkpoint
from aligndistil_cli.train.loop import MetricsWriter, group_by_length, train


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 1))


def nan_at(bad_steps: set[int], model):
    """A loss that is finite except at the given (1-based) steps."""
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        loss = model(torch.ones(len(batch), 3)).pow(2).mean()
        return (loss * float("nan") if calls["n"] in bad_steps else loss), {}

    return loss_fn


def config(tmp_path, **kw):
    return SftConfig(out=str(tmp_path), model="m", data="d", save_every=2, lr=1e-2, **kw)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(UserError, match=r"non-finite loss at step 5.*step-00000004.*is intact"):
        train(model, iter([[0, 1]] * 8), 8, nan_at({5}, model), config(tmp_path), tmp_path, "t")
    assert checkpoint.latest(tmp_path).name == "step-00000004"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_skip_nonfinite_tolerates_and_counts(tmp_path):
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    summary = train(model, iter([[0, 1]] * 6), 6, nan_at({2, 4}, model), config(tmp_path, skip_nonfinite=2),
                    tmp_path, "t")
    assert summary["nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (tmp_path / "b").mkdir()
    other = tiny_model()
    with pytest.raises(UserError, match="non-finite loss at step 4"):
        train(other, iter([[0, 1]] * 6), 6, nan_at({2, 4}, other), config(tmp_path / "b", skip_nonfinite=1),
              tmp_path / "b", "t")


def test_length_grouping_keeps_every_item_once_and_batches_similar_lengths():
    lengths = [5, 100, 7, 98, 6, 99, 8, 97]
    order = group_by_length(list(range(8)), lengths, batch_size=2, seed=0)
    assert sorted(order) == list(range(8))
    batches = [order[i : i + 2] for i in range(0, 8, 2)]
    assert all(abs(lengths[a] - lengths[b]) <= 2 for a, b in batches)


def test_micro_batches_cover_the_batch():
    assert micro_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert micro_batches([1, 2], 4) == [[1], [2]]


def test_nonfinite_weights_stop_the_run_at_the_step_they_appear(tmp_path, monkeypatch):
    """Weights gone non-finite at the last step leave no loss to notice them: the run still fails, naming the step."""
    model = tiny_model()
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if self.state[model[0].weight]["step"] == 4:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(UserError, match=r"weights became non-finite at step 4 .*step-00000002.*is intact"):
        train(model, iter([[0, 1]] * 4), 4, nan_at(set(), model), config(tmp_path), tmp_path, "t")


def test_metrics_are_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": float("inf"), "kl": float("nan"), "nested": [float("-inf"), 1.5]})
    writer.close()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "kl": None, "nested": [None, 1.5]}
