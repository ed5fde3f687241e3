"""Deployment artifacts: one width of a slimmable model as a file, verified against the model.

:func:`export_artifact` turns ``usnet.export(model, w)`` (plain ``torch.nn`` layers, that width's
calibrated BatchNorm statistics) into one of three formats:

``pt``
    a ``torch.export`` ExportedProgram (``torch.export.save``). Loading and running it needs only
    torch, neither usnet nor torchvision and no pickled code: ``torch.export.load(path).module()``.
``torchscript``
    a traced TorchScript module (``torch.jit.load(path)``; C++ ``torch::jit::load``).
``onnx``
    an ONNX model (opset 17, TorchScript-based exporter, which needs no package beyond torch),
    input ``"input"``, output ``"logits"``; checked with ``onnx.checker``.

All three take any batch size at the channel count and image size they were exported at.
``fuse_bn`` folds each BatchNorm into the convolution before it
(``torch.fx.experimental.optimization.fuse``).

Every artifact is verified before it is written: the bytes are loaded back with the runtime that
will run them (``torch.export.load``, ``torch.jit.load``, onnxruntime), run on a seeded random
batch, and compared with the slimmable model at the same width. Above the tolerance nothing is
written and :class:`VerificationError` says by how much it missed. Files are written atomically.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ..channels import Width, config_id, format_width, width_value
from ..errors import UsnetError, UsnetValueError
from ..evaluation import eval_forward
from ..files import atomic_write_bytes
from ..state import check_input_size, get_state, input_size_of
from .cost import module_cost
from .onnx_file import read_onnx
from .plain import export

FORMATS: dict[str, str] = {"pt": ".pt2", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
"""Formats and the file suffix :func:`export_widths` gives them."""
DEFAULT_TOLERANCE = 1e-4
FUSED_BN_TOLERANCE = 1e-3
"""Folding BN into conv weights rounds differently in float32: a looser default bound."""
ONNX_OPSET = 17
INDEX = "index.json"


class VerificationError(UsnetError, RuntimeError):
    """An artifact's outputs differ from the slimmable model's by more than the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_artifact` wrote and how it compared with the slimmable model."""

    path: str
    format: str
    width: float | dict
    config_id: str
    input_size: tuple[int, ...]
    fused_bn: bool
    params: int
    macs: int
    max_abs_diff: float
    tolerance: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise UsnetValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    return format


def deployable(model: nn.Module, width: Width, *, fuse_bn: bool = False) -> fx.GraphModule:
    """The plain model of ``width`` as an fx GraphModule of ``torch.nn`` layers, on the CPU,
    with BatchNorm folded into the preceding convolutions if ``fuse_bn``."""
    from torch.fx.experimental.optimization import fuse

    module = export(model, width, trace=True).cpu()
    if fuse_bn:
        module = fuse(module, inplace=True, no_trace=True)
        module.eval()
    return module


def serialize(module: nn.Module, format: str, example: Tensor) -> bytes:
    """The bytes of ``module`` in ``format``, traced on ``example`` with a dynamic batch size."""
    check_format(format)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript and the TorchScript-based ONNX exporter announce their deprecation on
        # every call; they still are the paths that need nothing beyond torch.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if format == "pt":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, buffer)
        elif format == "torchscript":
            torch.jit.save(torch.jit.trace(module, (example,), check_trace=False), buffer)
        else:
            # Grad mode keeps nn.MultiheadAttention off its fused inference kernel, which ONNX
            # lacks (the artifact is the same function; nothing is trained).
            with torch.enable_grad():
                torch.onnx.export(module, (example,), buffer, dynamo=False,
                                  opset_version=ONNX_OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    return buffer.getvalue()


def load_single(
    source: str | os.PathLike | bytes, format: str | None = None
) -> Callable[[Tensor], Tensor]:
    """A callable ``images -> logits`` (CPU tensors) running a one-width artifact with its own
    runtime. ``source`` is a file (format from its suffix unless given) or the artifact's bytes.
    (:func:`usnet.load_artifact` opens switchable files too.)"""
    format = source_format(source, format)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if format == "onnx":
        name = "the given bytes" if isinstance(source, bytes) else repr(str(source))
        read_onnx(data, name)  # a truncated or foreign file: an error naming it
        return onnx_runner(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if format == "pt":
            module = torch.export.load(io.BytesIO(data)).module()
        else:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run_torch(images: Tensor) -> Tensor:
        with torch.no_grad():
            return module(images.cpu())

    return run_torch


def onnx_runner(data: bytes) -> Callable[[Tensor], Tensor]:
    """``images -> logits`` of a one-width ONNX model already read and checked (``read_onnx``),
    in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run_onnx(images: Tensor) -> Tensor:
        (logits,) = session.run(["logits"], {"input": images.detach().cpu().numpy()})
        return torch.from_numpy(np.asarray(logits))

    return run_onnx


def source_format(source: str | os.PathLike | bytes, format: str | None) -> str:
    """``format`` checked, or the format of file ``source`` by its suffix (bytes need one)."""
    if format is None:
        if isinstance(source, bytes):
            raise UsnetValueError(
                f"load_artifact needs format= for bytes; valid: {', '.join(FORMATS)}"
            )
        format = format_of(source)
    return check_format(format)


def format_of(path: str | os.PathLike) -> str:
    """The format a file name implies (``.pt2``, ``.torchscript.pt``/``.ts``, ``.onnx``)."""
    name = Path(path).name
    for format, suffix in sorted(FORMATS.items(), key=lambda kv: -len(kv[1])):
        if name.endswith(suffix):
            return format
    if name.endswith(".ts"):
        return "torchscript"
    raise UsnetValueError(
        f"cannot tell the format of {name!r} from its suffix; pass format= ({', '.join(FORMATS)})"
    )


def export_artifact(
    model: nn.Module,
    width: Width,
    path: str | os.PathLike,
    format: str = "pt",
    *,
    fuse_bn: bool = False,
    input_size: Sequence[int] | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> ExportResult:
    """Write ``model`` at ``width`` to ``path`` in ``format``, verified against the model.

    The width must be calibrated (else :class:`~usnet.UncalibratedWidthError`). Verification runs
    the slimmable model and the artifact (loaded back from its bytes) on one seeded random batch of
    ``max(2, N)`` images of ``input_size`` (N, C, H, W) and requires the largest absolute difference
    of the logits to be at most ``tolerance`` (default 1e-4; 1e-3 with ``fuse_bn``) times the
    logits' scale, their largest magnitude if above 1 (float32 rounds relative to the values: a
    trained model's logits on random images reach hundreds); otherwise it raises
    :class:`VerificationError` and writes nothing.
    """
    check_format(format)
    state = get_state(model)
    width = state.plan.check_width(width)
    size = input_size_of(model, input_size)
    tolerance = check_tolerance(tolerance, fuse_bn)
    if Path(path).is_dir():
        raise FileExistsError(f"{str(path)!r} is a directory; name the file to write "
                              "(export_widths / --widths write a directory)")  # fmt: skip
    module = deployable(model, width, fuse_bn=fuse_bn)
    ref = next(module.parameters())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((max(2, size[0]), *size[1:]), generator=gen).to(ref.dtype)
    data = serialize(module, format, images)
    got = load_single(data, format)(images)
    expected = reference_logits(model, width, images)
    diff = max_abs_diff(got, expected)
    scale = max(1.0, float(expected.abs().max()))
    if not diff <= tolerance * scale:
        relative = f" x the logits' scale {scale:.3g}" if scale > 1.0 else ""
        raise VerificationError(
            f"{format} export at width {format_width(width)} differs from the slimmable model by {diff:.3g} "
            f"(max |logits difference|, tolerance {tolerance:g}{relative}); nothing was written"
        )
    atomic_write_bytes(path, data)
    params, flops = module_cost(module, (1, *size[1:]))
    return ExportResult(
        path=str(path), format=format, width=width_value(width),
        config_id=config_id(state.plan.config(width)), input_size=size, fused_bn=fuse_bn,
        params=params, macs=flops // 2, max_abs_diff=diff, tolerance=tolerance,
    )  # fmt: skip


def export_widths(
    model: nn.Module,
    widths: Sequence[Width],
    out_dir: str | os.PathLike,
    format: str = "pt",
    *,
    spectrum: Sequence[Mapping] | None = None,
    **kwargs,
) -> list[dict]:
    """One verified artifact per channel configuration of ``widths`` in ``out_dir``, and
    ``out_dir/index.json`` listing each width's file, params, MACs, verification and, when a
    spectrum (rows with ``config_id`` and ``top1``, as ``usnet train`` records) is given, its
    top-1. Widths that round to the same channels share one file. Returns the rows of ``widths``.

    A directory that already holds an export with the same settings (format, input size, BN
    folding, tolerance) keeps it: ``index.json`` then lists the earlier widths and the new ones
    (a width exported again is replaced). Other settings are refused before anything is written."""
    check_format(format)
    plan = get_state(model).plan
    widths = [plan.check_width(w) for w in widths]  # all valid before anything is written
    if not widths:
        raise UsnetValueError("export_widths needs at least one width")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a directory")
    earlier = earlier_export_rows(out, format, kwargs)
    written: dict[str, ExportResult] = {}
    rows = []
    for w in widths:
        cid = config_id(plan.config(w))
        if cid not in written:
            # the config id makes names unique: widths 0.3703 and 0.3704 both print as 0.370
            # but may be different networks
            name = (f"config-{cid}" if isinstance(w, Mapping) else f"w{w:.3f}-{cid}") + FORMATS[
                format
            ]
            written[cid] = export_artifact(model, w, out / name, format, **kwargs)
        result = written[cid]
        row = {"width": width_value(w), "file": Path(result.path).name,
               "config_id": cid, "params": result.params, "macs": result.macs,
               "max_abs_diff": result.max_abs_diff}  # fmt: skip
        top1 = spectrum_top1(model, spectrum, w)
        if top1 is not None:
            row["top1"] = top1
        rows.append(row)
    first = next(iter(written.values()))
    listed = rows
    if earlier:
        again = {json.dumps(r["width"], sort_keys=True) for r in rows}
        kept = [r for r in earlier if json.dumps(r.get("width"), sort_keys=True) not in again]
        listed = sorted(kept + rows, key=lambda r: (r.get("macs", 0), json.dumps(r.get("width"))))
    index = {"format": format, "input_size": list(first.input_size), "fused_bn": first.fused_bn,
             "tolerance": first.tolerance, "models": listed}  # fmt: skip
    atomic_write_bytes(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return rows


def earlier_export_rows(out: Path, format: str, options: Mapping) -> list[dict]:
    """The rows of an earlier export in ``out`` whose files are still there, if its settings
    equal these (``export_artifact``'s keyword ``options``); else a clear refusal."""
    path = out / INDEX
    if not path.exists():
        return []
    try:
        index = json.loads(path.read_text())
        models = index["models"]
        if not isinstance(models, list) or not all(isinstance(r, dict) for r in models):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UsnetValueError(f"{str(path)!r} is not an index written by usnet export; export into "
                              "another directory (nothing was written)") from None  # fmt: skip
    defaults = export_artifact.__kwdefaults__
    fuse_bn = bool(options.get("fuse_bn", defaults["fuse_bn"]))
    now = {
        "format": format,
        "input_size": list(check_input_size(options.get("input_size", defaults["input_size"]))),
        "fused_bn": fuse_bn,
        "tolerance": check_tolerance(options.get("tolerance", defaults["tolerance"]), fuse_bn),
    }
    differ = [f"{key} {index.get(key)!r} there, {value!r} now" for key, value in now.items()
              if index.get(key) != value]  # fmt: skip
    if differ:
        raise UsnetValueError(
            f"{str(out)!r} already holds an export with other settings ({'; '.join(differ)}); "
            "export into another directory (nothing was written)"
        )
    return [r for r in models if (out / str(r.get("file", ""))).is_file()]


def spectrum_top1(
    model: nn.Module, spectrum: Sequence[Mapping] | None, width: Width
) -> float | None:
    """Top-1 of ``width`` from a spectrum, matched by channel configuration (widths that round
    to the same channels are the same network); None if the spectrum does not hold it."""
    if not spectrum:
        return None
    cid = config_id(get_state(model).plan.config(width))
    for row in spectrum:
        if row.get("config_id") == cid and row.get("top1") is not None:
            return float(row["top1"])
    return None


def reference_logits(model: nn.Module, width: Width, images: Tensor) -> Tensor:
    """The slimmable model's logits on the CPU, where the artifact runs: a model on a GPU is
    copied to the CPU first (GPU kernels, TF32 convolutions among them, round differently)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return eval_forward(model, width, images)


def max_abs_diff(got: Tensor, expected: Tensor) -> float:
    if got.shape != expected.shape:
        raise VerificationError(
            f"artifact output shape {tuple(got.shape)} != model's {tuple(expected.shape)}"
        )
    return float((got.double() - expected.double()).abs().max())


def check_tolerance(tolerance: float | None, fuse_bn: bool) -> float:
    if tolerance is None:
        return FUSED_BN_TOLERANCE if fuse_bn else DEFAULT_TOLERANCE
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise UsnetValueError(f"tolerance must be a positive number, got {tolerance!r}")
    return float(tolerance)
