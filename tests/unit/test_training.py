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


def varied(model):
    """A loss whose batches differ (batch [i, i + 1] gives inputs i), so a resume at the wrong step shows."""

    def loss_fn(batch):
        return (model(torch.full((2, 3), float(batch[0]))) - 1.0).pow(2).mean(), {}

    return loss_fn


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_a_checkpoint_of_either_format_resumes_exactly(tmp_path, fmt):
    """A run stopped at step 5 resumes from its step-4 checkpoint (weights, AdamW moments and step counts, the
    schedule) and ends bit-identical to an uninterrupted run."""
    batches = [[i, i + 1] for i in range(8)]
    (tmp_path / "ref").mkdir()
    reference = tiny_model()
    train(reference, iter(batches), 8, varied(reference), config(tmp_path / "ref"), tmp_path / "ref", "t")
    model = tiny_model()
    stop = varied(model)
    with pytest.raises(UserError, match="non-finite loss at step 5"):
        train(model, iter(batches), 8, lambda b: (stop(b)[0] * (float("nan") if b[0] == 4 else 1.0), {}),
              config(tmp_path, checkpoint_format=fmt), tmp_path, "t")
    saved = checkpoint.latest(tmp_path)
    assert json.loads((saved / "state.json").read_text())["format"] == fmt
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert files == {"rng.safetensors", "state.json"} | ({"shards/rank-00000-of-00001.safetensors"}
                                                         if fmt == "sharded" else
                                                         {"model.safetensors", "optimizer.safetensors"})
    resumed = tiny_model()
    # The other format resumes it: a load reads what state.json names.
    other = "full" if fmt == "sharded" else "sharded"
    summary = train(resumed, iter(batches), 8, varied(resumed), config(tmp_path, resume=True, checkpoint_format=other),
                    tmp_path, "t")
    assert summary["resumed_from"] == 4
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_sharded_checkpoint_refuses_a_changed_input(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "o").mkdir()
    model = tiny_model()
    cfg = SftConfig(out=str(tmp_path / "o"), model="m", data=str(data), save_every=2, checkpoint_format="sharded")
    with pytest.raises(UserError, match="non-finite loss at step 3"):
        train(model, iter([[0, 1]] * 4), 4, nan_at({3}, model), cfg, tmp_path / "o", "t")
    data.write_text('{"prompt": "a", "response": "c"}\n')
    cfg = SftConfig(out=str(tmp_path / "o"), model="m", data=str(data), save_every=2, checkpoint_format="sharded",
                    resume=True)
    with pytest.raises(UserError, match=rf"another version of input 'data' \({data}\): its content changed"):
        train(tiny_model(), iter([[0, 1]] * 4), 4, nan_at(set(), model), cfg, tmp_path / "o", "t")
