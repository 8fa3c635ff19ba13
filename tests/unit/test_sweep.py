"""Unit tests for aligndistil_cli.sweep: the frontier and budget arithmetic, intervals over seeds,
steps to match, and collect/write_summary/run_sweep on synthetic run directories (nothing trains).

Expected numbers are worked out by hand next to each assertion.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from aligndistil_cli import config as C
from aligndistil_cli import sweep
from aligndistil_cli.errors import ConfigError, UserError
from aligndistil_cli.sweep import (
    aggregate,
    best_within_budget,
    collect,
    frontier,
    steps_to_match,
    write_summary,
)

PNG_MAGIC = b"\x89PNG"
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- frontier


def test_frontier_keeps_best_reward_for_each_kl_budget():
    points = [(1.0, 0.2), (0.5, 0.1), (2.0, 0.15), (3.0, 0.5), (0.5, 0.05), (4.0, 0.5), (0.0, -0.1)]
    # By KL: (0,-0.1) best so far; (0.5,0.1) beats it; (0.5,0.05) same KL, lower; (1,0.2) up;
    # (2,0.15) below 0.2; (3,0.5) up; (4,0.5) ties 0.5 at more KL: dominated.
    assert frontier(points) == [(0.0, -0.1), (0.5, 0.1), (1.0, 0.2), (3.0, 0.5)]


def test_frontier_keeps_extra_fields_and_handles_edges():
    assert frontier([]) == []
    assert frontier([(2.0, 1.0, "b"), (1.0, 1.0, "a")]) == [(1.0, 1.0, "a")]  # equal reward: the lower KL wins
    # A strictly decreasing reward with KL: only the first point survives.
    assert frontier([(1, 3), (2, 2), (3, 1)]) == [(1, 3)]


# ---------------------------------------------------------------- best within budget


def _agg(method, value, reward, kl):
    return {"method": method, "knob": "k", "value": value, "reward": {"mean": reward, "lo": reward, "hi": reward},
            "kl": {"mean": kl, "lo": kl, "hi": kl}}


def test_best_within_budget_by_hand():
    agg = [_agg("dpo", 0.05, 0.40, 1.5), _agg("dpo", 0.1, 0.30, 0.4), _agg("dpo", 0.2, 0.20, 0.1),
           _agg("ad", 2, 0.35, 0.9), _agg("ad", 20, 0.70, 6.0), _agg("ad", 5, 0.55, 2.0)]
    best = best_within_budget(agg, budgets=(0.5, 2, 5, 10))
    # dpo: KL <= 0.5 admits 0.1 (0.30) and 0.2 (0.20) -> 0.30; <= 2 also admits 0.05 (0.40).
    assert best["dpo"] == {0.5: (0.30, 0.1), 2: (0.40, 0.05), 5: (0.40, 0.05), 10: (0.40, 0.05)}
    # ad: nothing at KL <= 0.5; <= 2 admits r=2 (0.35) and r=5 (KL exactly 2: included, 0.55); <= 10 admits r=20.
    assert best["ad"] == {0.5: None, 2: (0.55, 5), 5: (0.55, 5), 10: (0.70, 20)}


def test_best_within_budget_default_budgets():
    assert best_within_budget([_agg("m", 1, 0.1, 3.0)]) == {"m": {2: None, 5: (0.1, 1), 10: (0.1, 1)}}


# ---------------------------------------------------------------- steps to match


def test_steps_to_match_needs_reward_and_kl():
    curve = [(40, 0.5, 0.3), (10, 0.1, 0.2), (20, 0.3, 0.9), (30, 0.35, 0.4)]  # unsorted on purpose
    # step 20 reaches 0.3 but at KL 0.9 > 0.5; step 30 is the first with both.
    assert steps_to_match(curve, target_reward=0.3, max_kl=0.5) == 30
    assert steps_to_match(curve, target_reward=0.3, max_kl=1.0) == 20
    assert steps_to_match(curve, target_reward=0.1, max_kl=0.2) == 10   # equality counts on both sides
    assert steps_to_match(curve, target_reward=0.6, max_kl=10) is None
    assert steps_to_match([], 0.0, 1.0) is None


# ---------------------------------------------------------------- aggregate


def _rec(method, value, seed, reward, kl, length=10.0, cap=0.0):
    return {"method": method, "knob": "beta", "value": value, "seed": seed, "reward": reward, "kl": kl,
            "length": length, "cap_rate": cap}


def test_aggregate_interval_over_seeds_by_hand():
    recs = [_rec("dpo", 0.1, s, r, k) for s, r, k in [(0, 1.0, 0.5), (1, 2.0, 0.5), (2, 4.0, 0.5)]]
    recs.append(_rec("dpo", 0.2, 0, 0.3, 0.2))
    a, b = aggregate(recs)
    # rewards 1, 2, 4: mean 7/3; s^2 = ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = (42/9) / 2 = 7/3;
    # half-width = 1.96 * sqrt(7/3) / sqrt(3) = 1.96 * 0.881917 = 1.728558.
    assert (a["method"], a["value"], a["n"], a["seeds"]) == ("dpo", 0.1, 3, [0, 1, 2])
    assert a["reward"]["mean"] == pytest.approx(2.333333, abs=1e-6)
    assert a["reward"]["hi"] - a["reward"]["mean"] == pytest.approx(1.728558, abs=1e-6)
    assert a["reward"]["mean"] - a["reward"]["lo"] == pytest.approx(1.728558, abs=1e-6)
    # identical KL over seeds: zero width
    assert (a["kl"]["mean"], a["kl"]["lo"], a["kl"]["hi"]) == pytest.approx((0.5, 0.5, 0.5))
    # one seed: the interval collapses to the value
    assert (b["n"], b["reward"]["lo"], b["reward"]["hi"]) == (1, 0.3, 0.3)


def test_aggregate_two_seeds_by_hand():
    (a,) = aggregate([_rec("m", 5, 0, 0.2, 1.0), _rec("m", 5, 1, 0.6, 3.0)])
    # rewards 0.2, 0.6: mean 0.4, s = 0.2*sqrt(2) = 0.282843, half = 1.96 * 0.282843 / sqrt(2) = 0.392
    assert a["reward"]["mean"] == pytest.approx(0.4)
    assert a["reward"]["hi"] == pytest.approx(0.4 + 0.392)
    # KL 1, 3: mean 2, s = sqrt(2), half = 1.96
    assert (a["kl"]["lo"], a["kl"]["hi"]) == pytest.approx((0.04, 3.96))


# ---------------------------------------------------------------- a synthetic sweep root


def _ci(m, half=0.05):
    return {"mean": m, "lo": m - half, "hi": m + half, "n": 500}


def _write_run(root: Path, method, knob, value, order, seed, reward, kl, curve=None, model=None, evaluated=True):
    run_dir = root / f"seed-{seed}" / method / f"{knob}-{sweep.label(value)}"
    model = model or f"seed-{seed}/{method}/{knob}-{sweep.label(value)}/model"
    eval_rel = f"seed-{seed}/{method}/{knob}-{sweep.label(value)}/eval"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"method": method, "knob": knob, "value": value, "order": order,
                                                  "seed": seed, "model": model, "eval": eval_rel}))
    if evaluated:
        (root / eval_rel).mkdir(parents=True, exist_ok=True)
        report = {"reference": "sft", "num_prompts": 500, "max_new_tokens": 48, "models": {
            "sft": {"reward": _ci(0.0), "kl": _ci(0.0), "length": {"mean": 15.0, "cap_rate": 0.0}, "win_rate": None},
            "model": {"reward": _ci(reward), "kl": _ci(kl), "length": {"mean": 12.0, "cap_rate": 0.02},
                      "win_rate": _ci(0.6)}}}
        (root / eval_rel / "report.json").write_text(json.dumps(report))
    (root / model).mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "loss": 0.5} for s in range(1, 21)]
    for step, r, k in curve or []:
        lines[step - 1].update(eval_reward=r, eval_kl=k)
    (root / model / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')


@pytest.fixture
def synthetic_root(tmp_path):
    root = tmp_path / "exp"
    for seed, bump in enumerate((0.0, 0.02, -0.02)):
        dpo_curve = [(5, 0.1, 0.1), (10, 0.2, 0.2), (20, 0.3 + bump, 0.4)]
        _write_run(root, "dpo-lr", "lr", 2e-4, [0, 0], seed, 0.3 + bump, 0.4, dpo_curve)
        _write_run(root, "dpo-lr", "lr", 1e-3, [0, 1], seed, 0.45 + bump, 1.8)
        # r=5 reaches DPO's final reward at step 10 within its KL; r=20 only at too high a KL
        _write_run(root, "aligndistil-r", "r", 5, [1, 0], seed, 0.5 + bump, 0.9,
                   [(5, 0.2, 0.2), (10, 0.35, 0.3), (20, 0.5, 0.9)])
        _write_run(root, "aligndistil-r", "r", 20, [1, 1], seed, 0.7 + bump, 3.0,
                   [(5, 0.4, 1.0), (10, 0.6, 2.0), (20, 0.7, 3.0)])
    # a run whose evaluation has not finished is left out, not an error
    _write_run(root, "aligndistil-r", "r", 10, [1, 2], 0, 0.0, 0.0, evaluated=False)
    return root


def test_collect_reads_one_record_per_finished_run(synthetic_root):
    records = collect(synthetic_root)
    assert len(records) == 12
    assert [(r["method"], r["value"], r["seed"]) for r in records[:4]] == [
        ("dpo-lr", 2e-4, 0), ("dpo-lr", 2e-4, 1), ("dpo-lr", 2e-4, 2), ("dpo-lr", 1e-3, 0)]
    r = records[0]
    assert (r["reward"], r["kl"], r["length"], r["cap_rate"], r["win_rate"], r["ref_reward"]) == \
        (0.3, 0.4, 12.0, 0.02, 0.6, 0.0)
    assert sweep.read_curve(Path(r["metrics"])) == [(5, 0.1, 0.1), (10, 0.2, 0.2), (20, 0.3, 0.4)]
    (a,) = [x for x in aggregate(records) if x["value"] == 5]
    # rewards 0.5, 0.52, 0.48: mean 0.5, s = 0.02, half = 1.96 * 0.02 / sqrt(3) = 0.022632
    assert a["reward"]["hi"] - a["reward"]["mean"] == pytest.approx(0.022632, abs=1e-6)


def test_write_summary_tables_and_plots(synthetic_root, tmp_path):
    out = write_summary(synthetic_root, synthetic_root / "summary.md", budgets=(0.5, 1, 5),
                        baseline=("dpo-lr", 2e-4))
    text = out.read_text()
    for png in ("frontier.png", "convergence.png"):
        assert (synthetic_root / png).read_bytes()[:4] == PNG_MAGIC
        assert f"]({png})" in text
    # best within KL <= 0.5: dpo lr 2e-4 (0.300 ± 0.023); aligndistil-r has nothing; KL <= 1: r=5 (0.500)
    assert "| dpo-lr | lr | 0.300 ± 0.023 (0.0002) | 0.300 ± 0.023 (0.0002) | 0.450 ± 0.023 (0.001) |" in text
    assert "| aligndistil-r | r | — | 0.500 ± 0.023 (5) | 0.700 ± 0.023 (20) |" in text
    # steps to match DPO's own final (reward 0.3+bump at KL 0.4), seed by seed:
    # r=5 reaches 0.35 >= 0.32 at step 10 on every seed (KL 0.3 <= 0.4); r=20 never within KL 0.4.
    assert "| aligndistil-r | 5 | 10.0 ± 0.0 | 3/3 | 20 | eval curve |" in text
    assert "| aligndistil-r | 20 | not reached | 0/3 | 20 | eval curve |" in text
    assert "| dpo-lr | 0.0002 | 20.0 ± 0.0 | 3/3 | 20 | eval curve |" in text
    # no eval curve: the final evaluation (0.45 at KL 1.8 > 0.4) stands for the whole run
    assert "| dpo-lr | 0.001 | not reached | 0/3 | 20 | final evaluation |" in text


def test_write_summary_without_curves_or_runs(tmp_path):
    empty = write_summary(tmp_path / "none", tmp_path / "none" / "summary.md")
    assert "No finished runs" in empty.read_text()
    root = tmp_path / "nocurve"
    _write_run(root, "dpo-beta", "beta", 0.1, [0, 0], 0, 0.3, 0.4)
    (root / "convergence.png").write_bytes(PNG_MAGIC)  # left over from an earlier sweep
    text = write_summary(root, root / "summary.md", baseline=("dpo-beta", 0.1)).read_text()
    assert not (root / "convergence.png").exists() and "no convergence plot" in text
    assert "| dpo-beta | 0.1 | 20.0 ± 0.0 | 1/1 | 20 | final evaluation |" in text


# ---------------------------------------------------------------- planning and running (no training)


def _spec(**methods) -> dict:
    return {
        "seeds": [0, 1],
        "base": [{"name": "toy", "stage": "init-toy"},
                 {"name": "sft", "stage": "sft", "with": {"model": "{toy}/model", "data": "{toy}/sft.jsonl"}},
                 {"name": "dpo", "stage": "train-dpo"}],
        "defaults": {"train-dpo": {"model": "{sft}", "data": "{toy}/pairs.jsonl", "beta": 0.1,
                                   "ref_cache": "{seed_dir}/ref-cache"},
                     "evaluate": {"ref": "{sft}", "prompts": "{toy}/heldout_prompts.jsonl"}},
        "methods": methods or {"dpo-beta": {"knob": "beta", "values": [0.05, 0.1, "2e-1"],
                                            "chain": [{"name": "model", "stage": "train-dpo",
                                                       "with": {"beta": "{knob}"}}]}},
    }


def test_plan_shares_identical_stages(tmp_path):
    base, runs = sweep.plan(_spec(), tmp_path)
    assert [r.value for r in runs if r.seed == 0] == [0.05, 0.1, 0.2]  # "2e-1" (a YAML string) is a number
    r05, r1 = runs[:2]
    assert r05.model == str(tmp_path / "seed-0/dpo-beta/beta-0.05/model")
    assert r05.stages[0][1].beta == 0.05 and r05.stages[0][1].ref_cache == str(tmp_path / "seed-0/ref-cache")
    # beta 0.1 is the base DPO: same directory, no second training
    assert r1.model == base[0][2][1].out == str(tmp_path / "seed-0/dpo")
    ev = r1.stages[-1][1]
    assert (ev.out, ev.models, ev.ref, ev.seed) == (str(tmp_path / "seed-0/dpo-beta/beta-0.1/eval"),
                                                    {"model": str(tmp_path / "seed-0/dpo")},
                                                    str(tmp_path / "seed-0/sft"), 0)
    assert runs[3].seed == 1 and runs[3].stages[0][1].seed == 1


def test_plan_run_overrides_beat_the_chain(tmp_path):
    spec = _spec(dpo={"knob": "w", "chain": [{"name": "model", "stage": "train-dpo", "with": {"beta": 0.3}}],
                      "runs": [{"value": 1}, {"value": 2, "with": {"model": {"beta": 0.05, "lr": 1e-3}}}]})
    _, runs = sweep.plan(spec, tmp_path)
    assert [(r.stages[0][1].beta, r.stages[0][1].lr) for r in runs[:2]] == [(0.3, 1e-4), (0.05, 1e-3)]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(bogus=1), "unknown sweep key"),
    (lambda s: s.update(seeds=[]), "seeds"),
    (lambda s: s["defaults"].pop("evaluate"), "defaults.evaluate"),
    (lambda s: s["methods"]["dpo-beta"].pop("values"), "exactly one of values, runs"),
    (lambda s: s["methods"]["dpo-beta"].update(values=[0.1, "1e-1"]), "repeated value"),
    (lambda s: s["methods"]["dpo-beta"]["chain"][0].update(stage="nope"), "expected name, stage"),
    (lambda s: s["methods"]["dpo-beta"]["chain"][0].update(name="sft"), "already taken"),
    (lambda s: s["defaults"]["train-dpo"].update(betta=1), "did you mean 'beta'"),
])
def test_bad_specs_are_refused_before_anything_runs(tmp_path, change, message):
    spec = _spec()
    change(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        sweep.plan(sweep.load_spec(path), tmp_path)


def test_run_sweep_reuses_shared_work_and_reports_failures(tmp_path, monkeypatch):
    calls = []

    def fake_stage(stage, config, force, done, root):
        if config.out in done:
            return
        done.add(config.out)
        calls.append(config.out)
        if "beta-0.05" in config.out:
            raise UserError("non-finite loss at step 3")
        if stage == "evaluate":
            Path(config.out).mkdir(parents=True)
            report = {"reference": "reference", "models": {
                name: {"reward": _ci(0.1), "kl": _ci(0.2), "length": {"mean": 9.0, "cap_rate": 0.0}}
                for name in ("reference", "model")}}
            (Path(config.out) / "report.json").write_text(json.dumps(report))

    monkeypatch.setattr(sweep, "_run_stage", fake_stage)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    with pytest.raises(UserError, match=r"2 failure.*beta-0.05.*non-finite"):
        sweep.run_sweep(path, root=tmp_path / "exp")
    # per seed: 3 base stages, beta 0.05 (fails), beta 0.1 = base dpo + its eval, beta 0.2 + eval: 7
    assert len(calls) == 14 and len(set(calls)) == 14
    assert not (tmp_path / "exp/seed-0/dpo-beta/beta-0.05/run.json").exists()
    assert json.loads((tmp_path / "exp/seed-0/dpo-beta/beta-0.1/run.json").read_text())["model"] == "seed-0/dpo"
    assert "| dpo-beta | beta = 0.2 | 2 |" in (tmp_path / "exp/summary.md").read_text()


def test_experiments_spec_plans():
    if "eval_every" not in {f.name for f in dataclasses.fields(C.DpoConfig)}:
        pytest.skip("the training stages do not have --eval-every yet")
    spec = sweep.load_spec(REPO / "pipelines/experiments.yaml")
    base, runs = sweep.plan(spec, Path("runs/experiments"))
    assert len(spec["seeds"]) >= 3
    seed0 = [r for r in runs if r.seed == spec["seeds"][0]]
    variants = {r.stages[0][1].variant for r in seed0 if r.method == "variant"}
    assert variants == {"aligndistil", "contrastive", "theorem1", "adaptive"}
    unique = {c.out: (s, c) for r in seed0 for s, c in r.stages}.values()
    trained = [s for s, _ in unique if s in ("train-dpo", "distill")]
    # every run's evaluation sees >= 500 held-out prompts
    assert all(c.num_prompts >= 500 for s, c in unique if s == "evaluate")
    # the teachers' DPO and 5 more; 15 distinct students; one evaluation per distinct model
    assert trained.count("train-dpo") == 6 and trained.count("distill") == 15
    assert sum(s == "evaluate" for s, _ in unique) == 21
    assert base[spec["seeds"][0]][3][1].out in {c.out for _, c in unique}  # the teachers' DPO is a DPO run
