"""evaluate --lm-eval: EleutherAI's lm-evaluation-harness on each evaluated model.

The harness is an optional extra (pip install 'aligndistil[lm-eval]'), imported only here and only
when --lm-eval names tasks. It scores the model evaluate loaded, through its HFLM class, so nothing
is fetched for the model; the padded vocabulary rows get -inf before its softmax and can never be
generated, as everywhere else in aligndistil. Task data comes from local files (task YAMLs in
--lm-eval-tasks-dir) or from the Hugging Face cache of the harness' own tasks.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
import sys

from aligndistil_cli.core.errors import UserError

EXTRA = "pip install 'aligndistil[lm-eval]'"
SOURCE = {"source_name": "lm-evaluation-harness", "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"}
NO_FILTER = "none"


def tasks_of(value: str | None) -> list[str]:
    """'hellaswag, arc_easy' -> ['hellaswag', 'arc_easy']."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def require(value: str | None) -> None:
    """One line naming the extra when --lm-eval names tasks and the harness is not installed."""
    if tasks_of(value) and importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"--lm-eval needs EleutherAI's lm-evaluation-harness (the lm_eval package): {EXTRA}")


def version() -> str:
    from importlib.metadata import version as installed

    return installed("lm-eval")


def task_manager(tasks: list[str], tasks_dir: str | None):
    """The harness' TaskManager that knows every task of tasks, or a one-line UserError naming an unknown one.

    Tasks found in tasks_dir alone are resolved without indexing every task the harness ships (seconds).
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=tasks_dir, include_defaults=False) if tasks_dir else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=tasks_dir)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=1)
            where = f" or in --lm-eval-tasks-dir {tasks_dir}" if tasks_dir else ""
            raise UserError(f"--lm-eval: unknown task {task!r}: not a task, group or tag of lm-eval {version()}{where}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    return manager


def _harness_model(model, tokenizer, max_batch_size: int):
    """The harness' HFLM around a loaded model, with the rows past the tokenizer (padding) never chosen."""
    from lm_eval.models.huggingface import HFLM

    real = len(tokenizer)
    padded = list(range(real, model.get_output_embeddings().weight.shape[0]))

    class PaddedVocabLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            logits[..., real:] = -math.inf
            return logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if padded:
                generation_kwargs["suppress_tokens"] = [*(generation_kwargs.get("suppress_tokens") or []), *padded]
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # "auto": the harness finds the largest batch that fits (halving from max_batch_size on out-of-memory).
    return PaddedVocabLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_size=max_batch_size)


def _metrics(entry: dict) -> dict[str, dict]:
    """The harness' {"acc,none": v, "acc_stderr,none": s, ...} -> {"acc": {"value": v, "stderr": s}}; a metric
    under a filter other than none keeps it: "exact_match,strict-match". A stderr the harness did not compute
    ("N/A") is None."""
    found = {}
    for key, value in entry.items():
        metric, comma, filt = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = entry.get(f"{metric}_stderr,{filt}")
        found[metric if filt == NO_FILTER else key] = {
            "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return found


def score(model, tokenizer, manager, tasks: list[str], limit: int | None, max_batch_size: int) -> dict:
    """{"scores": {task: {metric: {"value", "stderr"}}}, "samples": {task: documents scored}} of one model.

    A group (mmlu) is reported by its aggregate, a tag by each of its tasks; with limit, the first limit
    documents of each task are scored (not comparable with published numbers then).
    """
    from lm_eval import simple_evaluate

    lm = _harness_model(model, tokenizer, max_batch_size)
    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress; stdout is for results
        found = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                verbosity="ERROR")
    subtasks = {t for members in found.get("group_subtasks", {}).values() for t in members}
    shown = [t for t in found["results"] if t not in subtasks or t in tasks]
    samples = found.get("n-samples", {})
    return {"scores": {t: _metrics(found["results"][t]) for t in shown},
            "samples": {t: samples[t]["effective"] for t in shown if t in samples}}


def card_results(scores: dict[str, dict]) -> list[dict]:
    """One model's harness scores as huggingface_hub EvalResult fields (the card's model-index)."""
    return [{"task_type": "text-generation", "dataset_type": task, "dataset_name": task, "metric_type": metric,
             "metric_value": round(m["value"], 6), **SOURCE}
            for task, metrics in scores.items() for metric, m in metrics.items()]
