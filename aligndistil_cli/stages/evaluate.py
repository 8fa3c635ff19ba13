"""evaluate: sample every model on held-out prompts with one seed and compare.

Per model: mean gold reward (95% interval), KL(model || reference) estimated
from the model's own samples, win rate against the reference's response to
the same prompt, and the length distribution. On held-out pairs: the
implicit-reward accuracy of DPO, beta (log pi_dpo - log pi_ref), and of the
contrastive reward, beta (log pi_dpo - log pi_rev).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from aligndistil_cli.config.groups import Tracking
from aligndistil_cli.config.stages import EvaluateConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.core.hashing import config_dict
from aligndistil_cli.data import chat
from aligndistil_cli.data.encode import collate, data_input, encode_pairs, encode_prompts, load_data, truncate
from aligndistil_cli.data.sources import flatten_plain
from aligndistil_cli.eval import curves, harness
from aligndistil_cli.eval.export import export, make_generate_fn, read_questions
from aligndistil_cli.eval.report import (
    CONVERGED_KL,
    card_results,
    kl_estimate,
    length_stats,
    lm_eval_markdown,
    mean_ci,
    print_report,
    results_markdown,
    unconverged,
    win_rate,
    write_report,
)
from aligndistil_cli.eval.scoring import make_scorer, refuse_foreign_prompts
from aligndistil_cli.model.loading import hub_options, load_model, load_tokenizer, pick_device, sequence_logps
from aligndistil_cli.model.sampling import generate, score_samples
from aligndistil_cli.parallel import distributed
from aligndistil_cli.rundir.artifacts import (
    atomic_write_json,
    fingerprint_data,
    fingerprint_model,
    input_record,
    prepare_output,
    recorded_path,
)
from aligndistil_cli.rundir.card import add_evaluation, evaluation_section
from aligndistil_cli.rundir.finish import finalize
from aligndistil_cli.teacher.evaluation import LoadedTeacher, load_teacher, teacher_diagnostics
from aligndistil_cli.teacher.sampling import generate_teacher
from aligndistil_cli.train import tracking
from aligndistil_cli.train.loop import seed_everything


def held_out_ids(tokenizer, ids: list[list[int]], config: EvaluateConfig) -> list[list[int]]:
    """The prompts' ids, as encode_prompts rendered them, cut to --max-prompt-length as training cut them."""
    return [truncate(tokenizer, i, [], config.max_length, config.max_prompt_length)[0].prompt for i in ids]


def summarise(path: str, samples, rewards: list[float], own: list[float], ref: list[float], config: EvaluateConfig,
              ref_rewards: list[float] | None) -> dict:
    """One model's row of the report from its samples, their rewards and their log-probs under it and the ref."""
    return {
        "path": path,
        "reward": mean_ci(rewards),
        "kl": kl_estimate(own, ref),
        "win_rate": win_rate(rewards, ref_rewards) if ref_rewards is not None else None,
        "length": length_stats([len(s.response_ids) for s in samples], config.max_new_tokens),
        "examples": [{"prompt": flatten_plain(s.prompt), "response": s.text, "reward": r}
                     for s, r in zip(samples[:3], rewards[:3])],
    }


def manifest_of(path) -> dict:
    """A local output directory's manifest ({} for a hub model or a directory without one)."""
    file = Path(path) / "manifest.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def cache_health(path) -> dict | None:
    """The teacher health check recorded by the precompute behind path: a cache, or a student distilled from one."""
    manifest = manifest_of(path)
    if manifest.get("stage") != "precompute":
        record = manifest.get("inputs", {}).get("cache")
        manifest = manifest_of(recorded_path(record, Path(path))) if record else {}
    return manifest.get("metrics", {}).get("health")


