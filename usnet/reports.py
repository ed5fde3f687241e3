"""Reports: the accuracy/cost spectrum (CSV, JSON, PNG), the selection plot and progress bars.

What ``usnet train`` and ``usnet eval`` print and write about a model across its widths, and the
transient progress bars of long steps (tqdm, on stderr). Plots are PNG bytes (matplotlib's Agg
backend, no display needed), written by the caller atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .channels import config_id
from .cost import format_count, profile
from .files import atomic_write_bytes
from .state import get_state

if TYPE_CHECKING:
    from .select import Selection

__all__ = [
    "SPECTRUM_FIELDS",
    "format_spectrum",
    "plot_selection",
    "plot_spectrum",
    "progress_bar",
    "spectrum_rows",
    "step_bar",
    "write_spectrum",
]


def progress_bar(total: int, show: bool, desc: str = "calibrating", unit: str = "batch"):
    """A transient tqdm bar, or None when not shown or there is nothing to do."""
    if not show or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def step_bar(total: int, desc: str, show: bool | None):
    """The training epoch's bar: None when ``show`` is False; on a terminal a transient bar, else
    (a log file) one line every 30 s that stays."""
    if show is False:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="step", leave=tty is False, mininterval=1 if tty else 30
    )


# --- the spectrum ---------------------------------------------------------------------------------
SPECTRUM_FIELDS = ("width", "config_id", "params", "macs", "top1", "top5")


def spectrum_rows(model: nn.Module, widths: Sequence[float], accuracies: Sequence[tuple[float, float]],
                  input_size: Sequence[int]) -> list[dict]:  # fmt: skip
    """One spectrum row per width: its configuration id, cost, and (top-1, top-5) accuracy."""
    plan = get_state(model).plan
    rows = []
    for w, (top1, top5) in zip(widths, accuracies):
        cost = profile(model, w, input_size)
        rows.append({"width": w, "config_id": config_id(plan.config(w)), "params": cost.params,
                     "macs": cost.macs, "top1": top1, "top5": top5})  # fmt: skip
    return rows


def format_spectrum(rows: Sequence[dict]) -> str:
    lines = [f"{'width':>7} {'params':>9} {'MACs':>9} {'top-1':>7} {'top-5':>7}"]
    for r in rows:
        lines.append(f"{r['width']:>7.3f} {format_count(r['params']):>9} {format_count(r['macs']):>9} "
                     f"{100 * r['top1']:>6.2f}% {100 * r['top5']:>6.2f}%")  # fmt: skip
    return "\n".join(lines)


def write_spectrum(out: Path, rows: Sequence[dict], title: str = "") -> None:
    """spectrum.csv, spectrum.json and spectrum.png (top-1 against MACs), each written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SPECTRUM_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in SPECTRUM_FIELDS})
    atomic_write_bytes(out / "spectrum.csv", text.getvalue().encode())
    atomic_write_bytes(out / "spectrum.json",
                            json.dumps([{k: r[k] for k in SPECTRUM_FIELDS} for r in rows], indent=1).encode())  # fmt: skip
    atomic_write_bytes(out / "spectrum.png", plot_spectrum(rows, title))


def plot_spectrum(rows: Sequence[dict], title: str = "",
                  others: Mapping[str, Sequence[dict]] | None = None) -> bytes:  # fmt: skip
    """PNG of top-1 against MACs along the width range; ``others`` adds labelled series of
    points (e.g. networks trained alone at single widths) for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    macs = [r["macs"] / 1e6 for r in rows]
    top1 = [100 * r["top1"] for r in rows]
    ax.plot(macs, top1, "o-", ms=3, label="one US-Net, every width")
    for (label, points), marker in zip((others or {}).items(), "s^Dv*"):
        ax.plot([r["macs"] / 1e6 for r in points], [100 * r["top1"] for r in points], marker,
                ls="--", ms=6, label=label)  # fmt: skip
    if others:
        ax.legend(loc="lower right", fontsize=8)
    stride = max(1, math.ceil(len(rows) / 12))
    for i, r in enumerate(rows):
        if i % stride == 0 or i == len(rows) - 1:
            ax.annotate(f"{r['width']:g}", (macs[i], top1[i]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
    ax.set_xlabel("MACs (M) per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy across the width range")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# --- selection --------------------------------------------------------------------------------------
def plot_selection(selection: "Selection", title: str = "") -> bytes:
    """PNG: the budgeted cost (latency if measured, else MACs or params) against width with the
    budget line and the chosen width, and top-1 where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .select import _budget_text

    budgets = selection.budgets
    if "max_latency_ms" in budgets:
        key, label, budget = "latency_ms", "latency (ms, median)", budgets["max_latency_ms"]
    elif "max_macs" in budgets:
        key, label, budget = "macs", "MACs", budgets["max_macs"]
    else:
        key, label, budget = "params", "parameters", budgets["max_params"]
    rows = [c for c in selection.candidates if getattr(c, key) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    # Each configuration is a step of the staircase: a flat segment over the widths giving it.
    ax.hlines([getattr(c, key) for c in rows], [c.width_interval[0] for c in rows],
              [c.width_interval[1] for c in rows], color="C0", lw=2)  # fmt: skip
    ax.plot(
        [c.width for c in rows], [getattr(c, key) for c in rows], "o", ms=3, color="C0", label=label
    )
    ax.axhline(
        budget, color="C3", ls="--", lw=1, label=f"budget {_budget_text('max_' + key, budget)}"
    )
    ax.axvline(selection.width, color="C2", ls=":", lw=1, label=f"chosen width {selection.width:g}")
    ax.set_xlabel("width")
    ax.set_ylabel(label)
    handles, labels = ax.get_legend_handles_labels()
    accurate = [c for c in selection.candidates if c.top1 is not None]
    if accurate:
        ax2 = ax.twinx()
        ax2.plot([c.width for c in accurate], [100 * c.top1 for c in accurate], "s-", ms=3, color="C1",
                 label="top-1 (%)")  # fmt: skip
        ax2.set_ylabel("top-1 (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
