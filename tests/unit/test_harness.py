"""evaluate --lm-eval's harness wrapper (eval/harness.py) on a tiny random model and local task files, against
log-likelihoods and greedy continuations computed here with a plain forward (float64, padded rows at -inf)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from aligndistil_cli.core.errors import UserError  # noqa: E402
from aligndistil_cli.eval import harness  # noqa: E402

CONTEXTS = ["the pizza was", "we visited on monday .", "i did not like the", "the staff was very",
            "write a review about the", "overall it was"]


def log_probs(model, tokenizer, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 next-token log-probs of a plain forward, the padded rows at -inf."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logits[:, len(tokenizer):] = -math.inf
    return torch.log_softmax(logits, dim=-1)


def oracle_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether each token is the argmax."""
    ids = tokenizer(f"{context} {continuation}")["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    lp = log_probs(model, tokenizer, ids)
    picked = [lp[i - 1, ids[i]].item() for i in range(start, len(ids))]
    greedy = all(lp[i - 1].argmax().item() == ids[i] for i in range(start, len(ids)))
    return sum(picked), greedy


def oracle_greedy(model, tokenizer, context: str, tokens: int) -> str:
    ids = tokenizer(context)["input_ids"]
    new = []
    for _ in range(tokens):
        nxt = log_probs(model, tokenizer, ids + new)[-1].argmax().item()
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new)


def write_task(directory, name: str, rows: list[dict], spec: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {directory.parent / 'datasets-cache'}\ntest_split: test\ndoc_to_text: '{{{{context}}}}'\n"
        + spec)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tiny, toy_tokenizer):
    """toy_ll: the greedy two-token continuation of some contexts, another continuation of the others (a
    loglikelihood task's target carries its own leading space); toy_gen: each context's greedy continuation as
    the answer, and one wrong answer."""
    directory = tmp_path_factory.mktemp("harness") / "tasks"
    directory.mkdir()
    greedy = [oracle_greedy(tiny, toy_tokenizer, c, 2) for c in CONTEXTS]
    ll_rows = [{"context": c, "continuation": g if i % 2 else "pizza ."} for i, (c, g) in enumerate(zip(CONTEXTS, greedy))]
    write_task(directory, "toy_ll", ll_rows, "output_type: loglikelihood\ndoc_to_target: ' {{continuation}}'\n"
               "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    gen_rows = [{"context": c, "answer": oracle_greedy(tiny, toy_tokenizer, c, 3)} for c in CONTEXTS]
    gen_rows[0]["answer"] = "not what it says"
    write_task(directory, "toy_gen", gen_rows, "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
               "generation_kwargs:\n  until: ['\\n\\n']\n  do_sample: false\n  max_gen_toks: 3\n"
               "metric_list:\n  - metric: exact_match\n")
    return directory, ll_rows, gen_rows


def test_loglikelihoods_and_greedy_tokens_match_a_plain_forward_with_padded_rows_masked(tiny, toy_tokenizer,
                                                                                           tasks_dir):
    """The tiny model favours its padded rows strongly: unmasked, no continuation would be greedy and every
    log-likelihood would be far lower."""
    directory, rows, _ = tasks_dir
    manager = harness.task_manager(["toy_ll"], str(directory))
    found = harness.score(tiny, toy_tokenizer, manager, ["toy_ll"], None, 4)
    expected = [oracle_loglikelihood(tiny, toy_tokenizer, r["context"], r["continuation"]) for r in rows]
    acc = sum(g for _, g in expected) / len(expected)
    assert 0 < acc < 1, "the task must hold greedy and non-greedy continuations"
    metrics = found["scores"]["toy_ll"]
    assert metrics["acc"]["value"] == pytest.approx(acc, abs=1e-12)
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(-sum(ll for ll, _ in expected) / len(rows)),
                                                           rel=1e-5)
    assert metrics["acc"]["stderr"] == pytest.approx(torch.tensor([float(g) for _, g in expected]).std().item()
                                                     / math.sqrt(len(rows)), rel=1e-6)
    assert found["samples"] == {"toy_ll": len(rows)}


def test_greedy_generation_never_emits_a_padded_row(tiny, toy_tokenizer, tasks_dir):
    directory, _, rows = tasks_dir
    manager = harness.task_manager(["toy_gen"], str(directory))
    found = harness.score(tiny, toy_tokenizer, manager, ["toy_gen"], 4, 4)
    assert found["samples"] == {"toy_gen": 4}
    assert found["scores"]["toy_gen"]["exact_match"]["value"] == pytest.approx(3 / 4)


def test_an_unknown_task_is_one_line_with_a_suggestion(tasks_dir):
    directory, _, _ = tasks_dir
    with pytest.raises(UserError, match=r"^--lm-eval: unknown task 'toy_lll': .* or in --lm-eval-tasks-dir .*; "
                                        r"did you mean 'toy_ll'\?$"):
        harness.task_manager(["toy_lll"], str(directory))


def test_card_results_are_one_entry_per_task_and_metric():
    scores = {"toy_ll": {"acc": {"value": 0.5, "stderr": 0.2}, "perplexity": {"value": 30.0, "stderr": None}}}
    entries = harness.card_results(scores)
    assert [(e["dataset_type"], e["metric_type"], e["metric_value"]) for e in entries] == [
        ("toy_ll", "acc", 0.5), ("toy_ll", "perplexity", 30.0)]
    assert all(e["source_name"] == "lm-evaluation-harness" for e in entries)


def test_metric_keys_drop_the_none_filter_and_keep_others():
    entry = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
             "acc,none": 0.5, "acc_stderr,none": "N/A"}
    assert harness._metrics(entry) == {"exact_match,strict-match": {"value": 0.25, "stderr": 0.1},
                                       "acc": {"value": 0.5, "stderr": None}}
