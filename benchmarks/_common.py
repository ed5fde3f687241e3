"""Shared pieces of the benchmark scripts: sizes, device sync, interleaved timing, peak memory.

Every script measures its variants side by side in one run, in interleaved rounds (A, B, A, B,
...), and reports medians and the ratio of medians: machine noise then hits every variant alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("cpu", "gpu"), default=None,
                        help="preset sizes: cpu (about a minute on 2 cores) or gpu (the issue's "
                             "H100 sizes); default: gpu on a CUDA machine, else cpu")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a CPU shared with other jobs, 1 avoids "
                             "OpenMP workers waiting on each other)")  # fmt: skip


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device the arguments name; also applies ``--threads`` and defaults ``--size``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmark: error: --device cuda asked for, but CUDA is not available")
    if args.size is None:
        args.size = "gpu" if name.startswith("cuda") else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn`` over ``repeats`` calls (device synchronized around)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats * 1000


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, repeats, device))
    return {name: statistics.median(values) for name, values in times.items()}


def header(title: str, device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return (f"{title}\n  {where}; torch {torch.__version__}; "
            f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip


def table(rows: Sequence[Sequence[object]], head: Sequence[str]) -> str:
    """A markdown table (printed as is, pasted as is into docs/benchmarks.md)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- peak memory -----------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory a block of code adds above what was allocated when it started, in bytes.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact: bytes
      of live tensors, not the caching allocator's reserve).
    * CPU: the process's peak resident set size (``VmHWM``, reset by writing 5 to
      ``/proc/self/clear_refs``) minus its resident size at the start. This counts every page the
      process touches, not only tensors, and is exact for tensors only if freed memory goes back
      to the OS at once: run with ``MALLOC_MMAP_THRESHOLD_=65536`` (the scripts re-run themselves
      so) so that every tensor over 64 KiB is its own ``mmap``. Linux only.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak = _status_bytes("VmHWM") - self._start


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