def evaluate_model(name, path, ref_model, tokenizer, prompts, ids, config, device, scorer, ref_rewards=None):
    model = ref_model if path is None else load_model(path, device, **hub_options(config)).eval()
    samples = generate(model, tokenizer, prompts, ids, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, top_p=config.top_p, batch_size=config.batch_size,
                       seed=config.seed, desc=f"evaluate {name}", split=True, kv_cache=config.kv_cache)
    rewards = distributed.split_map(scorer.score, samples)
    if config.export and distributed.is_main():
        # A benchmark's questions are the user turns of a chat: they are rendered as conversational rows.
        template = chat.resolve(tokenizer, config.chat_template).for_row(conversational=True)
        generate_fn = make_generate_fn(model, tokenizer, template=template,
                                       max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p, batch_size=config.batch_size, seed=config.seed,
                                       kv_cache=config.kv_cache)
        export(config.export, read_questions(config.export, Path(config.export_questions)), name, generate_fn,
               Path(config.out) / "exports")
    own = score_samples(model, tokenizer, samples, config.batch_size, split=True)
    ref = own if model is ref_model else score_samples(ref_model, tokenizer, samples, config.batch_size, split=True)
    result = summarise(str(path) if path else str(config.ref), samples, rewards, own, ref, config, ref_rewards)
    final_kl = manifest_of(path).get("metrics", {}).get("final_kl_teacher") if path else None
    return ({**result, "final_kl_teacher": final_kl} if final_kl is not None else result), rewards


def evaluate_teacher(teacher: LoadedTeacher, ref_model, tokenizer, prompts, ids, config, scorer, ref_rewards) -> dict:
    """The composed teacher's row: sampled from softmax(z*), its KL from its own log-probs of its samples.

    Every rank samples all prompts with the same seed (the teacher is not sharded across ranks).
    """
    samples, own = generate_teacher(teacher.models, teacher.spec, tokenizer, prompts, ids,
                                    max_new_tokens=config.max_new_tokens,
                                    temperature=config.temperature, top_p=config.top_p, batch_size=config.batch_size,
                                    seed=config.seed, desc=f"evaluate {config.teacher_name}",
                                    kv_cache=config.kv_cache)
    ref = score_samples(ref_model, tokenizer, samples, config.batch_size)
    result = summarise(teacher.source, samples, scorer.score(samples), own, ref, config, ref_rewards)
    return {**result, "teacher_spec": dataclasses.asdict(teacher.spec)}


@torch.no_grad()
def implicit_accuracy(config: EvaluateConfig, ref_model, tokenizer, device) -> dict:
    """Accuracy of beta*(log pi_dpo - log pi_ref) and beta*(log pi_dpo - log pi_rev) on held-out pairs."""
    rows, stats = load_data(config, "pairs", config.pairs)
    pairs, _ = encode_pairs(tokenizer, rows, config, stats)
    vocab = len(tokenizer)

    def part_logps(model, part: list) -> list[torch.Tensor]:
        out = []
        for s in range(0, len(part), config.batch_size):
            chunk = part[s : s + config.batch_size]
            batch = collate([c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id).to(device)
            lp = sequence_logps(model, batch, vocab)
            out.extend(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1).cpu())
        return out

    def logps(model) -> torch.Tensor:
        """[pairs, 2] chosen and rejected log-probs; under torchrun each rank scores its share."""
        return torch.stack(distributed.split_map(lambda part: part_logps(model, part), pairs))

    dpo = logps(load_model(config.dpo, device, **hub_options(config)).eval())
    ref = logps(ref_model)
    result = {"num_pairs": len(pairs), "dpo": ((dpo - ref)[:, 0] > (dpo - ref)[:, 1]).float().mean().item()}
    if config.rev:
        rev = logps(load_model(config.rev, device, **hub_options(config)).eval())
        result["contrastive"] = ((dpo - rev)[:, 0] > (dpo - rev)[:, 1]).float().mean().item()
    return result


# KLs within this share of the larger one are matched: a reward difference then compares like with like.
MATCHED_KL = 0.2


def _compare(a: dict, b: dict) -> tuple[str, float]:
    """('beats' | 'is worse than' | 'is not distinguishable (...) from', reward difference) of a against b."""
    ra, rb = a["reward"], b["reward"]
    if ra["lo"] > rb["hi"]:
        return "beats", ra["mean"] - rb["mean"]
    if ra["hi"] < rb["lo"]:
        return "is worse than", ra["mean"] - rb["mean"]
    return "is not distinguishable (overlapping 95% intervals) from", ra["mean"] - rb["mean"]


def _kl_clause(a: dict, b: dict) -> str:
    ka, kb = a["kl"]["mean"], b["kl"]["mean"]
    if abs(ka - kb) <= MATCHED_KL * max(abs(ka), abs(kb)):
        return f"at matched KL ({ka:.2f} and {kb:.2f} nats)"
    return f"at KLs that differ by {abs(ka - kb):.2f} nats ({ka:.2f} against {kb:.2f}), so not like for like"


