"""Model cards in saved model directories, evaluate's additions to them, and --push-to-hub offline."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from aligndistil_cli.cli import main
from aligndistil_cli.rundir.artifacts import read_manifest, sha256_file, verify_full
from aligndistil_cli.rundir.card import NOT_EVALUATED, write_card
from tests.integration.test_resume import stage_values

MODELS = {"sft": ["sft"], "dpo": ["dpo"], "rev": ["dpo", "reverse-dpo"], "student": ["dpo", "distillation"],
          "student-on-policy": ["dpo", "distillation"]}


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("name", MODELS)
def test_every_model_dir_has_a_card_the_hub_can_read(runs, name):
    out = runs / name
    text = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["tags"][0] == "aligndistil" and set(MODELS[name]) <= set(meta["tags"])
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == meta["tags"]
    stage = json.loads((out / "manifest.json").read_text())["stage"]
    assert f"`{stage}` stage" in card.text
    config = json.loads((out / "stage_config.json").read_text())
    assert yaml.safe_load(card.text.split("```yaml\n", 1)[1].split("```", 1)[0]) == config
    assert "doi = \"10.18653/v1/2025.acl-long.972\"" in card.text
    manifest = read_manifest(out)
    assert manifest["outputs"]["README.md"]["sha256"] == sha256_file(out / "README.md")
    assert verify_full(out) == []


def test_student_card_names_its_teacher(runs):
    teacher = json.loads((runs / "teacher" / "manifest.json").read_text())["config"]
    text = (runs / "student" / "README.md").read_text()
    section = text.split("## Teacher", 1)[1].split("##", 1)[0]
    for key in ("variant", "beta", "alpha_scale", "alpha_eps", "dpo", "rev"):
        assert f"| {key} | `{teacher[key]}` |" in section
    assert "| mode | `off-policy` |" in section
    # precompute's --format auto, as it resolved it for this vocabulary, not as it was asked
    resolved = json.loads((runs / "teacher" / "index.json").read_text())["format"]
    assert teacher["format"] == "auto" and resolved != "auto"
    assert f"| format | `{resolved}` |" in section
    on_policy = (runs / "student-on-policy" / "README.md").read_text().split("## Teacher", 1)[1]
    assert "| mode | `on-policy` |" in on_policy and "| alpha_scale | `20.0` |" in on_policy


def test_evaluate_adds_its_table_and_plots_to_each_evaluated_card(runs):
    report = json.loads((runs / "eval" / "report.json").read_text())
    for name, path in (("sft", runs / "sft"), ("dpo", runs / "dpo"), ("student", runs / "student")):
        text = (path / "README.md").read_text()
        section = text.split("<!-- aligndistil:evaluation -->", 1)[1].split("<!-- /aligndistil:evaluation -->")[0]
        assert f"as `{name}`" in section
        for model, res in report["models"].items():
            assert f"| {model} | {res['reward']['mean']:.3f} ±" in section
        outputs = read_manifest(path)["outputs"]
        # The comparisons, and the model's own training curves (not the others')
        for plot in ("reward_vs_kl.png", "lengths.png", f"training_curves_{name}.png"):
            assert "![" in section and f"(evaluation/{plot})" in section
            assert (path / "evaluation" / plot).read_bytes() == (runs / "eval" / plot).read_bytes()
            assert f"evaluation/{plot}" in outputs
        assert section.count("training_curves_") == 1
        assert verify_full(path) == []
        card = ModelCard.load(path / "README.md")
        assert card.data.model_name == path.name
        res = report["models"][name]
        got = {(e.metric_type, e.dataset_type): e.metric_value for e in card.data.eval_results}
        prompts = str(runs / "toy" / "heldout_prompts.jsonl")
        assert got == {("reward", prompts): res["reward"]["mean"], ("kl", prompts): res["kl"]["mean"],
                       **({("win_rate", prompts): res["win_rate"]["mean"]} if name != "sft" else {})}
    assert NOT_EVALUATED in (runs / "rev" / "README.md").read_text()
    assert ModelCard.load(runs / "rev" / "README.md").data.eval_results is None


def test_card_inherits_the_hub_base_model_and_names_hub_datasets(tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir()
    child.mkdir()
    (parent / "README.md").write_text("---\nbase_model: Qwen/Qwen2.5-0.5B\n---\n\n# parent\n")
    write_card(child, "train-dpo", {"model": str(parent), "data": "HuggingFaceH4/ultrafeedback_binarized"},
               {"steps": 3})
    card = ModelCard.load(child / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    write_card(child, "sft", {"model": "Qwen/Qwen2.5-0.5B", "data": str(tmp_path / "local.jsonl")}, {})
    card = ModelCard.load(child / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.datasets is None


def test_card_carries_the_license_of_the_model_it_started_from(tmp_path):
    base, sft, dpo = tmp_path / "base", tmp_path / "sft", tmp_path / "dpo"
    for d in (base, sft, dpo):
        d.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\nlicense_link: "
                                    "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE\n---\n\n# base\n")
    write_card(sft, "sft", {"model": str(base), "data": "local.jsonl"}, {})
    write_card(dpo, "train-dpo", {"model": str(sft), "data": "local.jsonl"}, {})
    for d in (sft, dpo):
        data = ModelCard.load(d / "README.md").data
        assert (data.license, data.license_name, data.license_link) == (
            "other", "qwen-research", "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    write_card(sft, "sft", {"model": str(base), "data": "local.jsonl"}, {})
    data = ModelCard.load(sft / "README.md").data
    assert data.license == "apache-2.0" and data.license_name is None
    write_card(sft, "sft", {"model": "Qwen/Qwen2.5-0.5B", "data": "local.jsonl"}, {})  # a hub card is not fetched
    assert ModelCard.load(sft / "README.md").data.license is None


def test_push_to_hub_offline_fails_in_one_line_after_a_complete_save(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "dpo"
    values = stage_values(runs, "dpo", out, max_steps=1, batch_size=4)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(values))
    with pytest.raises(SystemExit) as exit_:
        main(["train-dpo", "--config", str(config), "--push-to-hub", "someone/aligndistil-dpo", "--hub-private"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --push-to-hub someone/aligndistil-dpo: ") and "HF_HUB_OFFLINE" in err
    assert err.endswith(f"; upload later with `hf upload someone/aligndistil-dpo {out}`")
    assert read_manifest(out)["stage"] == "train-dpo"
    assert verify_full(out) == []


def test_push_to_hub_without_network_gives_the_upload_command(runs, monkeypatch):
    """A connection failure (no HF_HUB_OFFLINE: the Hub just cannot be reached) is one line that says how to
    upload later, as the offline case does."""
    from huggingface_hub import HfApi

    from aligndistil_cli.core.errors import UserError
    from aligndistil_cli.rundir.hub import push

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure in name resolution)\n"
                              "more detail on a second line")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    monkeypatch.setattr(HfApi, "upload_folder", unreachable)
    with pytest.raises(UserError) as error:
        push(runs / "sft", "someone/aligndistil-sft")
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"--push-to-hub someone/aligndistil-sft: {runs / 'sft'} is saved and complete, but the upload "
                       "failed: Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure in name resolution); "
                       f"upload later with `hf upload someone/aligndistil-sft {runs / 'sft'}`")
