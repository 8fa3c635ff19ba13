"""One module per pipeline stage, each exposing run(config) -> output directory.

STAGES maps each command name to its config class, its run function, a
one-line description and an example; the CLI and `aligndistil run` both read it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aligndistil_cli.config import stages as C
from aligndistil_cli.config.files import config_inputs
from aligndistil_cli.core.errors import UserError


@dataclass(frozen=True)
class Stage:
    config: type
    module: str
    summary: str
    example: str
    distributed: bool = True  # runs under torchrun (`aligndistil run --nproc-per-node N` launches it so)
    by_mode: tuple[tuple[str, str], ...] = ()  # (config.mode, module) pairs: a stage whose modes are separate modules
    report: str | None = None  # the file in OUT a person reads first; its path is the last line the stage prints

    def module_for(self, config) -> str:
        """The module that runs config: the one its mode names, else the stage's own."""
        return dict(self.by_mode).get(getattr(config, "mode", None), self.module)

    @property
    def run(self) -> Callable:
        """The stage's run(config), after the checks that need nothing loaded (see preflight), and followed
        by the --push-to-hub upload once the output is complete."""
        import importlib

        def checked(config):
            preflight(config)
            if already_complete(config):
                out = Path(config.out)
            else:
                out = importlib.import_module(f"{__name__}.{self.module_for(config)}").run(config)
            from aligndistil_cli.train.tracking import is_main_process

            if getattr(config, "push_to_hub", None) and is_main_process():  # once, not from every torchrun rank
                from aligndistil_cli.rundir.hub import push

                print(f"pushed {out} to {push(out, config.push_to_hub, config.hub_private)}", file=sys.stderr)
            return out

        return checked


def preflight(config) -> None:
    """Fail in one line, before any data or model loads, on an output directory that cannot be written, on
    a model that is neither a directory nor a reachable hub id (a mistyped path), on an --out that overlaps an
    input, on a --report-to tracker whose package is missing, and on a --chat-template that is neither a mode
    nor a file."""
    from aligndistil_cli.data import chat
    from aligndistil_cli.model.loading import model_source
    from aligndistil_cli.rundir.artifacts import check_output_dir
    from aligndistil_cli.train.tracking import require

    require(getattr(config, "report_to", None))
    if hasattr(config, "chat_template"):
        chat.check(config.chat_template)
    check_output_dir(config.out)
    check_apart_from_inputs(config)
    for given in config_inputs(config):
        if given.kind == "model":
            model_source(given.path, getattr(config, "revision", None))


def already_complete(config) -> bool:
    """--resume on an output that is already complete: True, said on stderr, when it was made with this config
    (bar how to run it: train.loop.RESUME_FREE) and these inputs, so nothing is left to train; one line of
    refusal naming what differs when it was made otherwise, since training anew would replace a finished
    output that --resume asked to keep."""
    from aligndistil_cli.core.console import stderr
    from aligndistil_cli.rundir.artifacts import is_complete
    from aligndistil_cli.rundir.current import difference
    from aligndistil_cli.rundir.outdir import owner
    from aligndistil_cli.train.loop import RESUME_FREE

    out = Path(config.out)
    if not getattr(config, "resume", False) or not is_complete(out):
        return False
    why = difference(config, free=RESUME_FREE)
    if why:
        raise UserError(f"--resume: {out} is already a complete {owner(out)} output, but not of what is asked now "
                        f"({why}); nothing to resume: pass --force to train it again")
    stderr.print(f"{owner(out)}: {out} is already complete (same config and inputs); nothing to resume "
                 "(--force trains it again)", highlight=False, soft_wrap=True)
    return True


def check_apart_from_inputs(config) -> None:
    """Refuse, whatever --force says, an --out that is, contains or is inside one of the stage's inputs: OUT is
    emptied (with --force, of anything) before the stage writes, and what it writes would change the input."""
    out = os.path.realpath(Path(config.out).expanduser())
    for given in config_inputs(config):
        path = Path(given.path).expanduser()
        if not path.exists():  # a hub id, or a missing file that the stage names when it reads it
            continue
        real = os.path.realpath(path)
        common = os.path.commonpath([real, out])
        relation = "is" if real == out else "contains" if common == out else "is inside" if common == real else None
        if relation:
            raise UserError(f"--out {config.out} {relation} the stage's input {given.given_as}; the output directory "
                            "must be apart from every input (it is emptied before the stage writes, whatever "
                            "--force says)")


STAGES: dict[str, Stage] = {
    "init-toy": Stage(C.InitToyConfig, "init_toy", "Write the embedded toy task's data and a random-init tiny Llama.",
                      "aligndistil init-toy --out runs/tiny/toy", distributed=False),
    "sft": Stage(C.SftConfig, "sft", "Supervised fine-tuning on prompt/response data.",
                 "aligndistil sft --model runs/tiny/toy/model --data runs/tiny/toy/sft.jsonl --out runs/tiny/sft"),
    "make-prefs": Stage(C.MakePrefsConfig, "make_prefs", "Sample k responses per prompt, score them, write best-vs-worst pairs.",
                        "aligndistil make-prefs --model runs/tiny/sft --data runs/tiny/toy/prompts.jsonl --num-samples 4"
                        " --out runs/tiny/prefs"),
    "train-dpo": Stage(C.DpoConfig, "dpo", "Train DPO against cached reference log-probs (--loss simpo, tdpo1, tdpo2: "
                       "the paper's baselines).",
                       "aligndistil train-dpo --model runs/tiny/sft --data runs/tiny/prefs/pairs.jsonl --out runs/tiny/dpo"),
    "train-reverse-dpo": Stage(C.DpoConfig, "dpo",
                               "Train reverse DPO (chosen and rejected swapped); same as train-dpo --reverse.",
                               "aligndistil train-reverse-dpo --model runs/tiny/sft --data runs/tiny/prefs/pairs.jsonl"
                               " --out runs/tiny/rev"),
    "precompute": Stage(C.PrecomputeConfig, "precompute",
                        "Compose the AlignDistil teacher once and cache it as safetensors shards.",
                        "aligndistil precompute --dpo runs/tiny/dpo --rev runs/tiny/rev --data runs/tiny/prefs/pairs.jsonl"
                        " --out runs/tiny/teacher"),
    "distill": Stage(C.DistillConfig, "distill", "Distil the student from the cached teacher (off-policy AlignDistil).",
                     "aligndistil distill --student runs/tiny/sft --cache runs/tiny/teacher --data runs/tiny/prefs/pairs.jsonl"
                     " --out runs/tiny/student",
                     by_mode=(("on-policy", "on_policy"),)),
    "evaluate": Stage(C.EvaluateConfig, "evaluate", "Gold reward, KL to the reference, win rate, lengths; report.md with plots.",
                      "aligndistil evaluate --ref runs/tiny/sft --model dpo=runs/tiny/dpo --model student=runs/tiny/student "
                      "--prompts runs/tiny/toy/heldout_prompts.jsonl --out runs/tiny/eval", report="report.md"),
}
