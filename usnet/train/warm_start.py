"""Warm start: train a US-Net from an already trained model instead of random weights.

``usnet train`` with an ``init:`` section loads a trained model's weights into the configured
network (:func:`load_init`), optionally reorders its channels by importance
(:func:`usnet.reorder_channels`, so that the narrow widths' prefixes hold the important channels),
and with ``teacher: init`` keeps a frozen copy of it (:func:`make_teacher`) whose soft targets
every width distils from (:func:`teacher_probs`), the widest included.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import FORMAT
from ..errors import ConfigError
from ..models.sources import ModelSpec
from ..nn.norm import SlimmableBatchNorm2d
from ..state import get_state, run_full_width


def read_init_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], str | None]:
    """The weights in ``path`` and the zoo model they were saved from (None if unknown): a usnet
    checkpoint (``usnet.save``, ``model.pt`` of a run) or a plain ``state_dict`` file
    (``torch.save(model.state_dict(), path)``, torchvision's weight files), also one wrapped in
    ``{"state_dict": ...}`` or ``{"model": ...}``. Read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init.checkpoint {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"init.checkpoint {str(path)!r} is not a weights file readable with weights_only=True "
            f"({type(err).__name__}); give a usnet checkpoint or a state_dict saved with torch.save"
        ) from None
    arch = None
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        record = (payload.get("usnet") or {}).get("arch") or {}
        if record.get("name") is not None:  # as the config names it
            arch = ModelSpec(str(record.get("source", "zoo")), str(record["name"])).label
        payload = payload.get("state_dict")
    elif isinstance(payload, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if (
        not isinstance(payload, Mapping)
        or not payload
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items())
    ):
        raise ConfigError(
            f"init.checkpoint {str(path)!r} holds no state_dict (a mapping of names to tensors)"
        )
    return dict(payload), arch


def check_init_matches(model: nn.Module, weights: Mapping[str, Tensor], source: str,
                       model_name: str, num_classes: int | None = None) -> None:  # fmt: skip
    """Refuse weights that are not those of ``model``, naming the mismatching keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} (file {tuple(weights[k].shape)}, model {tuple(v.shape)})"
              for k, v in own.items() if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, keys in (("shapes differ", shapes), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{what}: {', '.join(keys[:3])}{more}")
    classes = f" with {num_classes} classes" if num_classes is not None else ""
    raise ConfigError(
        f"init.checkpoint {source!r} does not match model {model_name}{classes}: "
        + "; ".join(parts)
    )


def load_init(model: nn.Module, path: str | os.PathLike, model_name: str,
              num_classes: int | None = None) -> str:  # fmt: skip
    """Load the trained weights at ``path`` into ``model`` (a slimmable model of the same
    architecture): every key and shape must match. Returns a description for the run log."""
    weights, arch = read_init_weights(path)
    source = str(path)
    if arch is not None and arch != model_name:
        raise ConfigError(
            f"init.checkpoint {source!r} holds a {arch} model, the config trains {model_name}"
        )
    check_init_matches(model, weights, source, model_name, num_classes)
    model.load_state_dict(weights, strict=True)
    kind = "usnet checkpoint" if arch is not None else "state_dict"
    return f"{source} ({kind}, {len(weights)} tensors)"


def make_teacher(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """A frozen copy of ``model`` at its full width, in eval mode: the trained model's function
    (channel reordering does not change it)."""
    teacher = copy.deepcopy(model)
    run_full_width(teacher, get_state(teacher))
    untrained = [name for name, m in teacher.named_modules()
                 if isinstance(m, SlimmableBatchNorm2d) and m.track_running_stats and m.current_stats() is None]  # fmt: skip
    if untrained:
        raise ConfigError(
            f"teacher=init: the init model's BatchNorm {untrained[0]!r} has no trained running "
            "statistics; the teacher must be a trained model (or set teacher=none)"
        )
    teacher.eval().requires_grad_(False)
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


@torch.no_grad()
def teacher_probs(teacher: nn.Module, images: Tensor, temperature: float,
                  autocast_dtype: torch.dtype | None = None) -> Tensor:  # fmt: skip
    """The teacher's softmax at ``temperature`` (float32) for one batch, computed once under
    ``no_grad`` in the training precision."""
    if autocast_dtype is None:
        logits = teacher(images)
    else:
        with torch.autocast(device_type=images.device.type, dtype=autocast_dtype):
            logits = teacher(images)
    return F.softmax(logits.float() / temperature, dim=-1)


def reorder_batches(dataset: Dataset, num_images: int, batch_size: int, seed: int) -> DataLoader:
    """A seeded random sample of ``num_images`` training images, for the data-driven
    importances (``taylor``, ``activation``, ``reconstruction``)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=gen)[: min(num_images, len(dataset))].tolist()
    return DataLoader(Subset(dataset, index), batch_size=batch_size)
