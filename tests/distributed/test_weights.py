"""How accumulate weighs micro-batches: by the global count each loss is a mean over (one process)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.parallel import distributed
from aligndistil_cli.parallel.distributed import rank_micro_batches
from aligndistil_cli.train.loop import accumulate, step_batches


def token_mean_loss(w: torch.Tensor):
    """loss_fn over items = lists of token values: the token mean of w * value, plus per-token and per-sequence metrics."""

    def loss_fn(micro):
        tokens = torch.tensor([t for item in micro for t in item], dtype=torch.float64)
        return (w * tokens).sum() / len(tokens), {"first_mean": sum(item[0] for item in micro) / len(micro),
                                                  "token_mean": (tokens.mean().item(), len(tokens))}

    return loss_fn


@pytest.mark.parametrize("n", [1, 2, 3])
def test_token_weighted_micro_batches_give_the_whole_batch_token_mean(n):
    batch = [[1.0], [2.0, 3.0, 4.0], [5.0, 6.0], [7.0], [8.0, 9.0, 10.0, 11.0]]
    tokens = [t for item in batch for t in item]
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, metrics = accumulate(token_mean_loss(w), batch, n, "fp32", torch.device("cpu"),
                               weight=lambda micro: sum(len(item) for item in micro))
    # By hand: the mean over all 11 tokens, whatever the split into micro-batches.
    assert loss.item() == pytest.approx(0.5 * sum(tokens) / len(tokens), rel=1e-6)
    assert w.grad.item() == pytest.approx(sum(tokens) / len(tokens), rel=1e-12)
    assert metrics["token_mean"] == pytest.approx(sum(tokens) / len(tokens), rel=1e-12)
    assert metrics["first_mean"] == pytest.approx(sum(item[0] for item in batch) / len(batch), rel=1e-12)


def test_one_process_takes_every_item_once():
    batch = list(range(7))
    micros = rank_micro_batches(batch, 3)
    assert [m for m, live in micros] == [[0, 1, 2], [3, 4, 5], [6]] and all(live for _, live in micros)


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 70), world=st.integers(1, 8), grad_accum=st.integers(1, 4), per_rank=st.integers(1, 6))
def test_every_rank_runs_the_same_micro_batches_whatever_the_sizes(rows, world, grad_accum, per_rank):
    batch_size = world * per_rank
    try:
        distributed.check_batch(batch_size, grad_accum, world)
    except UserError:  # refused before any model loads
        return
    for batch in step_batches(list(range(rows)), batch_size, 2, 0, None):
        plans = [rank_micro_batches(batch, grad_accum, r, world) for r in range(world)]
        assert len({len(p) for p in plans}) == 1, [len(p) for p in plans]
        assert world == 1 or len(plans[0]) == grad_accum
        assert all(micro for p in plans for micro, _ in p), "a micro-batch of no rows"
        live = [x for p in plans for micro, on in p if on for x in micro]
        assert live == batch  # every row once, in order: the live weights sum to the global count


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_run_and_sweep_refuse_to_start_under_torchrun(command, monkeypatch, capsys, tmp_path):
    from aligndistil_cli.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "pipeline.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"do not start `aligndistil {command}` with torchrun" in err and err.count("\n") == 1
