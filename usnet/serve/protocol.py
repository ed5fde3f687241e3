"""The Open Inference Protocol (KServe v2, as Triton speaks it): inference requests and
responses, in JSON and with the binary tensor data extension.

A request body is JSON, or (binary extension) a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw little-endian tensor data of every input whose ``parameters`` give a
``binary_data_size``, in input order. Outputs come back as binary data when the request asks
(``outputs[i].parameters.binary_data``, or ``parameters.binary_data_output`` for all of them).
Nothing in a request is ever unpickled or evaluated: JSON and raw float32 bytes only.

Every problem with a request raises :class:`ProtocolError` with the HTTP status and a message
naming what was wrong and what is valid; the server answers ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsnetValueError

HEADER_LENGTH = "inference-header-content-length"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DATATYPE = "FP32"
_FP32 = np.dtype("<f4")


class ProtocolError(UsnetValueError):
    """A request the server cannot take; ``status`` is the HTTP status to answer with, and
    ``retry_after_s`` (overload) the ``Retry-After`` header."""

    def __init__(self, message: str, status: int = 400, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class InferRequest:
    """A parsed inference request: ``images`` (N, C, H, W) float32 and what it asked for."""

    images: np.ndarray
    id: str | None = None
    width: float | None = None  # pinned
    min_width: float | None = None
    binary_output: bool = False
    parameters: dict = field(default_factory=dict)


def parse_infer_request(body: bytes, header_length: str | None,
                        input_shape: Sequence[int], max_batch: int) -> InferRequest:  # fmt: skip
    """Parse and validate one request for a model taking (N, *input_shape) float32 images."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} must be a "
                                f"whole number of bytes within the body ({len(body)} bytes)")  # fmt: skip
        header, binary = body[:length], memoryview(body)[length:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"the request is not valid JSON ({err})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _mapping(request.get("parameters"), "parameters")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list of one tensor named {INPUT_NAME!r}")
    images, used = _input_tensor(inputs[0], binary, input_shape, max_batch)
    if used != len(binary):
        raise ProtocolError(f"the body holds {len(binary)} bytes of binary tensor data but the "
                            f"inputs declare {used} (binary_data_size)")  # fmt: skip
    binary_output = _flag(parameters, "binary_data_output")
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list of requested outputs")
        for out in outputs:
            if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
                name = out.get("name") if isinstance(out, dict) else out
                raise ProtocolError(f"unknown output {name!r}; this model has {OUTPUT_NAME!r}")
            binary_output |= _flag(_mapping(out.get("parameters"), "output parameters"),
                                   "binary_data")  # fmt: skip
    return InferRequest(images, request_id, _width(parameters, "width"),
                        _width(parameters, "min_width"), binary_output, parameters)  # fmt: skip


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what!r} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(parameters: Mapping, key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def _width(parameters: Mapping, key: str) -> float | None:
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"parameter {key!r} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ProtocolError(f"parameter {key!r} must be in (0, 1], got {value!r}")
    return float(value)


def _input_tensor(spec: dict, binary: memoryview, input_shape: Sequence[int],
                  max_batch: int) -> tuple[np.ndarray, int]:  # fmt: skip
    name = spec.get("name")
    if name != INPUT_NAME:
        raise ProtocolError(f"unknown input {name!r}; this model takes {INPUT_NAME!r}")
    expected = f"[N, {', '.join(map(str, input_shape))}] with 1 <= N <= {max_batch}"
    shape = spec.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                               for d in shape)):  # fmt: skip
        raise ProtocolError(f"input {INPUT_NAME!r} needs a 'shape' list of integers: {expected}")
    if len(shape) != 1 + len(input_shape) or list(shape[1:]) != list(input_shape):
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape}; expected {expected}")
    if not 1 <= shape[0] <= max_batch:
        raise ProtocolError(f"input {INPUT_NAME!r} has batch size {shape[0]}; expected {expected}"
                            " (the server's --max-batch)")  # fmt: skip
    datatype = spec.get("datatype")
    if datatype != DATATYPE:
        raise ProtocolError(f"input {INPUT_NAME!r} has datatype {datatype!r}; this model takes "
                            f"{DATATYPE}")  # fmt: skip
    count = math.prod(shape)
    params = _mapping(spec.get("parameters"), "input parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise ProtocolError(f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size != count * _FP32.itemsize:
            raise ProtocolError(f"input {INPUT_NAME!r} declares binary_data_size {size!r}; shape "
                                f"{shape} of FP32 is {count * _FP32.itemsize} bytes")  # fmt: skip
        if len(binary) < size:
            raise ProtocolError(f"input {INPUT_NAME!r} declares {size} bytes of binary data but "
                                f"the body holds {len(binary)}")  # fmt: skip
        array = np.frombuffer(binary[:size], dtype=_FP32).astype(np.float32)
        used = size
    else:
        if "data" not in spec:
            raise ProtocolError(f"input {INPUT_NAME!r} has no 'data' (nor binary_data_size)")
        try:
            array = np.asarray(spec["data"])
        except ValueError:
            raise ProtocolError(f"input {INPUT_NAME!r}: 'data' is a ragged nested list; give "
                                f"{count} numbers, flat or nested as {shape}") from None  # fmt: skip
        if array.dtype.kind not in "iuf":
            raise ProtocolError(f"input {INPUT_NAME!r}: 'data' must hold numbers only")
        if array.size != count:
            raise ProtocolError(f"input {INPUT_NAME!r}: 'data' holds {array.size} numbers; shape "
                                f"{shape} needs {count}")  # fmt: skip
        array = array.astype(np.float32)
        used = 0
    if not np.isfinite(array).all():
        raise ProtocolError(f"input {INPUT_NAME!r} holds NaN or infinite values")
    return array.reshape(shape), used


@dataclass
class InferResponse:
    body: bytes
    headers: dict[str, str]


def infer_response(model_name: str, logits: np.ndarray, request: InferRequest,
                   parameters: Mapping) -> InferResponse:  # fmt: skip
    """The response body for ``logits`` (N, classes): JSON, or header + raw bytes when the
    request asked for binary outputs."""
    logits = np.ascontiguousarray(logits, dtype=_FP32)
    output = {"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": list(logits.shape)}
    out = {"model_name": model_name, "model_version": "1"}
    if request.id is not None:
        out["id"] = request.id
    out["parameters"] = dict(parameters)
    out["outputs"] = [output]
    if not request.binary_output:
        output["data"] = logits.reshape(-1).tolist()
        return InferResponse(json.dumps(out).encode(), {"content-type": "application/json"})
    data = logits.tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(out).encode()
    return InferResponse(header + data, {"content-type": "application/octet-stream",
                                         HEADER_LENGTH: str(len(header))})  # fmt: skip


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def tensor_metadata(input_shape: Sequence[int], num_classes: int) -> dict:
    return {
        "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE, "shape": [-1, *input_shape]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [-1, num_classes]}],
    }
