"""Device names: what a config, a command-line option or a torchrun rank means by a device.

One place for config validation, the trainer, :mod:`usnet.distributed` and latency measurement
(:mod:`usnet.deploy.select`), so none of them needs the training config to name a device.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["check_device_name", "device_name", "rank_device", "resolve_device"]


def check_device_name(name: str) -> str:
    """``name`` if it is a device a configuration may name (auto, cpu, cuda, cuda:N)."""
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise ConfigError(f"device: invalid value {name!r}; valid: auto, cpu, cuda, cuda:N")


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means for a single process: ``auto`` is CUDA when available, else the
    CPU; a CUDA device without CUDA is an error that says what to use instead."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use cpu")
    return torch.device(name)


def rank_device(name: str) -> torch.device:
    """The device ``name`` means for this process; in a process group, ``auto``/``cuda`` mean
    this rank's GPU (the current CUDA device, which :func:`usnet.distributed.init_from_env` set)."""
    in_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if in_group and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return resolve_device(name)


def device_name(device: torch.device) -> str:
    """``cuda:<GPU name>`` or ``cpu:<processor model>``: timings belong to the hardware."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model or platform.processor() or platform.machine()}"


def timed_ms(run: Callable[[], object], warmup: int, repeats: int,
             sync: Callable[[], object] = lambda: None) -> list[float]:  # fmt: skip
    """Wall-clock milliseconds of ``repeats`` calls of ``run`` after ``warmup`` untimed ones;
    ``sync`` waits for queued work (``torch.cuda.synchronize`` on a GPU) after the warm-up and
    inside each timed call."""
    for _ in range(warmup):
        run()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples
