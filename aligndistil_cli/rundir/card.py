"""Model cards: README.md with Hugging Face YAML front matter in every saved model directory.

finalize() writes the card before the manifest, so the manifest lists it.
`evaluate` later replaces the card's evaluation section (between markers) in
each model it evaluated, copies its plots beside it, and records both in that
model's manifest; the weights, and so every fingerprint, stay unchanged.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.yamlio import parse_yaml
from aligndistil_cli.rundir.artifacts import MANIFEST, atomic_write_bytes, read_manifest, record_outputs

CARD = "README.md"
EVAL_DIR = "evaluation"
BEGIN, END = "<!-- aligndistil:evaluation -->", "<!-- /aligndistil:evaluation -->"
NOT_EVALUATED = "Not evaluated yet: `aligndistil evaluate --model NAME=DIR` writes its results here."
TAGS = {"sft": ["sft"], "train-dpo": ["dpo"], "train-reverse-dpo": ["dpo", "reverse-dpo"],
        "distill": ["dpo", "aligndistil-student", "distillation"]}
CITATION = """@inproceedings{zhang-etal-2025-aligndistil,
    title = "{A}lign{D}istil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
    author = "Zhang, Songming and Zhang, Xue and Zhang, Tong and Hu, Bojie and Chen, Yufeng and Xu, Jinan",
    booktitle = "Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)",
    year = "2025",
    address = "Vienna, Austria",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2025.acl-long.972/",
    doi = "10.18653/v1/2025.acl-long.972",
    pages = "19791--19807"
}"""
TEACHER_KEYS = ("variant", "beta", "kl_coef", "alpha_scale", "alpha_eps", "alpha_max", "extrapolate_eos", "temperature",
                "format", "dpo", "rev", "ref")
# distill's options over a hidden-state cache's teacher (distill.spec_overrides)
OVERRIDES = ("alpha_scale", "alpha_eps", "alpha_max", "extrapolate_eos")


def is_model_dir(out: Path) -> bool:
    return (Path(out) / "config.json").is_file() and any(Path(out).glob("*.safetensors"))


def _hub_id(value: str | None) -> str | None:
    """value when it names a hub repo rather than a local path."""
    if not value or Path(value).exists() or str(value).startswith((".", "/", "~")) or str(value).count("/") != 1:
        return None
    return str(value)


def front_matter(path: Path) -> dict:
    """The YAML front matter of a card (empty when there is none)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    return (parse_yaml(match.group(1), str(path)) or {}) if match else {}


def base_model(source: str | None) -> str | None:
    """The hub model at the root of the lineage: source itself, or what its own card names."""
    if _hub_id(source):
        return source
    if source and Path(source).is_dir():
        return front_matter(Path(source) / CARD).get("base_model")
    return None


LICENSE_KEYS = ("license", "license_name", "license_link")


def inherited_license(source: str | None) -> dict:
    """The license fields of a local source model's card (license_name and license_link go with license: other);
    a trained model is bound by the license of the weights it started from. Empty for a hub id: its card is not
    fetched."""
    if not source or not Path(source).is_dir():
        return {}
    meta = front_matter(Path(source) / CARD)
    return {k: meta[k] for k in LICENSE_KEYS if meta.get(k)}


def teacher_settings(config: dict) -> dict:
    """What taught a distilled student: the cache's teacher (off-policy) or the live one (on-policy)."""
    if config.get("mode") == "on-policy":
        settings = {k: config.get(k) for k in ("variant", "beta", "kl_coef", "dpo", "rev", "ref")}
        settings["alpha_scale"] = 20.0 if config.get("alpha_scale") is None else config["alpha_scale"]
        settings["alpha_eps"] = 1e-3 if config.get("alpha_eps") is None else config["alpha_eps"]
        settings["alpha_max"] = config.get("alpha_max")
        settings["extrapolate_eos"] = config.get("extrapolate_eos") is not False
        return {"mode": "on-policy", **settings, "temperature": config.get("teacher_temperature")}
    manifest = read_manifest(Path(config["cache"]), "precompute", role="teacher cache")
    cache = manifest["config"]
    settings = {"mode": "off-policy", "cache": config["cache"], **{k: cache.get(k) for k in TEACHER_KEYS}}
    # --format auto is resolved by precompute (by vocabulary size); the card shows what the cache holds.
    settings["format"] = manifest.get("metrics", {}).get("format", cache.get("format"))
    for key in OVERRIDES:
        if config.get(key) is not None:
            settings[key] = config[key]
    return settings


