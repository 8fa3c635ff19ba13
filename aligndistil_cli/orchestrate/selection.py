"""A sweep's teachers, chosen per seed without looking at the gold reward.

The candidates are (DPO, reverse DPO) pairs trained at every (lr, epochs) of the sweep's grid: the
same options the DPO baseline gets. A pair's score is the mean of two held-out implicit-reward
accuracies: DPO's, how often beta (log pi_dpo - log pi_ref) ranks the chosen response over the
rejected one, and reverse DPO's at its own task (the rejected over the chosen). The choice follows
the one-standard-error rule: the least-trained pair (smallest lr x epochs) whose score is within one
standard error of the best score. Scores a few hundred pairs apart are noise, and a longer-trained
pair extrapolates further from the reference for no measured gain. The held-out pairs leave out
every pair whose prompt is one of the evaluation prompts. The chosen pair is linked as DIR/dpo and DIR/rev,
with selection.json beside them, so that "{dpo}" and "{rev}" name it before it is known.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from aligndistil_cli.config.stages import DpoConfig
from aligndistil_cli.core.console import say
from aligndistil_cli.data.encode import collate, encode_pairs, load_data
from aligndistil_cli.data.sources import flatten_plain
from aligndistil_cli.model.loading import load_model, load_tokenizer, pick_device, sequence_logps
from aligndistil_cli.rundir.artifacts import atomic_write_json


@dataclass(frozen=True)
class Selection:
    out: str                  # the directory of the links and selection.json
    candidates: tuple         # ((lr, epochs), DPO config, reverse-DPO config) per budget of the grid
    pairs: str                # held-out preference pairs
    exclude: tuple[str, int]  # (prompts file, n): its first n prompts are evaluation prompts, left out


@torch.no_grad()
def pair_logps(model, pairs: list, pad_id: int, vocab: int, batch_size: int, device) -> torch.Tensor:
    """[pairs, 2] log-probs of the chosen and the rejected response (encode_pairs' (chosen, rejected) pairs)."""
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id).to(device)
        lp = sequence_logps(model, batch, vocab)
        out.extend(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1).cpu())
    return torch.stack(out)


def held_out_pairs(selection: Selection, config: DpoConfig, tokenizer) -> list:
    """The encoded held-out pairs whose prompts are not evaluation prompts."""
    path, n = selection.exclude
    evaluation = {flatten_plain(r["prompt"]) for r in load_data(dataclasses.replace(config, data=path), "prompts")[0][:n]}
    reader = dataclasses.replace(config, data=selection.pairs)
    rows, stats = load_data(reader, "pairs")
    kept = [r for r in rows if flatten_plain(r["prompt"]) not in evaluation]
    return encode_pairs(tokenizer, kept, reader, stats)[0]


def scores(config: DpoConfig, models: dict, pairs: list, tokenizer, device) -> dict:
    """Held-out accuracy and DPO loss of DPO (chosen over rejected) and reverse DPO (rejected over chosen)."""
    logps = {name: pair_logps(load_model(path, device).eval(), pairs, tokenizer.pad_token_id, len(tokenizer),
                              config.batch_size, device) for name, path in models.items()}
    out = {}
    for name, sign in (("dpo", 1.0), ("rev", -1.0)):
        delta = logps[name] - logps["ref"]
        margin = sign * config.beta * (delta[:, 0] - delta[:, 1])
        out[name] = {"accuracy": (margin > 0).float().mean().item(), "loss": -F.logsigmoid(margin).mean().item()}
    accuracies = [out[name]["accuracy"] for name in ("dpo", "rev")]
    out["score"] = sum(accuracies) / 2
    # the standard error of a mean of two accuracies over len(pairs) pairs, taken as independent
    out["standard_error"] = math.sqrt(sum(a * (1 - a) for a in accuracies) / (4 * len(pairs)))
    out["loss"] = (out["dpo"]["loss"] + out["rev"]["loss"]) / 2
    return out


def _link(target: Path, link: Path) -> None:
    """link -> target, relative (a moved root still reads), replaced atomically."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    os.replace(tmp, link)


def choose_teachers(selection: Selection) -> dict:
    """Score every candidate pair, link the best as OUT/dpo and OUT/rev, write OUT/selection.json; return it."""
    first = selection.candidates[0][1]
    device = pick_device(first.device)
    tokenizer = load_tokenizer(first.model)
    pairs = held_out_pairs(selection, first, tokenizer)
    rows = []
    for (lr, epochs), dpo, rev in selection.candidates:
        result = scores(dpo, {"ref": dpo.model, "dpo": dpo.out, "rev": rev.out}, pairs, tokenizer, device)
        rows.append({"lr": lr, "epochs": epochs, "dpo_dir": dpo.out, "rev_dir": rev.out, **result})
    top = max(rows, key=lambda r: (r["score"], -r["loss"]))
    best = min((r for r in rows if r["score"] >= top["score"] - top["standard_error"]),
               key=lambda r: (r["lr"] * r["epochs"], r["loss"]))
    out = Path(selection.out)
    out.mkdir(parents=True, exist_ok=True)
    _link(Path(best["dpo_dir"]), out / "dpo")
    _link(Path(best["rev_dir"]), out / "rev")
    record = {"criterion": "the smallest lr x epochs within one standard error of the best mean held-out "
                           "implicit-reward accuracy of DPO and reverse DPO",
              "held_out_pairs": len(pairs), "chosen": {"lr": best["lr"], "epochs": best["epochs"]}, "candidates": rows}
    atomic_write_json(out / "selection.json", record)
    say(f"teachers: lr {best['lr']:g}, {best['epochs']} epochs (held-out accuracy "
        f"{best['score']:.3f} over {len(pairs)} pairs) -> {out}")
    return record
