"""Run several stages in one torchrun launch (one process group), as the tests need them.

    torchrun --nproc-per-node 2 tests/distributed/run_stages.py STAGE=CONFIG.yaml ... [mismatch=OUT.json]

Each STAGE=CONFIG runs like `aligndistil STAGE --config CONFIG` does (distributed.session, then the stage);
STAGE/NAME=CONFIG names a second run of a stage (distill/on-policy=CONFIG runs distill); a NAME that starts
with "interrupted" stops the run right after its first checkpoint, as a kill at that moment would.
Each of these records, per rank, the refusal it got in OUT.json:
- mismatch=OUT.json gives rank 1 a different seed than rank 0;
- divergent=OUT.json makes rank 1 see other data under the same path (a node-local copy that differs);
- unshared=DIR checks DIR as shared, with rank 1 seeing its own DIR-rank1 instead (a node-local disk).
teacher-rss=MODEL (student-rss=MODEL) loads MODEL as a sharded teacher (as a student) and writes
MODEL-teacher-rss.json (MODEL-student-rss.json): per rank, the peak host memory (VmHWM) above what the
process held before, and the bytes of its own shards. One per launch: memory freed by the first would
hide the second's.
dpo-rss=CONFIG runs train-dpo with CONFIG (a launch of its own too) and writes CONFIG-rss.json: per rank, the
peak host memory above the start through loading and the reference pass (until training begins), and over
the whole stage. save-rss=CONFIG runs sft with CONFIG and writes CONFIG-save-rss.json: per rank, the peak
host memory above the start of its first checkpoint's save, through the save.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from aligndistil_cli.config.files import load_config
from aligndistil_cli.config.stages import SftConfig
from aligndistil_cli.core.errors import UserError
from aligndistil_cli.model.loading import load_student, load_teacher
from aligndistil_cli.parallel import distributed, fsdp
from aligndistil_cli.rundir import artifacts, outdir
from aligndistil_cli.stages import STAGES
from aligndistil_cli.train import checkpoint


class Interrupted(Exception):
    """A stage stopped right after its first checkpoint."""


@contextmanager
def patched(module, name: str, wrap):
    """module.name replaced by wrap(the real one) inside."""
    real = getattr(module, name)
    setattr(module, name, wrap(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def run_stage(stage: str, config) -> None:
    """As `aligndistil STAGE --config ...` runs it."""
    with distributed.session(config, lambda: by_path(config)):
        STAGES[stage].run(config)


@contextmanager
def interrupted_after_first_checkpoint():
    """Stop the stage run inside right after its first checkpoint is complete (on every rank), leaving the
    checkpoint and no manifest, as a kill would."""
    def stop_after(real):
        def save(out, *args, **kwargs):
            real(out, *args, **kwargs)
            raise Interrupted(out)
        return save

    try:
        with patched(checkpoint, "save", stop_after):
            yield
    except Interrupted as stop:
        outdir.release(stop.args[0])  # a killed process's lock on OUT goes with it


def refusal(fn, *args) -> str | None:
    try:
        fn(*args)
    except UserError as e:
        return str(e)
    return None


def by_path(config) -> dict[str, str]:
    """The inputs' fingerprints as the CLI hands them to distributed.session."""
    return {i["path"]: i["fingerprint"] for i in checkpoint.input_fingerprints(config).values()}


def check_session(seed: int) -> None:
    config = load_config(STAGES["sft"].config, None, {"model": "m", "data": "d", "out": "o", "seed": seed})
    with distributed.session(config, lambda: by_path(config)):
        pass


def diverge(_) -> None:
    """Rank 1 reads other content than rank 0 under the data path."""
    real = artifacts.fingerprint_data
    if distributed.rank() == 1:
        artifacts.fingerprint_data = lambda path: real(path) + "-rank1"
    try:
        check_session(0)
    finally:
        artifacts.fingerprint_data = real


