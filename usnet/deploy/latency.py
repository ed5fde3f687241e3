"""Latency inside a switchable artifact: measured per entry, kept in the file, read by select.

:func:`profile_latency` times every entry of a switchable ONNX file in onnxruntime (the file's
own graph, as a runtime without usnet runs it: its ``If`` nodes select the entry) for each
thread count and batch size asked for, and writes the tables into the file's metadata (a new
file, then a rename: readers see the old file or the new one; the graph is unchanged). A table
holds the runtime and its version, the execution provider, the device (``cpu:<model name>``),
the thread count, the batch size, the warm-up and repeat counts, when it was measured and each
entry's median milliseconds. A new measurement replaces the table with the same runtime,
version, provider, device, threads and batch size, and keeps the others.

:func:`select_entry` chooses the widest entry within budgets: MACs and parameters from the
metadata, latency from the stored table that matches this machine and runtime, else measured
now (and not written: ``usnet profile --latency`` writes).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from ..device import device_name, timed_ms
from ..errors import UsnetValueError
from ..files import atomic_write_bytes
from .onnx_file import read_switchable, set_metadata
from .switchable_onnx import ENTRY_INPUT, WIDTH_INPUT

RUNTIME = "onnxruntime"
PROVIDER = "CPUExecutionProvider"
KEY_FIELDS = ("runtime", "runtime_version", "provider", "device", "threads", "batch_size")


def _check_positive_ints(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UsnetValueError(f"{name} must be positive whole numbers, got {values!r}")
    return values


def this_machine(threads: int, batch_size: int) -> dict:
    """The key a latency table is matched by, for this machine and onnxruntime."""
    import onnxruntime
    import torch

    return {"runtime": RUNTIME, "runtime_version": onnxruntime.__version__, "provider": PROVIDER,
            "device": device_name(torch.device("cpu")), "threads": threads,
            "batch_size": batch_size}  # fmt: skip


def measure_tables(
    data: bytes,
    meta: dict,
    *,
    threads: Sequence[int] = (1,),
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    repeats: int = 20,
    seed: int = 0,
) -> list[dict]:
    """One latency table per (threads, batch size): every entry of the switchable model in
    ``data`` timed in onnxruntime (``warmup`` untimed runs, then the median of ``repeats``)."""
    import onnxruntime

    threads = _check_positive_ints("threads", threads)
    batch_sizes = _check_positive_ints("batch sizes", batch_sizes)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsnetValueError(f"warmup must be a whole number >= 0, got {warmup!r}")
    _check_positive_ints("repeats", [repeats])
    entries = meta["entries"]
    rng = np.random.default_rng(seed)
    tables = []
    for t in threads:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = t
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(data, options, providers=[PROVIDER])
        has_entry = any(i.name == ENTRY_INPUT for i in session.get_inputs())
        for b in batch_sizes:
            images = rng.standard_normal((b, *meta["input_size"][1:])).astype(np.float32)
            medians = []
            for index, entry in enumerate(entries):
                feed = {"input": images, WIDTH_INPUT: np.array(math.nan, np.float32)}
                if isinstance(entry["width"], (int, float)):
                    feed[WIDTH_INPUT] = np.array(entry["width"], np.float32)
                elif has_entry:
                    feed[ENTRY_INPUT] = np.array(index, np.int64)
                samples = timed_ms(lambda: session.run(None, feed), warmup, repeats)
                medians.append(statistics.median(samples))
            tables.append({**this_machine(t, b), "warmup": warmup, "repeats": repeats,
                           "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "entries": [e["name"] for e in entries],
                           "median_ms": medians})  # fmt: skip
    return tables


def merge_tables(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``old`` without the tables ``new`` replaces (same key), then ``new``."""
    keys = {tuple(t.get(k) for k in KEY_FIELDS) for t in new}
    return [t for t in old if tuple(t.get(k) for k in KEY_FIELDS) not in keys] + list(new)


def profile_latency(
    path: str | os.PathLike,
    *,
    threads: Sequence[int] = (1,),
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    repeats: int = 20,
) -> list[dict]:
    """Measure every entry of the switchable file ``path`` and write the tables into its
    metadata (atomically; the rest of the file is unchanged). Returns the new tables."""
    data, proto, meta = read_switchable(
        path, "is not a switchable usnet artifact (usnet export --switchable); "
        "profile --latency measures those"
    )  # fmt: skip
    tables = measure_tables(data, meta, threads=threads, batch_sizes=batch_sizes, warmup=warmup,
                            repeats=repeats)  # fmt: skip
    meta["latency"] = merge_tables(meta.get("latency", []), tables)
    set_metadata(proto, meta)
    atomic_write_bytes(path, proto.SerializeToString())
    return tables


def stored_table(meta: dict, threads: int, batch_size: int) -> dict | None:
    """The latency table of ``meta`` measured on this machine and runtime, if there is one."""
    key = this_machine(threads, batch_size)
    for table in meta.get("latency", []):
        if all(table.get(k) == v for k, v in key.items()) and len(
            table.get("median_ms", [])
        ) == len(meta["entries"]):
            return table
    return None


def select_entry(
    path: str | os.PathLike,
    *,
    max_macs: float | None = None,
    max_params: float | None = None,
    max_latency_ms: float | None = None,
    threads: int = 1,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
) -> dict:
    """The widest entry (most MACs) of a switchable file within every budget given, with every
    entry's cost and where its latency came from (``stored`` table or ``measured`` now)."""
    budgets = {k: v for k, v in (("max_macs", max_macs), ("max_params", max_params),
                                 ("max_latency_ms", max_latency_ms)) if v is not None}  # fmt: skip
    if not budgets:
        raise UsnetValueError("a budget is needed: --max-macs, --max-params or --max-latency-ms")
    for name, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsnetValueError(f"{name} must be a positive number, got {value!r}")
    data, _, meta = read_switchable(
        path, "is a single-width ONNX export; select takes a checkpoint or a switchable "
        "artifact (usnet export --switchable)"
    )  # fmt: skip
    entries = [dict(e) for e in meta["entries"]]
    latency = None
    if max_latency_ms is not None:
        table = stored_table(meta, threads, batch_size)
        source = "stored"
        if table is None:
            (table,) = measure_tables(data, meta, threads=[threads], batch_sizes=[batch_size],
                                      warmup=warmup, repeats=repeats)  # fmt: skip
            source = "measured"
        for entry, ms in zip(entries, table["median_ms"]):
            entry["latency_ms"] = ms
        latency = {k: table[k] for k in (*KEY_FIELDS, "measured_utc")} | {"source": source}
    limits = {"macs": budgets.get("max_macs", math.inf),
              "params": budgets.get("max_params", math.inf),
              "latency_ms": budgets.get("max_latency_ms", math.inf)}  # fmt: skip
    fitting = [e for e in entries if all(e.get(k, 0) <= v for k, v in limits.items())]
    if not fitting:
        from .cost import format_count

        narrowest = min(entries, key=lambda e: e["macs"])
        cost = f"MACs {format_count(narrowest['macs'])}, params {format_count(narrowest['params'])}"
        if "latency_ms" in narrowest:
            cost += f", latency {narrowest['latency_ms']:.3f} ms"
        raise UsnetValueError(
            f"no entry of {str(path)!r} fits {budgets}; the cheapest, {narrowest['name']!r}, "
            f"has {cost}"
        )
    chosen = max(fitting, key=lambda e: (e["macs"], e["params"]))
    return {"chosen": chosen, "budgets": budgets, "latency": latency, "entries": entries}
