"""Model runners of ``usnet serve``: one model, several widths, ``run(batch, width)``.

Every runner offers the same small interface (:class:`Runner`): its widths (ascending), the
top-1 of each width where the artifact or checkpoint records it, the input shape and number of
classes, ``run(images, width) -> (logits, width that ran)`` and the latency of each (width,
batch size) for the width controller, measured at start (or read from the artifact) and then
refreshed by the server with what it observes.

What a path holds decides which runner serves it (:data:`ARTIFACT_KINDS`, a registry):

* a usnet checkpoint (``usnet.save``/``usnet train``): the plain export of each width
  (``usnet.export``) prepared once at start, in PyTorch (``runtime="torch"``, the default;
  tensors that the narrower widths take whole from the full width's share its storage) or in
  onnxruntime (``runtime="onnx"``: each width exported to ONNX in memory and verified);
* a directory written by ``usnet export --widths ... --format onnx --out DIR`` (``index.json``,
  one ONNX file per width; ``pt`` and ``torchscript`` exports run in PyTorch);
* a switchable ONNX file (one file, every width: inputs ``input`` (N, C, H, W) float32 and
  ``width`` (a float32 scalar), outputs ``logits`` and the width that ran (``width``, or the
  output whose name holds ``width``: ONNX cannot reuse the input's name for it) and its
  ``usnet.switchable`` metadata (entries, top-1, latency tables): ``usnet export --switchable``;
  the same onnxruntime runner with a two-line adapter.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..device import timed_ms
from ..errors import UsnetValueError

Call = Callable[[np.ndarray], tuple[np.ndarray, float]]
"""One width of a model: images -> (logits, the width that ran)."""


class Runner:
    """One model at several widths (see the module docstring)."""

    runtime = "?"

    def __init__(self, calls: Mapping[float, Call], input_shape: Sequence[int],
                 top1: Mapping[float, float] | None = None, source: str = "",
                 latency: Mapping[tuple[float, int], float] | None = None,
                 equivalent: Mapping[float, float] | None = None):  # fmt: skip
        if not calls:
            raise UsnetValueError(f"{source or 'the model'}: no width to serve")
        self.widths: tuple[float, ...] = tuple(sorted(calls))
        self._calls = dict(calls)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.top1 = {w: float(a) for w, a in (top1 or {}).items() if w in self._calls}
        # width -> the narrowest width known to give the same network (widths rounding to the
        # same channels): a pinned width down to it runs this one
        self.equivalent = {w: min(w, float((equivalent or {}).get(w, w))) for w in self.widths}
        self.source = source
        self.stored_latency = dict(latency or {})
        self.torch_threads = torch.get_num_threads()
        logits, _ = self.run(np.zeros((1, *self.input_shape), np.float32), self.widths[-1])
        self.num_classes = int(logits.shape[-1])

    def run(self, images: np.ndarray, width: float) -> tuple[np.ndarray, float]:
        """Logits of ``images`` (N, C, H, W) float32 at ``width`` (one of :attr:`widths`)."""
        try:
            call = self._calls[width]
        except KeyError:
            raise UsnetValueError(f"width {width!r} is not served; served: "
                                  f"{', '.join(f'{w:g}' for w in self.widths)}") from None  # fmt: skip
        return call(images)

    def latency(self, batch_sizes: Sequence[int], warmup: int = 2,
                repeats: int = 7) -> dict[tuple[float, int], float]:  # fmt: skip
        """Seconds per batch for each (width, batch size): the artifact's own table when it has
        every entry, else measured now (median of ``repeats`` runs after ``warmup``)."""
        wanted = [(w, b) for w in self.widths for b in batch_sizes]
        if self.stored_latency and all(k in self.stored_latency for k in wanted):
            return {k: self.stored_latency[k] for k in wanted}
        return measure_latency(self, batch_sizes, warmup, repeats)

    def init_thread(self) -> None:
        """Run in a thread that will call :meth:`run`: torch's intra-op thread count is per
        thread, and a new thread would otherwise use every core (spinning OpenMP workers on a
        busy machine cost tens of milliseconds per batch)."""
        torch.set_num_threads(self.torch_threads)

    def describe(self) -> dict:
        return {"runtime": self.runtime, "source": self.source,
                "widths": list(self.widths)}  # fmt: skip


def measure_latency(runner: Runner, batch_sizes: Sequence[int], warmup: int = 2,
                    repeats: int = 5) -> dict[tuple[float, int], float]:  # fmt: skip
    """Median seconds of ``runner.run`` per (width, batch size) on random images."""
    rng = np.random.default_rng(0)
    out = {}
    for b in batch_sizes:
        images = rng.standard_normal((b, *runner.input_shape), dtype=np.float32)
        for w in runner.widths:
            samples = timed_ms(lambda: runner.run(images, w), warmup, repeats)
            out[(w, b)] = statistics.median(samples) / 1e3
    return out


# --- PyTorch ------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """Plain PyTorch modules, one per width, on ``device``."""

    runtime = "torch"

    def __init__(self, modules: Mapping[float, nn.Module], input_shape: Sequence[int],
                 top1: Mapping[float, float] | None = None, device: str = "cpu",
                 source: str = "", equivalent: Mapping[float, float] | None = None):  # fmt: skip
        self.device = torch.device(device)
        self.modules = {w: m.to(self.device).eval() for w, m in modules.items()}
        calls = {w: self._call(w, m) for w, m in self.modules.items()}
        super().__init__(calls, input_shape, top1, source, equivalent=equivalent)

    def _call(self, width: float, module: nn.Module) -> Call:
        device = self.device

        def run(images: np.ndarray) -> tuple[np.ndarray, float]:
            with torch.inference_mode():
                logits = module(torch.from_numpy(images).to(device))
            return logits.float().cpu().numpy(), width

        return run

    def resident_bytes(self) -> int:
        """Bytes of the distinct tensor storages of all widths' parameters and buffers."""
        return _storage_bytes(self.modules.values())


def _storage_bytes(modules) -> int:
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def share_storage(modules: Mapping[float, nn.Module], full: nn.Module) -> int:
    """Point every tensor of the narrower modules that equals the leading part of the full
    width's tensor of the same name along its first dimension (a contiguous view: biases,
    BatchNorm weights, a first convolution's filters) at that part. Returns the bytes saved."""
    full_tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    saved = 0
    for module in modules.values():
        if module is full:
            continue
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            f = full_tensors.get(name)
            if (f is None or f.dim() == 0 or f.dim() != t.dim() or f.dtype != t.dtype
                    or tuple(f.shape[1:]) != tuple(t.shape[1:]) or t.shape[0] > f.shape[0]):  # fmt: skip
                continue
            view = f.detach()[: t.shape[0]]
            if torch.equal(view, t.detach()):
                saved += t.numel() * t.element_size()
                t.data = view
    return saved


def _checkpoint_widths(model: nn.Module, payload: Mapping, widths: Sequence[float] | None,
                       source: str) -> tuple[list[float], dict[float, float], dict[float, float]]:  # fmt: skip
    """One width per distinct channel configuration of ``widths`` (the widest of those giving
    it), by default the spectrum's calibrated widths; each one's top-1; and the narrowest
    width giving the same configuration."""
    from ..calibration import is_calibrated
    from ..deploy.artifact import spectrum_top1
    from ..state import get_state

    plan = get_state(model).plan
    spectrum = (payload.get("extra") or {}).get("spectrum") or []
    if widths is None:
        listed = [float(r["width"]) for r in spectrum if isinstance(r.get("width"), (int, float))]
        lo, hi = get_state(model).width_range
        listed = listed or [lo + (hi - lo) * i / 4 for i in range(5)]
        widths = [w for w in listed if is_calibrated(model, w)]
        if not widths:
            raise UsnetValueError(f"{source}: none of the widths {listed} is calibrated; run "
                                  "usnet calibrate, or pass --widths naming calibrated widths")  # fmt: skip
    else:
        widths = [plan.check_width(float(w)) for w in widths]
        missing = [w for w in widths if not is_calibrated(model, w)]
        if missing:
            raise UsnetValueError(f"{source}: width {missing[0]:g} is not calibrated; run usnet "
                                  "calibrate --widths ... first, or serve calibrated widths")  # fmt: skip
    by_config: dict[tuple[int, ...], float] = {}
    narrowest: dict[tuple[int, ...], float] = {}
    for w in sorted(widths):
        by_config[plan.config(w)] = w
        narrowest.setdefault(plan.config(w), w)
    chosen = sorted(by_config.values())
    equivalent = {by_config[c]: narrowest[c] for c in by_config}
    top1 = {w: a for w in chosen if (a := spectrum_top1(model, spectrum, w)) is not None}
    return chosen, top1, equivalent


