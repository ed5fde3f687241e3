"""ONNX files as usnet reads and writes them: a file read with an error naming it, and the
``usnet.switchable`` metadata a switchable artifact carries (its entries and latency tables)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import UsnetValueError

META_KEY = "usnet.switchable"


def set_metadata(proto, meta: Mapping) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == META_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)


def switchable_metadata(proto) -> dict | None:
    """The ``usnet.switchable`` metadata of an ONNX model, or None for any other model."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError:
                return None
            return (
                meta if isinstance(meta, dict) and isinstance(meta.get("entries"), list) else None
            )
    return None


def read_onnx(data: bytes, name: str):
    """The ONNX model in ``data`` (a file's bytes), or an error naming the file."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # noqa: BLE001 (protobuf decode errors, checker errors)
        raise UsnetValueError(
            f"{name} is not a valid ONNX model (truncated, or another kind of file): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from None
    if not proto.graph.node:
        raise UsnetValueError(f"{name} is not a valid ONNX model: its graph is empty")
    return proto


def read_switchable(path: str | os.PathLike, not_switchable: str) -> tuple[bytes, object, dict]:
    """``(bytes, model, metadata)`` of the switchable ONNX file ``path``; any other valid ONNX
    file is refused with ``"'path' " + not_switchable`` (what the caller takes instead)."""
    data = Path(path).read_bytes()
    proto = read_onnx(data, repr(str(path)))
    meta = switchable_metadata(proto)
    if meta is None:
        raise UsnetValueError(f"{str(path)!r} {not_switchable}")
    return data, proto, meta
