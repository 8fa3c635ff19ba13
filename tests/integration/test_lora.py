"""LoRA through peft: only adapters train, the reference is the adapter-disabled base, saves are merged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aligndistil_cli.config.files import build_config
from aligndistil_cli.config.stages import DistillConfig, DpoConfig
from aligndistil_cli.stages import distill, dpo

pytest.importorskip("peft")


def values(runs, stage, out, **extra):
    return json.loads((runs / stage / "stage_config.json").read_text()) | {"out": str(out)} | extra


def test_lora_dpo_trains_adapters_only_and_saves_a_merged_model(runs, tmp_path):
    out = dpo.run(build_config(DpoConfig, values(runs, "dpo", tmp_path / "lora", lora_r=4, lora_alpha=8.0,
                                                 max_steps=3, lr=1e-2, ref_cache=str(tmp_path / "rc"))))
    assert not list(out.glob("adapter_*")), "the adapter is merged, not saved beside the model"
    base, merged = load_file(runs / "sft" / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == merged.keys(), "a plain transformers model directory"
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed), "only adapted linear layers change"
    assert not any("embed" in k or "norm" in k for k in changed)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["loss"] - 0.693147) < 1e-4, "with the adapter at init, policy == reference"


def test_reference_log_probs_come_from_the_base_model(runs, tmp_path):
    """The same reference cache key is used with and without LoRA: it is the base model's."""
    full = dpo.run(build_config(DpoConfig, values(runs, "dpo", tmp_path / "full", max_steps=1,
                                                  ref_cache=str(tmp_path / "rc"))))
    lora = dpo.run(build_config(DpoConfig, values(runs, "dpo", tmp_path / "lora", max_steps=1, lora_r=4,
                                                  ref_cache=str(tmp_path / "rc2"))))
    a = load_file(next((tmp_path / "rc").glob("*.safetensors")))
    b = load_file(next((tmp_path / "rc2").glob("*.safetensors")))
    torch.testing.assert_close(a["chosen"], b["chosen"], rtol=1e-6, atol=1e-5)
    assert full.exists() and lora.exists()


def test_lora_distill(runs, tmp_path):
    out = distill.run(build_config(DistillConfig, values(runs, "student", tmp_path / "s", lora_r=4, lora_target="q_proj,v_proj",
                                                         max_steps=2)))
    base, merged = load_file(runs / "sft" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
