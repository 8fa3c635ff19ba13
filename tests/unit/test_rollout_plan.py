"""On-policy rollouts as functions of the rollout: sample streams, the off-policy plan, the items."""

from __future__ import annotations

import itertools

from aligndistil_cli.config.stages import DistillConfig
from aligndistil_cli.stages.on_policy import RolloutItem, off_policy_plan, rollout_steps, stream_index


def test_stream_index_is_unique_per_rollout_prompt_and_sample():
    # By hand: rollout 2, prompt 5 of 10, sample 1 of 3 -> (2 * 10 + 5) * 3 + 1.
    assert stream_index(RolloutItem(2, 5, 0, 4), 1, num_prompts=10, samples_per_prompt=3) == 76
    # Where the prompt sits in its rollout (and the rollout's size) does not matter, only which prompt it is.
    assert stream_index(RolloutItem(2, 5, 3, 7), 1, 10, 3) == 76
    keys = [stream_index(RolloutItem(r, i, 0, 1), k, 10, 3) for r, i, k in itertools.product(range(4), range(10), range(3))]
    assert sorted(keys) == list(range(4 * 10 * 3))


def test_off_policy_plan_takes_round_mix_of_the_rollouts_slots():
    plan = off_policy_plan(rollout=3, slots=8, rows=61, mix=0.25, seed=0)
    assert len(plan) == 2 and set(plan) <= set(range(8)) and len(set(plan.values())) == 2
    assert all(0 <= row < 61 for row in plan.values())
    assert plan == off_policy_plan(3, 8, 61, 0.25, 0)  # a function of (seed, rollout): every rank agrees
    assert len(off_policy_plan(3, 10, 61, 0.45, 0)) == 4  # round(4.5) is 4 (round half to even)
    assert len(off_policy_plan(3, 8, 1, 0.5, 0)) == 1  # no row twice
    assert off_policy_plan(3, 8, 0, 0.0, 0) == {}
    plans = {tuple(sorted(off_policy_plan(r, 16, 61, 0.25, 0).items())) for r in range(8)}
    assert len(plans) > 1, "rollouts draw different slots and rows"


def test_rollout_steps_items_know_their_place_in_the_rollout():
    config = DistillConfig(out="-", student="-", data="-", mode="on-policy", dpo="d", rev="r", batch_size=8,
                           samples_per_prompt=2, updates_per_rollout=2, max_steps=6, seed=0)
    steps = list(rollout_steps(10, config))
    assert len(steps) == 6 and steps[0] == steps[1] and steps[2] == steps[3] and steps[0] != steps[2]
    for n, items in enumerate(steps):
        assert [it.rollout for it in items] == [n // 2] * len(items)
        assert [it.position for it in items] == list(range(len(items)))
        assert {it.size for it in items} == {len(items)}
    # Rollouts of 4 prompts (8 sequences / 2 samples): an epoch of 10 is 4 + 4 + 2, each prompt once.
    assert [len(steps[n]) for n in (0, 2, 4)] == [4, 4, 2]
    assert sorted(it.prompt for n in (0, 2, 4) for it in steps[n]) == list(range(10))
