"""Where this process stands in torch.distributed's default process group (base of the house:
:mod:`usnet.nn` and :mod:`usnet.distributed` both ask it). Outside a process group a single
process is rank 0 of 1."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (None: the default group); 1 outside a process group."""
    return dist.get_world_size(group) if is_distributed() else 1