def _body(stage: str, config: dict, metrics: dict, title: str) -> str:
    source = config.get("model") or config.get("student")
    lines = [f"# {title}", "",
             f"Trained by the `{stage}` stage of [aligndistil](https://arxiv.org/abs/2503.02832), a command-line "
             "pipeline for token-level alignment with AlignDistil (Zhang et al., ACL 2025).", "",
             f"- initialised from: `{source}`", f"- data: `{config.get('data')}`"]
    for key in ("steps", "final_loss", "train_seconds"):
        if metrics.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {metrics[key]}")
    if stage == "distill":
        lines += ["", "## Teacher", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in teacher_settings(config).items() if v is not None]
    lines += ["", "## Evaluation", "", BEGIN, NOT_EVALUATED, END, "",
              "## Configuration", "", f"The resolved `{stage}` config (also in `stage_config.json` and "
              "`manifest.json`):", "", "```yaml", yaml.safe_dump(config, sort_keys=True).rstrip(), "```", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def write_card(out: Path, stage: str, config: dict, metrics: dict) -> None:
    """README.md for a saved model; config is the stage's resolved config as plain data."""
    from huggingface_hub import ModelCard, ModelCardData

    source = config.get("model") or config.get("student")
    data = ModelCardData(
        base_model=base_model(source),
        datasets=[config["data"]] if _hub_id(config.get("data")) else None,
        tags=["aligndistil", *(TAGS.get(stage, []) if config.get("loss", "dpo") == "dpo" else [config["loss"]])],
        library_name="transformers",
        pipeline_tag="text-generation",
        **inherited_license(source),
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(stage, config, metrics, Path(out).resolve().name)}")
    atomic_write_bytes(Path(out) / CARD, str(card).encode("utf-8"))


def evaluation_section(name: str, eval_out: Path, table: list[str], verdict: str | None, plots: list[str]) -> str:
    lines = [f"`aligndistil evaluate` measured this model as `{name}` (report: `{eval_out}/report.md`).", ""]
    lines += table
    if verdict:
        lines += ["", verdict]
    lines += [""] + [f"![{Path(p).stem.replace('_', ' ')}]({EVAL_DIR}/{Path(p).name})" for p in plots]
    return "\n".join(lines)


def with_results(text: str, model_name: str, results: list[dict]) -> str:
    """The card text with its model-index made of results (huggingface_hub EvalResult fields), replacing any
    earlier one: the card shows the latest evaluation, as its evaluation section does."""
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard(text)
    card.data.model_name = model_name if results else None
    card.data.eval_results = [EvalResult(**r) for r in results] or None
    return str(card)


def add_evaluation(model_dir: Path, section: str, plots: list[Path], results: list[dict] = ()) -> bool:
    """Put section (and copies of plots) into a complete aligndistil model's card, and results (EvalResult
    fields) into its model-index; False when it has no card of ours."""
    model_dir = Path(model_dir)
    card = model_dir / CARD
    if not (model_dir / MANIFEST).is_file() or not card.is_file():
        return False
    try:
        read_manifest(model_dir)
    except UserError:
        return False
    text = card.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    (model_dir / EVAL_DIR).mkdir(exist_ok=True)
    copied = []
    for plot in plots:
        shutil.copyfile(plot, model_dir / EVAL_DIR / Path(plot).name)
        copied.append(f"{EVAL_DIR}/{Path(plot).name}")
    text = with_results(f"{head}{BEGIN}\n{section}\n{END}{tail}", model_dir.resolve().name, list(results))
    atomic_write_bytes(card, text.encode("utf-8"))
    record_outputs(model_dir, [CARD, *copied])
    return True
