"""Opening any artifact usnet writes: :func:`load_artifact`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from .artifact import load_single, onnx_runner, source_format
from .onnx_file import read_onnx, switchable_metadata
from .switchable import SwitchableArtifact

__all__ = ["load_artifact"]


def load_artifact(
    source: str | os.PathLike | bytes, format: str | None = None
) -> Callable[..., Tensor]:
    """A callable ``images -> logits`` (CPU tensors) running an artifact with its own runtime.

    ``source`` is a file (format from its suffix unless given) or the artifact's bytes. A
    switchable ONNX file (:func:`usnet.export_switchable`) gives a :class:`SwitchableArtifact`,
    called as ``artifact(images, width=0.5)``; any other file a one-width callable.
    """
    format = source_format(source, format)
    if format == "onnx":
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        name = "the given bytes" if isinstance(source, bytes) else repr(str(source))
        proto = read_onnx(data, name)  # a truncated or foreign file: an error naming it
        if switchable_metadata(proto) is not None:  # every width in one file: takes width=
            return SwitchableArtifact(proto, name)
        return onnx_runner(data)  # checked once, above
    return load_single(source, format)