def _label(name: str, res: dict) -> str:
    if not unconverged(res):
        return name
    return (f"{name} (unconverged: final KL to its teacher {res['final_kl_teacher']:.3f} > {CONVERGED_KL} nats/token, "
            "so not a result of its method)")


def verdicts(report: dict) -> list[str]:
    """One honest sentence per model against the reference, then per pair of other models: better, worse or
    indistinguishable on the reward, whether their KLs match, and whether a student converged."""
    reward = report.get("reward_name", "gold reward")
    ref_name = report["reference"]
    models = report["models"]
    others = [n for n in models if n != ref_name]
    lines = []
    for name in others:
        res, ref = models[name], models[ref_name]
        word, diff = _compare(res, ref)
        lines.append(f"{_label(name, res)} {word} {ref_name} on {reward} ({res['reward']['mean']:+.3f} vs "
                     f"{ref['reward']['mean']:+.3f}, difference {diff:+.3f}) at KL {res['kl']['mean']:.2f} nats from "
                     f"it and mean length {res['length']['mean']:.1f} tokens (cap rate {res['length']['cap_rate']:.0%}).")
    for i, a in enumerate(others):
        for b in others[i + 1 :]:
            word, diff = _compare(models[a], models[b])
            lines.append(f"{_label(a, models[a])} {word} {_label(b, models[b])} on {reward} (difference {diff:+.3f}) "
                         f"{_kl_clause(models[a], models[b])}.")
    return lines


def run(config: EvaluateConfig) -> Path:
    if config.pairs and not (config.dpo or config.teacher):
        raise UserError("evaluate: --pairs needs --dpo (implicit-reward accuracy) or --teacher (p(EOS) diagnostics)")
    harness.require(config.lm_eval)
    tasks = harness.tasks_of(config.lm_eval)
    manager = harness.task_manager(tasks, config.lm_eval_tasks_dir) if tasks else None  # an unknown task fails here
    seed_everything(config.seed)
    device = pick_device(config.device)
    rows, data_stats = load_data(config, "prompts", config.prompts)
    tokenizer = load_tokenizer(config.ref, **hub_options(config))
    rows, ids = encode_prompts(tokenizer, rows, config, data_stats)
    prompts, ids = [r["prompt"] for r in rows][: config.num_prompts], held_out_ids(tokenizer, ids[: config.num_prompts],
                                                                                   config)
    if not config.reward_model:
        refuse_foreign_prompts(prompts, config.prompts)
    ref_model = load_model(config.ref, device, **hub_options(config)).eval()
    out = prepare_output(Path(config.out), "evaluate", config.force)
    scorer = make_scorer(config.reward_model, config.chat_template, device)
    ref_result, ref_rewards = evaluate_model(config.ref_name, None, ref_model, tokenizer, prompts, ids, config, device,
                                             scorer)
    models = {config.ref_name: ref_result}
    for name, path in config.models.items():
        models[name], _ = evaluate_model(name, path, ref_model, tokenizer, prompts, ids, config, device, scorer,
                                         ref_rewards)
    teacher = load_teacher(config, tokenizer, ref_model, device) if config.teacher else None
    if teacher:
        models[config.teacher_name] = evaluate_teacher(teacher, ref_model, tokenizer, prompts, ids, config, scorer,
                                                       ref_rewards)
    # The reference's curves too: it is trained by the pipeline's first stage (sft).
    training = {name: str(Path(path) / "metrics.jsonl") for name, path in {config.ref_name: config.ref,
                                                                            **config.models}.items()
                if (Path(path) / "metrics.jsonl").is_file()}
    diagnostics = teacher_diagnostics(config, teacher, ref_model, tokenizer, device) if teacher and config.pairs else None
    report = {"task": f"held-out prompts from {config.prompts}, scored by the {scorer.name}",
              "reward_name": scorer.column, "num_prompts": len(prompts), "max_new_tokens": config.max_new_tokens,
              "reference": config.ref_name, "models": models, "training": training,
              "implicit_accuracy": implicit_accuracy(config, ref_model, tokenizer, device)
              if config.pairs and config.dpo else None,
              "teacher_diagnostics": diagnostics,
              "teacher_health": teacher_health_of(config, diagnostics),
              # Last: the harness reseeds every random generator of the process.
              "lm_eval": lm_eval_report(config, manager, tasks, ref_model, tokenizer, device) if manager else None}
    report["verdict"] = verdicts(report)
    if distributed.is_main():
        atomic_write_json(out / "report.json", report, sort_keys=False)
        written = write_report(out, report)
        log_report(config, out, report)
    inputs = {name: input_record("model", path, fingerprint_model(path)) for name, path in config.models.items()}
    inputs["ref"] = input_record("model", config.ref, fingerprint_model(config.ref))
    if teacher:
        inputs.update(teacher.inputs)
    inputs["prompts"] = data_input(config, config.prompts)
    if config.lm_eval_tasks_dir:
        inputs["lm_eval_tasks_dir"] = input_record("data", config.lm_eval_tasks_dir,
                                                   fingerprint_data(config.lm_eval_tasks_dir))
    metrics = {name: {"reward": res["reward"]["mean"], "kl": res["kl"]["mean"]} for name, res in models.items()}
    finalize(out, "evaluate", config, inputs, metrics)
    if distributed.is_main():
        add_to_cards({config.ref_name: config.ref, **config.models}, report, out, written[1:], config.prompts)
        print_report(out)
    return out


