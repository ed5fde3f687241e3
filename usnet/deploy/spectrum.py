"""The accuracy/cost spectrum of a model across its widths (CSV, JSON, PNG): what ``usnet train``
and ``usnet eval`` print and write. Plots are PNG bytes (matplotlib's Agg
backend, no display needed), written by the caller atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from ..channels import config_id
from ..files import atomic_write_bytes
from ..state import get_state
from .cost import format_count, profile

__all__ = [
    "SPECTRUM_FIELDS",
    "format_spectrum",
    "plot_spectrum",
    "spectrum_rows",
    "write_spectrum",
]


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