def open_checkpoint(path: str, runtime: str | None = None, device: str = "cpu",
                    threads: int | None = None, widths: Sequence[float] | None = None) -> Runner:  # fmt: skip
    """A runner over the plain exports of a checkpoint's widths (see the module docstring)."""
    from ..checkpoint import model_from_checkpoint, read_checkpoint
    from ..deploy.plain import export
    from ..train.data import checkpoint_input_size

    payload = read_checkpoint(path)
    model = model_from_checkpoint(payload, path)
    chosen, top1, equivalent = _checkpoint_widths(model, payload, widths, path)
    input_shape = checkpoint_input_size(model, payload)[1:]
    if runtime in (None, "torch"):
        modules = {w: export(model, w) for w in chosen}
        share_storage(modules, modules[chosen[-1]])
        return TorchRunner(modules, input_shape, top1, device, source=path, equivalent=equivalent)
    from ..deploy.artifact import deployable, serialize

    example = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    sessions = {}
    for w in chosen:
        module = deployable(model, w)
        data = serialize(module, "onnx", example)
        session = _session(data, device, threads)
        (got,) = session.run(["logits"], {"input": example.numpy()})
        with torch.no_grad():
            expected = module(example).numpy()
        diff = float(np.abs(got - expected).max())
        if not diff <= 1e-4:
            raise UsnetValueError(f"{path}: the ONNX export of width {w:g} differs from PyTorch "
                                  f"by {diff:.3g} (> 1e-4); serve it with --runtime torch")  # fmt: skip
        sessions[w] = session
    return OnnxRunner({w: _single_width(s, w) for w, s in sessions.items()}, input_shape, top1,
                      source=path, equivalent=equivalent)  # fmt: skip


# --- onnxruntime --------------------------------------------------------------------------------
class OnnxRunner(Runner):
    """onnxruntime sessions: one per width (an export directory), or one switchable session
    called with each width."""

    runtime = "onnxruntime"


