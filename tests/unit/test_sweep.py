"""Unit tests for aligndistil_cli.orchestrate.sweep and sweep_summary: the frontier and budget arithmetic, intervals
over seeds, convergence, tokens at matched KL, and collect/write_summary/run_sweep on synthetic run
directories (nothing trains).

Expected numbers are worked out by hand next to each assertion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aligndistil_cli.core.errors import ConfigError, UserError
from aligndistil_cli.orchestrate import summary as S
from aligndistil_cli.orchestrate import sweep
from aligndistil_cli.orchestrate.summary import (
    aggregate,
    best_within_budget,
    collect,
    frontier,
    per_seed_within_budget,
    tokens_at_matched_kl,
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
    assert best["dpo"] == {0.5: (0.30, "0.1"), 2: (0.40, "0.05"), 5: (0.40, "0.05"), 10: (0.40, "0.05")}
    # ad: nothing at KL <= 0.5; <= 2 admits r=2 (0.35) and r=5 (KL exactly 2: included, 0.55); <= 10 admits r=20.
    assert best["ad"] == {0.5: None, 2: (0.55, "5"), 5: (0.55, "5"), 10: (0.70, "20")}


def test_best_within_budget_default_budgets():
    assert best_within_budget([_agg("m", 1, 0.1, 3.0)]) == {"m": {2: None, 5: (0.1, "1"), 10: (0.1, "1")}}


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


def _write_run(root: Path, method, knob, value, order, seed, reward, kl, *, lr=None, epochs=None, final_kl=None,
               tokens=None, length=12.0, diagnostics=None, evaluated=True):
    name = sweep.run_name(knob, value, (lr, epochs) if lr is not None else None)
    run_dir = root / f"seed-{seed}" / method / name
    model, eval_rel = f"seed-{seed}/{method}/{name}/model", f"seed-{seed}/{method}/{name}/eval"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"method": method, "knob": knob, "value": value, "order": order,
                                                  "seed": seed, "model": model, "eval": eval_rel, "lr": lr,
                                                  "epochs": epochs}))
    if evaluated:
        (root / eval_rel).mkdir(parents=True, exist_ok=True)
        row = {"reward": _ci(reward), "kl": _ci(kl), "length": {"mean": length, "cap_rate": 0.02}, "win_rate": _ci(0.6)}
        if diagnostics is not None:
            row["teacher_spec"] = {"variant": "aligndistil"}
        report = {"reference": "sft", "num_prompts": 500, "max_new_tokens": 48, "teacher_diagnostics": diagnostics,
                  "models": {"sft": {"reward": _ci(0.0), "kl": _ci(0.0), "length": {"mean": 15.0, "cap_rate": 0.0},
                                     "win_rate": None}, "model": row}}
        (root / eval_rel / "report.json").write_text(json.dumps(report))
    (root / model).mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in (("final_kl_teacher", final_kl), ("train_tokens", tokens)) if v is not None}
    (root / model / "manifest.json").write_text(json.dumps({"metrics": metrics}))


def _diag(teacher_eos, mirror):
    return {"p_eos_at_end": {"ref": 0.3, "dpo": 0.4, "rev": 0.5, "teacher": teacher_eos},
            "mirror_cosine_median": mirror}


@pytest.fixture
def synthetic_root(tmp_path):
    root = tmp_path / "exp"
    for seed, bump in enumerate((0.0, 0.02, -0.02)):
        # DPO on a 2-point budget grid: 1 epoch (1000 tokens) and 3 epochs (3000 tokens)
        _write_run(root, "dpo", "beta", 0.1, [0, 0], seed, 0.3 + bump, 0.4, lr=1e-3, epochs=1, tokens=1000)
        _write_run(root, "dpo", "beta", 0.1, [0, 0], seed, 0.45 + bump, 1.8, lr=1e-3, epochs=3, tokens=3000)
        # students: at 1 epoch r=5 has not converged (KL to teacher 0.3): never a point
        _write_run(root, "ad", "r", 5, [1, 0], seed, 0.9 + bump, 0.9, lr=1e-3, epochs=1, final_kl=0.3, tokens=500)
        _write_run(root, "ad", "r", 5, [1, 0], seed, 0.5 + bump, 0.9, lr=1e-3, epochs=3, final_kl=0.04, tokens=1500)
        _write_run(root, "ad", "r", 20, [1, 1], seed, 0.7 + bump, 3.0, lr=1e-3, epochs=3, final_kl=0.01, tokens=1500)
        _write_run(root, "teacher", "r", 5, [2, 0], seed, 0.6 + bump, 1.0, diagnostics=_diag(0.01 * (seed + 1), 0.9))
    # a run whose evaluation has not finished is left out, not an error
    _write_run(root, "ad", "r", 10, [1, 2], 0, 0.0, 0.0, lr=1e-3, epochs=1, evaluated=False)
    return root


def test_collect_reads_one_record_per_finished_run(synthetic_root):
    records = collect(synthetic_root)
    assert len(records) == 18
    assert [(r["method"], r["epochs"], r["seed"]) for r in records[:4]] == [
        ("dpo", 1, 0), ("dpo", 1, 1), ("dpo", 1, 2), ("dpo", 3, 0)]
    r = records[0]
    assert (r["reward"], r["kl"], r["length"], r["cap_rate"], r["win_rate"], r["ref_reward"], r["ref_length"]) == \
        (0.3, 0.4, 12.0, 0.02, 0.6, 0.0, 15.0)
    assert (r["lr"], r["train_tokens"], r["final_kl_teacher"], r["teacher"]) == (1e-3, 1000, None, False)
    t = [r for r in records if r["method"] == "teacher"][0]
    assert t["teacher"] and t["diagnostics"]["mirror_cosine_median"] == 0.9


def test_convergence_threshold_and_settings():
    assert S.converged({"final_kl_teacher": None}) and S.converged({"final_kl_teacher": 0.05})
    assert not S.converged({"final_kl_teacher": 0.0501}) and S.converged({"final_kl_teacher": 0.2}, threshold=0.3)
    recs = [{**_rec("ad", 5, s, 0.5, 1.0), "lr": 1e-3, "epochs": 3, "final_kl_teacher": k, "train_tokens": t}
            for s, k, t in [(0, 0.01, 100), (1, 0.08, 200)]]
    (a,) = aggregate(recs)
    # one seed of two above 0.05: the setting is not converged; tokens are the mean, 150
    assert (a["converged"], a["final_kl_teacher"], a["train_tokens"]) == (False, [0.01, 0.08], 150)
    assert aggregate(recs, threshold=0.1)[0]["converged"]
    assert S.setting_name(a) == "5, lr 0.001, 3 ep" and S.setting_name({"value": 20, "lr": None}) == "20"


def test_per_seed_within_budget_by_hand():
    recs = [_rec("m", 1, 0, 0.2, 0.5), _rec("m", 2, 0, 0.6, 3.0), _rec("m", 1, 1, 0.4, 1.5), _rec("m", 2, 1, 0.5, 0.9)]
    out = per_seed_within_budget(recs, (1, 2, 5))
    # KL <= 1: seed 0 has 0.2 (KL 0.5), seed 1 has 0.5 (KL 0.9); <= 2: seed 1 adds 0.4 < 0.5;
    # <= 5: seed 0 adds 0.6. Seeds are counted whether or not they have a run within the budget.
    assert out["m"] == {1: ([0.2, 0.5], 2), 2: ([0.2, 0.5], 2), 5: ([0.6, 0.5], 2)}
    assert per_seed_within_budget([_rec("m", 1, 0, 0.2, 4.0)], (1,))["m"] == {1: ([], 1)}


def test_tokens_at_matched_kl_by_hand(synthetic_root):
    agg = [a for a in aggregate(collect(synthetic_root)) if a["converged"]]
    rows = tokens_at_matched_kl(agg, (1, 5))
    # dpo 1 epoch: 0.3 at KL 0.4; 3 epochs: 0.45 at KL 1.8 (nothing within KL 1); ad 1 epoch did not
    # converge, so only ad 3 epochs: r=5 (0.5 at KL 0.9) within 1, r=20 (0.7 at KL 3) within 5.
    assert [(r["method"], r["epochs"], r["tokens"]) for r in rows] == [("dpo", 1, 1000), ("dpo", 3, 3000),
                                                                        ("ad", 3, 1500)]
    assert rows[0]["best"] == {1: pytest.approx((0.3, "0.1, lr 0.001, 1 ep")), 5: pytest.approx((0.3, "0.1, lr 0.001, 1 ep"))}
    assert rows[1]["best"][1] is None and rows[1]["best"][5][0] == pytest.approx(0.45)
    assert rows[2]["best"][1][0] == pytest.approx(0.5) and rows[2]["best"][5] == pytest.approx((0.7, "20, lr 0.001, 3 ep"))


def test_write_summary_tables_and_plots(synthetic_root):
    out = write_summary(synthetic_root, synthetic_root / "summary.md", budgets=(0.5, 1, 5), length_budgets=(12, 14))
    text = out.read_text()
    assert (synthetic_root / "frontier.png").read_bytes()[:4] == PNG_MAGIC and "](frontier.png)" in text
    assert "3 of 18 runs are distilled students" in text  # ad r=5 at 1 epoch, 3 seeds
    # pooled: the unconverged 0.9 never shows; ad within KL 1 is r=5 at 3 epochs (0.500 ± 0.023)
    assert "| dpo | beta | 0.300 ± 0.023 (0.1, lr 0.001, 1 ep) | 0.300 ± 0.023 (0.1, lr 0.001, 1 ep) | " \
           "0.450 ± 0.023 (0.1, lr 0.001, 3 ep) |" in text
    assert "| ad | r | — | 0.500 ± 0.023 (5, lr 0.001, 3 ep) | 0.700 ± 0.023 (20, lr 0.001, 3 ep) |" in text
    assert "| teacher | r | — | 0.600 ± 0.023 (5) | 0.600 ± 0.023 (5) |" in text
    # per seed: within KL 1, ad's seeds have 0.5, 0.52, 0.48 -> 0.500 ± 0.023, all 3 seeds
    assert "| ad | — (0/3) | 0.500 ± 0.023 (3/3) | 0.700 ± 0.023 (3/3) |" in text
    # matched length: every run is 12 tokens long, so both length budgets admit all converged settings
    assert "| ad | r | 0.700 ± 0.023 (20, lr 0.001, 3 ep) | 0.700 ± 0.023 (20, lr 0.001, 3 ep) |" in text
    assert "| dpo | 3 | 3,000 | — | — | 0.450 (0.1, lr 0.001, 3 ep) |" in text
    # teacher p(EOS) 0.01, 0.02, 0.03: mean 0.02, s = 0.01, half = 1.96 * 0.01 / sqrt(3) = 0.011
    assert "| teacher | 5 | 3 | 0.300 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 | 0.020 ± 0.011 | — | — | — | 0.900 ± 0.000 |" \
        in text
    assert "| ad | 5, lr 0.001, 1 ep | 0.300 | 0.300–0.300 | 0/3 |" in text
    assert "| r = 5, lr 0.001, 1 ep | 3 (0, 1, 2) | 0.900 ± 0.023 | 0.90 ± 0.00 | 12.0 ± 0.0 | 2.0% | 500 | **no** |" in text
    # paired with dpo in each seed: within KL 1, ad's best (r=5, 3 ep: 0.5 + bump) minus dpo's (1 ep: 0.3 + bump) = 0.2
    # in every seed; within KL 0.5 ad has no converged run
    assert "| ad | — | +0.200 ± 0.000 (3): wins | +0.250 ± 0.000 (3): wins |" in text
    assert json.loads((synthetic_root / "summary.json").read_text())["options"]["baseline"] == "dpo"


def test_write_summary_without_runs(tmp_path):
    empty = write_summary(tmp_path / "none", tmp_path / "none" / "summary.md")
    assert "No finished runs" in empty.read_text()
    root = tmp_path / "plain"
    _write_run(root, "dpo-beta", "beta", 0.1, [0, 0], 0, 0.3, 0.4)
    text = write_summary(root, root / "summary.md").read_text()
    assert "No method on the budget grid." in text and "No teacher evaluation" in text
    assert "No distillation run recorded" in text


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
            return False
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
        return True

    monkeypatch.setattr(sweep, "_run_stage", fake_stage)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    with pytest.raises(UserError, match=r"2 failure.*beta-0.05.*non-finite"):
        sweep.run_sweep(path, root=tmp_path / "exp")
    # per seed: 3 base stages, beta 0.05 (fails), beta 0.1 = base dpo + its eval, beta 0.2 + eval: 7
    assert len(calls) == 14 and len(set(calls)) == 14
    assert not (tmp_path / "exp/seed-0/dpo-beta/beta-0.05/run.json").exists()
    assert json.loads((tmp_path / "exp/seed-0/dpo-beta/beta-0.1/run.json").read_text())["model"] == "seed-0/dpo"
    assert "| beta = 0.2 | 2 (0, 1) |" in (tmp_path / "exp/summary.md").read_text()
    record = json.loads((tmp_path / "exp/sweep.json").read_text())  # where the numbers come from; 14 - 2 failed
    assert record["command"] == f"aligndistil sweep {path}" and record["stages_run"] == 12 and record["wall_s"] >= 0


def test_plan_grid_shared_stages_and_eval_overrides(tmp_path):
    spec = _spec(dpo={"knob": "beta", "values": [0.1], "grid": "model",
                      "chain": [{"name": "model", "stage": "train-dpo"}]},
                 judge={"knob": "beta", "values": [0.2], "chain": [{"name": "model", "stage": "train-dpo",
                                                                    "with": {"beta": "{knob}"}}],
                        "eval": {"models": {}, "pairs": "{toy}/pairs.jsonl"}})
    spec["shared"], spec["base"] = spec["base"][:2], spec["base"][2:]
    spec["grid"] = {"lr": [1e-3, "3e-4"], "epochs": [1, 3]}
    base, runs = sweep.plan(spec, tmp_path)
    # toy and sft once, in ROOT/shared, at the start of every seed's base; dpo per seed
    assert [c.out for _, c in base[1]] == [str(tmp_path / "shared/toy"), str(tmp_path / "shared/sft"),
                                           str(tmp_path / "seed-1/dpo")]
    assert base[1][2][1].model == str(tmp_path / "shared/sft") and base[1][2][1].seed == 1
    # shared stages have seed 0 whichever seeds are listed: a spec run seed by seed shares them
    assert [c.seed for _, c in base[1][:2]] == [0, 0]
    alone, _ = sweep.plan({**spec, "seeds": [1]}, tmp_path)
    assert [c for _, c in alone[1][:2]] == [c for _, c in base[1][:2]]
    grid = [r for r in runs if r.seed == 0 and r.method == "dpo"]
    assert [(r.budget, r.stages[0][1].lr, r.stages[0][1].epochs) for r in grid] == [
        ((1e-3, 1), 1e-3, 1), ((1e-3, 3), 1e-3, 3), ((3e-4, 1), 3e-4, 1), ((3e-4, 3), 3e-4, 3)]
    assert grid[1].dir == tmp_path / "seed-0/dpo/beta-0.1_lr-0.001_ep-3"
    judge = [r for r in runs if r.seed == 0 and r.method == "judge"][0]
    ev = judge.stages[-1][1]
    assert judge.budget is None and ev.models == {} and ev.pairs == str(tmp_path / "shared/toy/pairs.jsonl")


def test_grid_needs_the_spec_grid_and_a_chain_stage(tmp_path):
    spec = _spec(dpo={"knob": "beta", "values": [0.1], "grid": "nope",
                      "chain": [{"name": "model", "stage": "train-dpo"}]})
    spec["grid"] = {"lr": [1e-3], "epochs": [1]}
    with pytest.raises(ConfigError, match="grid: 'nope'"):
        sweep.plan(spec, tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "grid": {"lr": [1e-3]}}))
    with pytest.raises(ConfigError, match="'grid' must be"):
        sweep.load_spec(path)


def _grid_methods(spec: dict) -> dict:
    return {m: v for m, v in spec["methods"].items() if v.get("grid")}


def test_the_experiments_spec_seeds_the_whole_pipeline_and_tunes_teachers_like_dpo():
    spec = sweep.load_spec(REPO / "pipelines" / "experiments.yaml")
    base, runs = sweep.plan(spec, Path("runs/experiments"))
    assert len(spec["seeds"]) >= 5 and not spec.get("shared")
    for seed, stages in base.items():  # the task split, SFT, pairs and teachers all take the seed
        assert {c.seed for s, c in stages if s != sweep.SELECT} == {seed}
        (selection,) = [c for s, c in stages if s == sweep.SELECT]
        dpo_budgets = {r.budget: r.model for r in runs if r.seed == seed and r.method == "dpo"}
        # the teachers' DPO and reverse DPO are trained at every budget the DPO baseline gets, the DPO ones shared
        assert {b for b, _, _ in selection.candidates} == set(dpo_budgets)
        assert all(dpo_budgets[b] == d.out and (r.lr, r.epochs) == b and r.reverse for b, d, r in selection.candidates)
        seed_runs = [r for r in runs if r.seed == seed]
        caches = {c.out: c for r in seed_runs for s, c in r.stages if s == "precompute"}
        assert len(caches) == 1 and next(iter(caches.values())).format == "hidden"  # one teacher pass per seed
        assert next(iter(caches.values())).dpo == str(Path(selection.out) / "dpo")
        students = [r for r in seed_runs if r.method == "aligndistil"]
        assert {r.value for r in students} >= {0.5, 1, 2, 5, 10, 20}
        assert all(next(c for s, c in r.stages if c.out == r.model).alpha_scale == r.value for r in students)
        assert {r.value for r in seed_runs if r.method == "teacher"} == {r.value for r in students}


def test_experiments_specs_give_every_method_the_same_budget_grid():
    for name, seeds, lrs, epochs in (("experiments-full.yaml", 5, 3, 3),):
        spec = sweep.load_spec(REPO / "pipelines" / name)
        base, runs = sweep.plan(spec, Path("runs/experiments"))
        assert len(spec["seeds"]) >= seeds
        assert len(spec["grid"]["lr"]) == lrs and spec["grid"]["epochs"] == sorted(spec["grid"]["epochs"])
        assert len(spec["grid"]["epochs"]) == epochs
        seed0 = [r for r in runs if r.seed == spec["seeds"][0]]
        grids = {m: {r.budget for r in seed0 if r.method == m} for m in _grid_methods(spec)}
        assert {"dpo", "aligndistil"} <= set(grids) and ("on-policy" in grids or name == "experiments.yaml")
        assert all(g == grids["dpo"] and len(g) == lrs * epochs for g in grids.values()), name
        # the grid's lr and epochs reach the trained model of every run
        for r in seed0:
            if r.budget:
                model = next(c for s, c in r.stages if c.out == r.model)
                assert (model.lr, model.epochs) == r.budget
        # teachers are sampled directly, with p(EOS) diagnostics on the training pairs
        teachers = [r.stages[-1][1] for r in seed0 if r.method.startswith("teacher")]
        assert teachers and all(c.teacher and c.pairs and c.models == {} for c in teachers)
        # the teachers at 1 and at 3 epochs
        epochs_of = {c.epochs for _, c in base[spec["seeds"][0]] if getattr(c, "reverse", None) is not None}
        assert epochs_of == {1, 3}
        assert next(c for s, c in seed0[0].stages if s == "evaluate").num_prompts >= 128
    full = sweep.load_spec(REPO / "pipelines/experiments-full.yaml")
    assert full["grid"] == {"lr": [2.0e-4, 5.0e-4, 1.0e-3], "epochs": [1, 3, 5]}
    knobs = {m: {float(v) for v in full["methods"][m].get("values", [])} for m in _grid_methods(full)}
    assert {0.5, 1.0} <= knobs["aligndistil"]
