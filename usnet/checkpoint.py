"""One-file checkpoints: weights, channel plan, width range and per-width BN statistics.

``usnet.save`` writes atomically (temporary file in the same directory, then rename), so an
interrupted save never leaves a half-written checkpoint in place of a good one. ``usnet.load``
rebuilds the model from the file alone: zoo models from their recorded builder (the file then
holds only tensors and plain data and loads with ``weights_only=True``); converted custom models
from the pickled module stored with them (loading those runs pickle: load only files you trust).
"""

from __future__ import annotations

import importlib
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .channels import width_value
from .errors import UsnetValueError
from .files import atomic_torch_save
from .nn.bn_stats import load_serialized as load_bn_stats
from .nn.bn_stats import serialize as serialize_bn_stats
from .state import SlimmableState, enable_switchable_bn, get_state, set_width

FORMAT = "usnet-checkpoint"
VERSION = 1


MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "usnet.layers": ("usnet.nn.base", "usnet.nn.conv", "usnet.nn.linear", "usnet.nn.norm",
                     "usnet.nn.attention", "usnet.nn.activation", "usnet.errors"),
    "usnet.params": ("usnet.nn.params",),
    "usnet.bn_stats": ("usnet.nn.bn_stats",),
    "usnet.attributes": ("usnet.nn.attributes",),
    "usnet.timm_layers": ("usnet.plugins.timm",),
    "usnet.training": ("usnet.train.samplers", "usnet.train.distill", "usnet.train.sandwich",
                       "usnet.train.recipe"),
}  # fmt: skip
"""Where the classes of modules that the package redesign moved live now: checkpoints written
before it pickle the old class paths (``usnet.layers.SlimmableConv2d``)."""


class _MovedClassUnpickler(pickle.Unpickler):
    """An unpickler that finds classes pickled under a module path :data:`MOVED_MODULES` lists
    in the module that holds them now."""

    def find_class(self, module: str, name: str) -> Any:
        for new in MOVED_MODULES.get(module, ()):
            found = getattr(importlib.import_module(new), name, None)
            if found is not None:
                return found
        return super().find_class(module, name)


_moved_classes = types.SimpleNamespace(Unpickler=_MovedClassUnpickler, load=pickle.load,
                                       __name__="usnet.checkpoint._moved_classes")  # fmt: skip
"""A ``pickle_module`` for ``torch.load``: pickle with :class:`_MovedClassUnpickler`."""


def checkpoint_dict(model: nn.Module, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint of ``model`` as a dict (what :func:`save` writes)."""
    state = get_state(model)
    bn_stats = serialize_bn_stats(model)
    width = state.width
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "usnet": state.to_dict(),
        "width": width_value(width),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "bn_stats": bn_stats,
        "extra": dict(extra or {}),
    }
    if state.arch is None:
        # No builder to rebuild it from: keep the module itself (pickled classes).
        payload["module"] = model
    return payload


def save(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (and optional plain-data ``extra``) to one checkpoint file, atomically."""
    atomic_torch_save(checkpoint_dict(model, extra), path)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint file (without building the model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # checkpoints of converted custom models hold the pickled module
            payload = torch.load(path, map_location="cpu", weights_only=False,
                                 pickle_module=_moved_classes)  # fmt: skip
        except Exception as err:
            raise UsnetValueError(
                f"{str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})"
            ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsnetValueError(f"{str(path)!r} is not a usnet checkpoint (written by usnet.save)")
    if payload.get("version") != VERSION:
        raise UsnetValueError(
            f"{str(path)!r} has checkpoint version {payload.get('version')!r}; this usnet reads {VERSION}"
        )
    missing = [k for k in ("usnet", "state_dict", "bn_stats") if k not in payload]
    if missing:
        raise UsnetValueError(
            f"{str(path)!r} is a damaged usnet checkpoint: missing {', '.join(missing)}"
        )
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the slimmable model saved at ``path``: weights, plan, BN statistics and width."""
    payload = read_checkpoint(path)
    return model_from_checkpoint(payload, str(path), map_location)


def model_from_checkpoint(payload: Mapping[str, Any], source: str = "checkpoint",
                          map_location: str | torch.device = "cpu") -> nn.Module:  # fmt: skip
    saved = SlimmableState.from_dict(payload["usnet"])
    if "module" in payload:
        model = payload["module"]
    elif saved.arch is not None:
        from .models.sources import rebuild

        model = rebuild(saved.arch)
        if saved.switchable_widths:
            enable_switchable_bn(model, saved.switchable_widths)
    else:
        raise UsnetValueError(f"{source}: checkpoint records neither a zoo builder nor a module")
    load_into(model, payload, source)
    model.to(map_location)
    return model


def load_into(model: nn.Module, payload: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load a checkpoint's weights, BN statistics and width into an already built model."""
    state = get_state(model)
    saved = SlimmableState.from_dict(payload["usnet"])
    if state.plan != saved.plan:
        raise UsnetValueError(f"{source}: the model's channel plan differs from the saved one")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UsnetValueError(f"{source}: weights do not match the model ({first})") from None
    load_bn_stats(model, payload["bn_stats"], source)
    set_width(model, payload.get("width", state.width_range[1]))
