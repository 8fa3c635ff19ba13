"""Run several stages in one torchrun launch (one process group), as the tests need them.

    torchrun --nproc-per-node 2 tests/distributed/run_stages.py STAGE=CONFIG.yaml ... [mismatch=OUT.json]

Each STAGE=CONFIG runs like `aligndistil STAGE --config CONFIG` does (distributed.session, then the stage);
STAGE/NAME=CONFIG names a second run of a stage (distill/on-policy=CONFIG runs distill).
mismatch=OUT.json gives rank 1 a different seed than rank 0 and records, per rank, the refusal it got.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from aligndistil_cli import distributed
from aligndistil_cli.config import load_config
from aligndistil_cli.errors import UserError
from aligndistil_cli.stages import STAGES


def main(args: list[str]) -> None:
    dist.init_process_group("gloo")
    for arg in args:
        stage, path = arg.split("=", 1)
        if stage == "mismatch":
            config = load_config(STAGES["sft"].config, None, {"model": "m", "data": "d", "out": "o",
                                                              "seed": distributed.rank()})
            try:
                with distributed.session(config):
                    refusal = None
            except UserError as e:
                refusal = str(e)
            refusals = distributed.gather_objects(refusal)
            if distributed.is_main():
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(refusals, f)
            continue
        stage = stage.split("/")[0]
        config = load_config(STAGES[stage].config, path, {"reverse": True} if stage == "train-reverse-dpo" else {})
        with distributed.session(config):
            STAGES[stage].run(config)
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
