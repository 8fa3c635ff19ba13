"""Training curves: one PNG per trained model, one panel per metric its metrics.jsonl logs.

Every key that holds a number is a panel, except BOOKKEEPING: the step (the x axis), an epoch
counter, and the wall-clock time (how fast the machine was, not how training went). The grid
holds exactly as many panels as metrics: one row up to MAX_COLUMNS, else rows as even as
possible with a shorter row centred, so no panel is empty. A panel whose values are all positive
and reach LOG_SPREAD times their median (a loss with spikes, a KL falling over a decade) has a
log scale: on a linear one it is a flat line at zero with spikes. A metric logged once (distill's
final_kl_teacher) is a point, with its value in the panel's title.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from pathlib import Path

BOOKKEEPING = ("step", "epoch", "elapsed_s")
MAX_COLUMNS = 4
LOG_SPREAD = 10.0
# The optimizer's own numbers come after the metrics of what is learned.
_LAST = ("grad_norm", "lr")
# Series this short get a marker on each point: a line alone hides how few there are.
_MARKED = 30
# Inches: a panel's share of the figure, the room above the first row (suptitle and its titles), around the grid,
# and between panels (the next panel's tick labels; the step label and the next row's title).
_PANEL_W, _PANEL_H, _TOP = 3.5, 2.6, 0.75
_LEFT, _RIGHT, _BOTTOM = 0.65, 0.15, 0.45
_GAP_W, _GAP_H = 0.7, 0.75


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write can leave a torn last line; the rest is still worth plotting
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def panels(records: list[dict]) -> list[str]:
    """The metrics to plot: every key with a finite number in some record, except BOOKKEEPING; loss first, the
    others in the order they were logged, grad_norm and lr last."""
    keys = dict.fromkeys(k for rec in records for k, v in rec.items() if k not in BOOKKEEPING and _number(v))
    return sorted(keys, key=lambda k: 0 if k == "loss" else 2 + _LAST.index(k) if k in _LAST else 1)


def grid(n: int) -> list[int]:
    """Panels per row for n panels: one row up to MAX_COLUMNS, else ceil(n / MAX_COLUMNS) rows as even as possible,
    the longer ones first."""
    rows = math.ceil(n / MAX_COLUMNS)
    return [n // rows + (r < n % rows) for r in range(rows)]


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of key, over the records that log a finite number for it."""
    xs, ys = [], []
    for i, rec in enumerate(records):
        val = rec.get(key)
        if _number(val):
            xs.append(rec.get("step", i + 1))
            ys.append(val)
    return xs, ys


def log_scale(values: list[float]) -> bool:
    """Whether a panel needs a log axis: every value positive, the largest LOG_SPREAD times the median or more."""
    return len(values) > 1 and min(values) > 0 and max(values) >= LOG_SPREAD * statistics.median(values)


def file_name(name: str) -> str:
    """training_curves_NAME.png; a name with characters unsafe in a file name gets them replaced, plus a short
    hash of it, so that two such names cannot share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return f"training_curves_{safe if safe == name else safe + '-' + hashlib.sha256(name.encode()).hexdigest()[:6]}.png"


def _margins(cols: int, rows: int) -> dict:
    """Fixed margins, in inches turned into figure fractions, that fit the tick labels and titles of these small
    panels: a layout engine that measures every label (matplotlib's "constrained") takes half of the drawing time."""
    width, height = _PANEL_W * cols, _PANEL_H * rows + _TOP
    column = (width - _LEFT - _RIGHT - (2 * cols - 1) * _GAP_W) / (2 * cols)
    row = (height - _TOP - _BOTTOM - (rows - 1) * _GAP_H) / rows
    return {"left": _LEFT / width, "right": 1 - _RIGHT / width, "top": 1 - _TOP / height, "bottom": _BOTTOM / height,
            "wspace": _GAP_W / column, "hspace": _GAP_H / row}


def plot_training(plt, name: str, records: list[dict], path: Path) -> list[str]:
    """One model's curves into path; returns the metrics drawn, one per panel, in grid order."""
    from matplotlib.ticker import MaxNLocator

    keys = panels(records)
    rows = grid(len(keys))
    cols = rows[0]
    fig = plt.figure(figsize=(_PANEL_W * cols, _PANEL_H * len(rows) + _TOP))
    # Two grid columns per panel, so that a shorter row can be centred by one column per missing panel.
    spec = fig.add_gridspec(len(rows), 2 * cols, **_margins(cols, len(rows)))
    drawn = iter(keys)
    steps = max((rec["step"] for rec in records if _number(rec.get("step"))), default=len(records))
    fig.suptitle(f"{name}: every metric of its metrics.jsonl ({steps} steps)")
    # Every panel spans the whole run, so a metric logged once or now and then sits where it was logged.
    span = (1 - 0.03 * steps, 1.03 * steps) if steps > 1 else (0, 2)
    for r, count in enumerate(rows):
        start = cols - count
        for c in range(count):
            key = next(drawn)
            ax = fig.add_subplot(spec[r, start + 2 * c : start + 2 * c + 2], label=key)
            xs, ys = series(records, key)
            ax.plot(xs, ys, marker="o" if len(xs) <= _MARKED else None, markersize=3, linewidth=1.2)
            log = log_scale(ys)
            if log:
                ax.set_yscale("log")
            elif len(ys) == 1:  # one tick, at the value: an axis of ticks around a single point says nothing
                ax.set_yticks(ys, [f"{ys[0]:.4g}"])
            else:  # 0.000200 as 2.00 and a x10^-4 above the axis: long tick labels run into the next panel
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
            ax.set_title(f"{key} = {ys[0]:.4g}" if len(ys) == 1 else f"{key} (log scale)" if log else key, fontsize=10)
            ax.set_xlim(*span)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.tick_params(labelsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    shown = [ax.get_label() for ax in fig.axes]
    plt.close(fig)
    return shown


def write_training_curves(plt, training: dict[str, str], out_dir: Path) -> list[str]:
    """A PNG per model of training (name -> its metrics.jsonl) that logged a metric; returns their file names.

    Curve files of an earlier run into out_dir that this one did not write are removed, or the manifest would
    hash them in."""
    written = []
    for name, p in training.items():
        p = Path(p)
        if not p.is_absolute() and not p.exists():
            p = out_dir / p
        records = read_metrics(p) if p.is_file() else []
        if panels(records):
            plot_training(plt, name, records, out_dir / file_name(name))
            written.append(file_name(name))
    for old in out_dir.glob("training_curves*.png"):
        if old.name not in written:
            old.unlink()
    return written
