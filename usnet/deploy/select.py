"""Choosing the width for a budget: MACs, parameters or measured latency.

Candidates are the model's distinct channel configurations, not widths: every width in the range
maps to one configuration (torchvision's rounding to multiples of 8 makes a staircase), and widths
that round to the same channels are one network. The default sweep scans the whole range at
steps of 0.001 and keeps each configuration with the interval of widths that give it
(``ChannelPlan.width_intervals``); its
representative width is the spectrum's width for that configuration when the checkpoint holds one,
else the number with the fewest decimals in the interval (e.g. 0.5 for [0.438, 0.562]).

MACs and parameters are counted exactly for every candidate (``usnet.profile``), per image (the
batch size of ``input_size`` is ignored for them, as ``usnet export`` counts them). Latency is
*measured*: each candidate is exported (``usnet.export``) and timed on this machine (warm-up runs,
then ``repeats`` timed runs, median). Nothing assumes cost is monotonic or smooth in width: the
choice is the widest candidate whose own numbers fit every budget.

Measured latencies are kept in a JSON cache, one file per (model fingerprint, device, threads,
input size, dtype, torch version, warm-up, repeats) under ``$USNET_CACHE_DIR`` or
``$XDG_CACHE_HOME/usnet`` or ``~/.cache/usnet`` (``latency/<key hash>.json``). The fingerprint is
a SHA-256 of the model's channel plan, bindings and weights, so a changed checkpoint never reuses
another's timings. Cache files are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..channels import ChannelPlan, config_id, config_key
from ..device import device_name, resolve_device, timed_ms
from ..errors import UsnetValueError
from ..files import atomic_write_bytes
from ..progress import progress_bar
from ..state import check_input_size, get_state, input_size_of
from .artifact import spectrum_top1
from .cost import format_count, profile
from .plain import export

SCAN_STEP = 0.001


@dataclass(frozen=True)
class Candidate:
    """One channel configuration: a representative width, the widths that give it, its cost."""

    width: float
    width_interval: tuple[float, float]
    config_id: str
    params: int
    macs: int
    latency_ms: float | None = None
    top1: float | None = None
    config: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["config"]
        out["width_interval"] = list(self.width_interval)
        return out


@dataclass(frozen=True)
class Selection:
    """The chosen candidate, the budgets, every candidate considered and how latency was got."""

    chosen: Candidate
    budgets: dict
    input_size: tuple[int, ...]
    candidates: list[Candidate]
    latency: dict | None = None  # device, threads, cache file, measured/cached counts

    @property
    def width(self) -> float:
        return self.chosen.width

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.chosen.to_dict().items() if v is not None}
        out.update(budgets=self.budgets, input_size=list(self.input_size))
        if self.latency is not None:
            out["latency"] = self.latency
        out["candidates"] = [c.to_dict() for c in self.candidates]
        return out


def parse_count(text: str | int | float) -> int:
    """``"150M"`` -> 150000000; also ``K``/``G`` suffixes, plain numbers and ``1.5e8``."""
    scales = {"K": 1e3, "M": 1e6, "G": 1e9}
    raw = str(text).strip()
    scale = scales.get(raw[-1:].upper(), 1.0)
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsnetValueError(
            f"invalid count {text!r}; expected a positive number like 150M, 2.5M, 800K or 1e9"
        )
    return int(round(value))


Interval = tuple[float, float]


def config_candidates(plan: ChannelPlan, widths: Sequence[float] | None = None,
                      preferred: Sequence[float] = ()) -> list[tuple[float, Interval, tuple[int, ...]]]:  # fmt: skip
    """``(width, (lo, hi), config)`` per distinct configuration, narrowest first.

    ``widths`` restricts the sweep to those widths (each is its own representative; of several
    giving one configuration the widest is kept). Otherwise the intervals are
    :meth:`ChannelPlan.width_intervals` (the range scanned at 0.001) and the representative is the
    first of ``preferred`` in the interval, else the interval's own (its roundest number).
    """
    if widths is not None:
        by_config: dict[tuple[int, ...], float] = {}
        for w in sorted(plan.check_width(float(w)) for w in widths):
            by_config[plan.config(w)] = w
        return [(w, (w, w), c) for c, w in by_config.items()]
    out = []
    for span in plan.width_intervals(SCAN_STEP):
        a, b, config = span.lo, span.hi, span.config
        inside = [p for p in preferred if a - 1e-9 <= p <= b + 1e-9 and plan.config(p) == config]
        out.append((inside[0] if inside else span.width, (a, b), config))
    return out


def select_width(
    model: nn.Module,
    *,
    max_macs: int | float | None = None,
    max_params: int | float | None = None,
    max_latency_ms: float | None = None,
    input_size: Sequence[int] | None = None,
    widths: Sequence[float] | None = None,
    spectrum: Sequence[Mapping] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Selection:
    """The widest configuration of ``model`` within every given budget.

    Args:
        max_macs, max_params: exact budgets, counted per image (at ``input_size`` with batch 1,
            as :func:`usnet.export_artifact` and :func:`usnet.search_width` count them).
        max_latency_ms: budget on the median latency of the exported model on a whole batch of
            ``input_size`` (N, C, H, W) on ``device`` with ``threads`` intra-op threads (CPU;
            default: torch's current setting).
        widths: sweep only these widths (default: every configuration in the range).
        spectrum: rows with ``width``/``config_id``/``top1`` (``usnet train``'s spectrum): their
            widths become the representatives and their top-1 is reported.
        cache_dir: latency cache directory (see the module docstring); ``use_cache=False``
            measures afresh and writes nothing.

    Raises ``ValueError`` naming the narrowest candidate's cost when nothing fits.
    """
    budgets = {k: v for k, v in (("max_macs", max_macs), ("max_params", max_params),
                                 ("max_latency_ms", max_latency_ms)) if v is not None}  # fmt: skip
    if not budgets:
        raise UsnetValueError(
            "a budget is needed: max_macs, max_params or max_latency_ms (--max-macs, "
            "--max-params or --max-latency-ms on the command line)"
        )
    for name, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsnetValueError(f"{name} must be a positive number, got {value!r}")
    size = input_size_of(model, input_size)
    plan = get_state(model).plan
    preferred = [
        float(r["width"]) for r in spectrum or () if isinstance(r.get("width"), (int, float))
    ]
    per_image = (1, *size[1:])  # MACs and params are per image; the batch only matters for latency
    candidates = []
    for w, interval, config in config_candidates(plan, widths, preferred):
        cost = profile(model, w, per_image)
        candidates.append(Candidate(w, interval, config_id(config), cost.params, cost.macs,
                                    top1=spectrum_top1(model, spectrum, w), config=config))  # fmt: skip
    max_macs_, max_params_ = budgets.get("max_macs", math.inf), budgets.get("max_params", math.inf)
    static = [c for c in candidates if c.macs <= max_macs_ and c.params <= max_params_]
    latency_info = None
    if max_latency_ms is not None:
        timed, latency_info = measure_candidates(
            model, static, size, device=device, threads=threads, warmup=warmup, repeats=repeats,
            cache_dir=cache_dir, use_cache=use_cache, progress=progress,
        )  # fmt: skip
        by_id = {c.config_id: c for c in timed}
        candidates = [by_id.get(c.config_id, c) for c in candidates]
        static = timed
    fitting = [c for c in static if c.latency_ms is None or c.latency_ms <= max_latency_ms]
    if not fitting:
        raise UsnetValueError(_nothing_fits(candidates[0], budgets))
    chosen = max(fitting, key=lambda c: c.width_interval[1])
    return Selection(chosen, budgets, size, candidates, latency_info)


def measure_candidates(
    model: nn.Module,
    candidates: Sequence[Candidate],
    input_size: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> tuple[list[Candidate], dict]:
    """The candidates with ``latency_ms`` filled in, from the cache or measured (then cached)."""
    device = _check_device(device)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise UsnetValueError(f"threads must be a positive integer, got {threads!r}")
    for name, value, least in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsnetValueError(f"{name} must be an integer >= {least}, got {value!r}")
    size = check_input_size(input_size)
    if use_cache:
        check_cache_dir(cache_dir)
    dtype = next(model.parameters()).dtype
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        key = {
            "model": model_fingerprint(model),
            "device": device_name(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "input_size": list(size),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "warmup": warmup,
            "repeats": repeats,
        }
        path = latency_cache_path(key, cache_dir)
        entries = _read_cache(path, key) if use_cache else {}
        plan = get_state(model).plan
        todo = [
            c for c in candidates if config_key(c.config or plan.config(c.width)) not in entries
        ]
        bar = progress_bar(len(todo), progress, "measuring latency", "width")
        if todo:  # first runs pay for thread pools and allocator growth: not any width's cost
            first = export(model, todo[-1].width, require_stats=False).to(device)
            measure_latency(first, size, device=device, warmup=warmup, repeats=1)
        for c in todo:
            module = export(model, c.width, require_stats=False).to(device)
            samples = measure_latency(module, size, device=device, warmup=warmup, repeats=repeats)
            entries[config_key(c.config or plan.config(c.width))] = {
                "width": c.width,
                "median_ms": statistics.median(samples),
                "samples_ms": samples,
            }
            bar.update(1)
        bar.close()
        if todo and use_cache:
            payload = {"key": key, "latency_ms": entries}
            atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
    finally:
        torch.set_num_threads(previous_threads)
    timed = [replace(c, latency_ms=entries[config_key(c.config or plan.config(c.width))]["median_ms"])
             for c in candidates]  # fmt: skip
    info = {"device": key["device"], "threads": key["threads"], "warmup": warmup, "repeats": repeats,
            "cache": str(path) if use_cache else None, "measured": len(todo),
            "cached": len(candidates) - len(todo)}  # fmt: skip
    return timed, info


@torch.inference_mode()
def measure_latency(module: nn.Module, input_size: Sequence[int], *, device: str | torch.device = "cpu",
                    warmup: int = 5, repeats: int = 20) -> list[float]:  # fmt: skip
    """Wall-clock milliseconds of ``repeats`` forward passes of ``module`` (after ``warmup``)."""
    device = torch.device(device)
    ref = next(module.parameters())
    x = torch.randn(tuple(input_size), dtype=ref.dtype, device=device)
    module.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return timed_ms(lambda: module(x), warmup, repeats, sync)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a slimmable model's plan, bindings and weights (what makes it this model)."""
    h = hashlib.sha256()
    h.update(json.dumps(get_state(model).to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("USNET_CACHE_DIR"):
        return Path(os.environ["USNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usnet"


def check_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The latency cache directory, refused early if a file stands where it or its ``latency/``
    subdirectory should be."""
    root = Path(cache_dir or default_cache_dir())
    for path in (root, root / "latency"):
        if path.exists() and not path.is_dir():
            raise UsnetValueError(
                f"latency cache {str(root)!r}: {str(path)!r} is a file, not a directory; pass "
                "--latency-cache DIR (cache_dir=) naming a directory"
            )
    return root


def latency_cache_path(key: Mapping, cache_dir: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / "latency" / f"{digest}.json"


def format_selection(selection: Selection) -> str:
    c = selection.chosen
    lo, hi = c.width_interval
    same = f" (same channels for widths {lo:g}..{hi:g})" if hi > lo else ""
    parts = [
        f"width {c.width:g}{same}: params {format_count(c.params)}, MACs {format_count(c.macs)}"
    ]
    if c.latency_ms is not None:
        parts.append(f"latency {c.latency_ms:.3f} ms (median)")
    if c.top1 is not None:
        parts.append(f"top-1 {100 * c.top1:.2f}%")
    budgets = ", ".join(
        f"{k.removeprefix('max_')} <= {budget_text(k, v)}" for k, v in selection.budgets.items()
    )
    lines = [
        ", ".join(parts),
        f"budget: {budgets}; input {'x'.join(map(str, selection.input_size))}",
    ]
    if selection.latency is not None:
        info = selection.latency
        lines.append(f"latency on {info['device']}, {info['threads']} threads: {info['measured']} "
                     f"configurations measured, {info['cached']} from cache {info['cache'] or '(off)'}")  # fmt: skip
    return "\n".join(lines)


def _nothing_fits(narrowest: Candidate, budgets: Mapping) -> str:
    over = []
    if narrowest.macs > budgets.get("max_macs", math.inf):
        over.append(f"{format_count(narrowest.macs)} MACs > {format_count(budgets['max_macs'])}")
    if narrowest.params > budgets.get("max_params", math.inf):
        over.append(
            f"{format_count(narrowest.params)} params > {format_count(budgets['max_params'])}"
        )
    if narrowest.latency_ms is not None and narrowest.latency_ms > budgets.get(
        "max_latency_ms", math.inf
    ):
        over.append(f"{narrowest.latency_ms:.3f} ms > {budgets['max_latency_ms']:g} ms")
    detail = "; ".join(over) or "no candidate meets all budgets together"
    return f"no width fits the budget: the narrowest, width {narrowest.width:g}, needs {detail}"


def budget_text(key: str, value: float) -> str:
    return f"{value:g} ms" if key.endswith("latency_ms") else format_count(value)


def _check_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if isinstance(device, torch.device) and device.type not in ("cpu", "cuda"):
        raise UsnetValueError(f"latency is measured on cpu or cuda, not {device.type!r}")
    return resolve_device(name)  # a ConfigError is a ValueError with the valid names


def _read_cache(path: Path, key: Mapping) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again (and rewrite it)
    if not isinstance(payload, dict) or payload.get("key") != dict(key):
        return {}
    entries = payload.get("latency_ms")
    return dict(entries) if isinstance(entries, dict) else {}


def plot_selection(selection: Selection, title: str = "") -> bytes:
    """PNG: the budgeted cost (latency if measured, else MACs or params) against width with the
    budget line and the chosen width, and top-1 where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        budget, color="C3", ls="--", lw=1, label=f"budget {budget_text('max_' + key, budget)}"
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