def _session(source: bytes | str, device: str = "cpu", threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise UsnetValueError("--device cuda needs onnxruntime with CUDA "
                                  "(onnxruntime-gpu); this one has "
                                  f"{', '.join(onnxruntime.get_available_providers())}")  # fmt: skip
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return onnxruntime.InferenceSession(source, options, providers=providers)


def _single_width(session, width: float) -> Call:
    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        (logits,) = session.run(["logits"], {"input": images})
        return logits, width

    return run


def _switchable_width(session, width: float, width_output: str) -> Call:
    """The adapter for a switchable artifact: the width is an input, and an output."""
    requested = np.asarray(width, dtype=np.float32)

    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        logits, ran = session.run(["logits", width_output], {"input": images, "width": requested})
        return logits, round(float(np.asarray(ran).reshape(-1)[0]), 6)  # float32 -> as listed

    return run


def read_index(directory: Path) -> dict:
    from ..deploy.artifact import INDEX

    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not isinstance(index.get("models"), list):
            raise TypeError
        size = index["input_size"]
        if not (isinstance(size, list) and len(size) == 4):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UsnetValueError(f"{str(path)!r} is not an index written by usnet export --widths "
                              "--out DIR") from None  # fmt: skip
    return index


def open_export_dir(path: str, runtime: str | None = None, device: str = "cpu",
                    threads: int | None = None, widths: Sequence[float] | None = None) -> Runner:  # fmt: skip
    """A runner over a ``usnet export --widths ... --out DIR`` directory: one file per width."""
    directory = Path(path)
    index = read_index(directory)
    format = index.get("format")
    by_file: dict[str, dict] = {}
    narrowest: dict[str, float] = {}
    for row in index["models"]:
        if not isinstance(row, dict) or not isinstance(row.get("width"), (int, float)):
            continue  # a non-uniform configuration: not addressed by a width
        if widths is not None and not any(abs(row["width"] - w) < 1e-9 for w in widths):
            continue
        kept = by_file.get(row.get("file"))  # the widest width of each file stands for it
        if kept is None or row["width"] > kept["width"]:
            by_file[row.get("file")] = row
        narrowest[row.get("file")] = min(row["width"], narrowest.get(row.get("file"), 1.0))
    if not by_file:
        raise UsnetValueError(f"{path}: index.json lists no uniform width to serve"
                              + (f" among {list(widths)}" if widths is not None else ""))  # fmt: skip
    rows = sorted(by_file.values(), key=lambda r: r["width"])
    equivalent = {float(r["width"]): narrowest[r.get("file")] for r in rows}
    top1 = {float(r["width"]): float(r["top1"]) for r in rows if r.get("top1") is not None}
    input_shape = index["input_size"][1:]
    files = {float(r["width"]): directory / str(r["file"]) for r in rows}
    for f in files.values():
        if not f.is_file():
            raise UsnetValueError(f"{path}: index.json lists {f.name}, which is missing")
    if format == "onnx":
        if runtime not in (None, "onnx"):
            raise UsnetValueError(f"{path} holds ONNX files: serve it with --runtime onnx")
        calls = {w: _single_width(_session(str(f), device, threads), w) for w, f in files.items()}
        return OnnxRunner(calls, input_shape, top1, source=path, equivalent=equivalent)
    if format in ("pt", "torchscript"):
        if runtime not in (None, "torch"):
            raise UsnetValueError(f"{path} holds {format} files: serve it with --runtime torch")
        from ..deploy.load import load_artifact

        calls = {w: _torch_artifact(load_artifact(f, format), w) for w, f in files.items()}
        runner = Runner(calls, input_shape, top1, source=path, equivalent=equivalent)
        runner.runtime = "torch"
        return runner
    raise UsnetValueError(f"{path}: index.json has format {format!r}; usnet serve runs onnx, pt "
                          "and torchscript exports")  # fmt: skip


def _torch_artifact(call, width: float) -> Call:
    def run(images: np.ndarray) -> tuple[np.ndarray, float]:
        return call(torch.from_numpy(images)).numpy(), width

    return run


def open_switchable(path: str, runtime: str | None = None, device: str = "cpu",
                    threads: int | None = None, widths: Sequence[float] | None = None) -> Runner:  # fmt: skip
    """A runner over one switchable ONNX file (see the module docstring)."""
    from ..deploy.onnx_file import read_onnx, switchable_metadata

    if runtime not in (None, "onnx"):
        raise UsnetValueError(f"{path} is an ONNX file: serve it with --runtime onnx")
    proto = read_onnx(Path(path).read_bytes(), repr(str(path)))  # an error naming a bad file
    meta = switchable_metadata(proto)
    names = {i.name for i in proto.graph.input}
    # ONNX names each value once: the width output is "width" only where it passes the input
    # through; else the output that names a width ("width_run", ...).
    width_outputs = sorted((o.name for o in proto.graph.output if "width" in o.name),
                           key=lambda n: (n != "width", n))  # fmt: skip
    logits = any(o.name == "logits" for o in proto.graph.output)
    if meta is None or not {"input", "width"} <= names or not logits or not width_outputs:
        raise UsnetValueError(
            f"{path} is not a switchable usnet artifact (inputs input and width, outputs logits "
            "and the width run, metadata 'usnet.switchable' with entries: usnet export "
            "--switchable writes one); serve a checkpoint, a usnet "
            "export --widths directory or a switchable ONNX file"
        )
    (image_input,) = [i for i in proto.graph.input if i.name == "input"]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in image_input.type.tensor_type.shape.dim]  # fmt: skip
    if len(dims) != 4 or None in dims[1:]:
        raise UsnetValueError(f"{path}: input 'input' must have shape (N, C, H, W) with fixed "
                              f"C, H, W; it has {dims}")  # fmt: skip
    entries = [e for e in meta["entries"]
               if isinstance(e, dict) and isinstance(e.get("width"), (int, float))]  # fmt: skip
    if widths is not None:
        entries = [e for e in entries if any(abs(e["width"] - w) < 1e-9 for w in widths)]
    if not entries:
        raise UsnetValueError(f"{path}: the metadata lists no uniform width to serve")
    session = _session(proto.SerializeToString(), device, threads)
    calls = {float(e["width"]): _switchable_width(session, float(e["width"]), width_outputs[0])
             for e in entries}  # fmt: skip
    top1 = {float(e["width"]): float(e["top1"]) for e in entries
            if isinstance(e.get("top1"), (int, float))}  # fmt: skip
    latency = _stored_latency(meta.get("latency"), entries, threads)
    return OnnxRunner(calls, dims[1:], top1, source=path, latency=latency)