def teacher_health_of(config: EvaluateConfig, diagnostics: dict | None) -> dict:
    """name -> the teacher health check behind each evaluated model: its cache's (precompute's record), and the
    sampled teacher's own (diagnostics, when --pairs gave chosen responses to check it on)."""
    health = {name: cache_health(path) for name, path in config.models.items()}
    if config.teacher:
        health[config.teacher_name] = diagnostics or (cache_health(config.teacher) if config.teacher != "models"
                                                      else None)
    return {name: h for name, h in health.items() if h}


def log_report(config: EvaluateConfig, out: Path, report: dict) -> None:
    """The final table to the --report-to trackers: one scalar per model and column, and the table."""
    trackers = tracking.start(Tracking.of(config), out, config_dict(config))
    try:
        columns = ["model", "reward", "reward_lo", "reward_hi", "kl", "win_rate", "mean_length", "cap_rate"]
        rows = []
        for name, res in report["models"].items():
            win = res["win_rate"]["mean"] if res.get("win_rate") else None
            rows.append([name, res["reward"]["mean"], res["reward"]["lo"], res["reward"]["hi"], res["kl"]["mean"],
                         win, res["length"]["mean"], res["length"]["cap_rate"]])
            trackers.log({"step": 0, **{f"eval/{name}/{c}": v for c, v in zip(columns[1:], rows[-1][1:])
                                        if v is not None}})
        trackers.log_table("evaluation", columns, rows)
    finally:
        trackers.close()


def add_to_cards(models: dict[str, str], report: dict, out: Path, plots: list[str], prompts: str) -> None:
    """Each evaluated aligndistil model's card gets the tables, its verdict and the plots (the comparisons, and the
    training curves of that model only), and its own results in its model-index."""
    table = results_markdown(report)
    if report.get("lm_eval"):
        table += [""] + lm_eval_markdown(report["lm_eval"])
    for name, path in models.items():
        verdict = next((v for v in report["verdict"] if v.startswith(f"{name} ")), None)
        own = [p for p in plots if not p.startswith("training_curves") or p == curves.file_name(name)]
        add_evaluation(Path(path), evaluation_section(name, out, table, verdict, own), [out / p for p in own],
                       card_results(report, name, prompts))


def lm_eval_report(config: EvaluateConfig, manager, tasks: list[str], ref_model, tokenizer, device) -> dict:
    """The harness' scores of the reference and of each model; under torchrun each rank scores its share of the
    models, whole."""
    named = [(config.ref_name, None), *config.models.items()]

    def score(part: list) -> list[dict]:
        return [harness.score(ref_model if path is None else load_model(path, device, **hub_options(config)).eval(),
                              tokenizer, manager, tasks, config.lm_eval_limit, config.batch_size)
                for _, path in part]

    found = distributed.split_map(score, named)
    return {"tasks": tasks, "version": harness.version(), "limit": config.lm_eval_limit,
            "samples": found[0]["samples"], "scores": {name: f["scores"] for (name, _), f in zip(named, found)}}