def unshared(out: str) -> None:
    local = Path(f"{out}-rank1")
    for d in (Path(out), local):
        d.mkdir(exist_ok=True)
    distributed.check_shared_dir(out, "--out", local if distributed.rank() == 1 else None)


def load_rss(kind: str, path: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the model's code imported, so that its memory is not counted as the weights'
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
    before = proc_bytes("VmRSS")
    cpu = torch.device("cpu")
    model = load_teacher(path, cpu, torch.float32, None, shard=True) if kind == "teacher" else \
        load_student(path, cpu, SftConfig(model=path, data="d", out="o"))
    peaks = distributed.gather_objects({"peak_above_start": proc_bytes("VmHWM") - before,
                                        "shard_bytes": fsdp.local_bytes(model)})
    if distributed.is_main():
        Path(f"{path}-{kind}-rss.json").write_text(json.dumps(peaks))


def dpo_rss(path: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    import aligndistil_cli.stages.dpo as dpo

    config = load_config(STAGES["train-dpo"].config, path, {})
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model))
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_bytes("VmRSS")
    peaks = {}

    def peak_before(real):
        def train(*args, **kwargs):
            peaks["before_training"] = proc_bytes("VmHWM") - before
            return real(*args, **kwargs)
        return train

    with patched(dpo, "train", peak_before):
        run_stage("train-dpo", config)
    peaks["stage"] = proc_bytes("VmHWM") - before
    peaks = distributed.gather_objects(peaks)
    if distributed.is_main():
        Path(f"{path}-rss.json").write_text(json.dumps(peaks))


def save_rss(path: str) -> None:
    config = load_config(STAGES["sft"].config, path, {})
    peaks = []

    def peak_of(real):
        def save(*args, **kwargs):
            Path("/proc/self/clear_refs").write_text("5")
            before = proc_bytes("VmRSS")
            saved = real(*args, **kwargs)
            peaks.append(proc_bytes("VmHWM") - before)
            return saved
        return save

    with patched(checkpoint, "save", peak_of):
        run_stage("sft", config)
    peaks = distributed.gather_objects({"first_save": peaks[0]})
    if distributed.is_main():
        Path(f"{path}-save-rss.json").write_text(json.dumps(peaks))


def proc_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


CHECKS = {"mismatch": lambda _: check_session(distributed.rank()), "divergent": diverge, "unshared": unshared}


def main(args: list[str]) -> None:
    dist.init_process_group("gloo")
    for arg in args:
        stage, path = arg.split("=", 1)
        if stage in ("teacher-rss", "student-rss"):
            load_rss(stage.split("-")[0], path)
            continue
        if stage in ("dpo-rss", "save-rss"):
            (dpo_rss if stage == "dpo-rss" else save_rss)(path)
            continue
        if stage in CHECKS:
            refusals = distributed.gather_objects(refusal(CHECKS[stage], path))
            if distributed.is_main():
                with open(f"{path}.json" if stage == "unshared" else path, "w", encoding="utf-8") as f:
                    json.dump(refusals, f)
            continue
        stage, _, name = stage.partition("/")
        config = load_config(STAGES[stage].config, path, {"reverse": True} if stage == "train-reverse-dpo" else {})
        stop = interrupted_after_first_checkpoint() if name.startswith("interrupted") else nullcontext()
        with stop:
            run_stage(stage, config)
    dist.barrier()
    # Every output is on disk and every collective done. A process that exits with its gloo group still
    # alive can abort in the interpreter's teardown: gloo's worker threads still hold work objects whose
    # tensors need the GIL (pytorch/pytorch#179291). Rank 0 of this harness, which used to leave without
    # destroying its group, aborted so in two full-suite runs ("terminate called without an active
    # exception", exit -6) after mismatch.json, the last output, was written. The CLI's own path
    # (distributed.session) destroys its group; here it is destroyed too, and os._exit then skips the
    # remaining teardown, which has nothing left to do.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