def _stored_latency(tables, entries: Sequence[dict], threads: int | None) -> dict:
    """The artifact's latency tables (``usnet profile --latency``) measured on this machine and
    runtime at this thread count, in seconds per (width, batch size); tables of another machine,
    runtime version or thread count are ignored (the server then measures)."""
    from ..deploy.latency import this_machine

    by_name = {e.get("name"): float(e["width"]) for e in entries}
    out: dict[tuple[float, int], float] = {}
    for table in tables if isinstance(tables, list) else []:
        batch = table.get("batch_size") if isinstance(table, dict) else None
        if not isinstance(batch, int) or batch < 1:
            continue
        if any(table.get(k) != v for k, v in this_machine(threads or 1, batch).items()):
            continue
        for name, ms in zip(table.get("entries", []), table.get("median_ms", [])):
            if name in by_name and isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0:
                out[(by_name[name], batch)] = ms / 1e3
    return out


# --- what a path holds --------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactKind:
    """How to recognize one kind of servable path, and how to open a runner over it."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[..., Runner]


def _is_export_dir(path: Path) -> bool:
    from ..deploy.artifact import INDEX

    return path.is_dir() and (path / INDEX).is_file()


def _is_onnx(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


ARTIFACT_KINDS: dict[str, ArtifactKind] = {
    k.name: k
    for k in (
        ArtifactKind("export directory", _is_export_dir, open_export_dir),
        ArtifactKind("switchable onnx", _is_onnx, open_switchable),
        ArtifactKind("checkpoint", _is_checkpoint, open_checkpoint),
    )
}
"""Servable kinds of path, tried in order (a registry: add a kind to serve a new artifact)."""

RUNTIMES = ("onnx", "torch")


def open_runner(path: str | os.PathLike, runtime: str | None = None, device: str = "cpu",
                threads: int | None = None, widths: Sequence[float] | None = None) -> Runner:  # fmt: skip
    """The runner for whatever ``path`` holds (:data:`ARTIFACT_KINDS`)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise UsnetValueError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if device not in ("cpu", "cuda"):
        raise UsnetValueError(f"unknown device {device!r}; valid: cpu, cuda")
    if device == "cuda" and runtime != "onnx" and not torch.cuda.is_available():
        raise UsnetValueError("--device cuda: no CUDA device is available; use --device cpu")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    for kind in ARTIFACT_KINDS.values():
        if kind.matches(p):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return kind.open(str(path), runtime, device, threads, widths)
    raise UsnetValueError(f"{str(path)!r} is not servable: give a usnet checkpoint, a directory "
                          "written by usnet export --widths ... --out DIR, or a switchable "
                          "ONNX file")  # fmt: skip
