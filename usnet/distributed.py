"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

usnet builds no distribution of its own. ``torchrun`` starts one process per GPU (or CPU worker)
and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` turns them into a process group (NCCL for CUDA, gloo for CPU) and picks the
rank's device. The trainer then wraps the model in ``DistributedDataParallel``. What is
US-Net-specific lives here:

* :func:`convert_sync_batchnorm`: synchronized batch statistics for *slimmable* BatchNorm.
  ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would replace our layers (and lose the
  per-width statistics), and torch's fused SyncBN kernels exist only for accelerators; instead
  each :class:`~usnet.nn.SlimmableBatchNorm2d` can compute its batch statistics over all
  ranks with :func:`global_batch_stats`, differentiably, on its active channels.
* :func:`global_batch_stats`: per-channel mean and variance of a batch sharded across ranks. Each
  rank computes its local mean and variance (two-pass, float32), one ``all_gather`` collects
  ``(count, mean, variance)`` of every rank and Chan's parallel formula combines them, so the
  result is the statistics of the concatenated batch (empty shards included). Distributed BN
  calibration uses the same function.
* :func:`run_on_main`: run a step on rank 0 only (reading the output folder, a checkpoint) and
  hand its result, or its error, to every rank, so all ranks resume from the same checkpoint and
  fail together with the same message instead of waiting on each other.

Outside a process group every function here is the single-process identity: ``rank() == 0``,
``world_size() == 1``, BatchNorm statistics are local.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device
from .errors import ConfigError, UsnetValueError
from .nn.bn_stats import global_batch_stats
from .nn.norm import SlimmableBatchNorm2d
from .process_group import is_distributed, rank, world_size

__all__ = [
    "convert_sync_batchnorm",
    "destroy",
    "global_batch_stats",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "join_group_for_any_device",
    "launched_by_torchrun",
    "rank",
    "run_on_main",
    "world_size",
]

T = TypeVar("T")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # PyTorch's default for both backends


def launched_by_torchrun() -> bool:
    """Whether the environment describes a rank of a torchrun (or compatible) launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "auto", timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the process group that torchrun describes and return this rank's device.

    Without torchrun's variables nothing is initialized and the device is ``device`` resolved as
    for a single process (``auto``: CUDA if available, else CPU). Under torchrun:

    * ``device`` ``auto`` or ``cuda``: ``cuda:LOCAL_RANK`` when CUDA is available (made the
      current device), else CPU; ``cpu``: CPU. A fixed ``cuda:N`` is refused: each rank's GPU
      comes from ``LOCAL_RANK``.
    * The backend is NCCL for CUDA devices and gloo for CPU, initialized from ``env://``
      (``MASTER_ADDR``/``MASTER_PORT``, which torchrun's rendezvous sets, also across machines).

    A process group that already exists (a user's own launcher) is kept as it is.
    """
    single = resolve_device(device)  # validates the name and CUDA's presence
    if not launched_by_torchrun() and not is_distributed():
        return single
    if device.startswith("cuda:"):
        raise ConfigError(
            f"device={device} under torchrun: every rank takes the GPU of its LOCAL_RANK; "
            "use device=auto or device=cuda"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank() % max(torch.cuda.device_count(), 1)))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                "start at most that many processes per machine (torchrun --nproc_per_node)"
            )
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
    else:
        resolved = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            timeout=timeout or DEFAULT_TIMEOUT,
        )
    return resolved


def join_group_for_any_device(timeout: datetime.timedelta | None = None) -> None:
    """Under torchrun, join the process group before the device is known (``usnet train
    --resume`` without CONFIG learns it from the config that rank 0 reads): gloo, plus NCCL for
    CUDA tensors where CUDA is available, so the group serves a CPU or a GPU run alike and no
    GPU is claimed yet. :func:`init_from_env` then keeps it and picks the rank's device.
    Outside torchrun, or with a group already there, nothing happens."""
    if not launched_by_torchrun() or is_distributed():
        return
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
        init_method="env://",
        timeout=timeout or DEFAULT_TIMEOUT,
    )


def destroy() -> None:
    """Leave the process group, if any (the end of a torchrun worker)."""
    if is_distributed():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, the only rank that writes files (checkpoints, metrics, plots)."""
    return rank() == 0


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0; its result, or the exception it raised, on every rank.

    For steps whose outcome must be the same everywhere: reading the output folder or the
    checkpoint to resume from (other machines need no shared file system) and checking for an
    existing run. Ranks other than 0 re-raise rank 0's exception with ``usnet_from_main`` set,
    so a launcher can report it once.
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # handed to every rank, re-raised below
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        if not is_main_process():
            value.usnet_from_main = True
        raise value
    return value


def all_reduce_sum(values: list[float] | list[int], device: torch.device | None = None) -> list:
    """The element-wise sum of ``values`` over all ranks (the values themselves outside one).

    Integers are summed in int64 (exact counts), floats in float64."""
    if world_size() == 1:
        return list(values)
    integral = all(isinstance(v, int) for v in values)
    if device is None:
        device = _collective_device()
    tensor = torch.tensor(values, dtype=torch.int64 if integral else torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _collective_device(group: Any = None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`~usnet.nn.SlimmableBatchNorm2d` of ``module`` synchronize its
    training-mode batch statistics across ``process_group`` (default: all ranks), in place.

    The slimmable counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the layers,
    their parameters and per-width statistics stay as they are; in training mode each layer
    normalizes its active channels with the statistics of the global batch
    (:func:`global_batch_stats`), so a per-GPU batch of 16 behaves like the global batch. It is
    a no-op in a single process and in eval mode. Returns ``module``.
    """
    found = False
    for m in module.modules():
        if isinstance(m, SlimmableBatchNorm2d):
            m.sync_bn = True
            m.process_group = process_group
            found = True
    if not found:
        raise UsnetValueError("convert_sync_batchnorm: the model has no SlimmableBatchNorm2d layer")
    return module
