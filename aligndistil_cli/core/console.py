"""The one console the library prints through: logs and progress bars on stderr, from rank 0 only.

Results go to stdout (print); everything a person watches while a stage runs goes through here. Under
torchrun only rank 0 speaks: the rank is read from torchrun's environment, so this module needs no torch
and no process group.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console

stderr = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) != 0)


def say(message: str) -> None:
    """One plain line on stderr (rank 0 only): no rich markup or highlighting of paths and numbers."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


def say_last(message: str) -> None:
    """say(message) after whatever stdout still buffers (a pipe buffers it), so that it is the last line a person
    sees; on stderr, so that stdout stays the result alone."""
    sys.stdout.flush()
    say(message)


@contextmanager
def progress(desc: str, total: int):
    """A rich progress bar on stderr with ETA and a free-text field (the running loss), rank 0 only.

    Yields advance(n=1, info="")."""
    if stderr.quiet:
        yield lambda advance=1, info="": None
        return
    # Imported here: rich.progress is a fifth of `aligndistil --help`'s import time, and --help draws no bar.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr,
        transient=False,
    )
    with bar:
        task = bar.add_task(desc, total=total, info="")
        yield lambda advance=1, info="": bar.update(task, advance=advance, info=info)
