"""One artifact, every width: a switchable ONNX file and its runtime, and a PyTorch one.

:func:`export_switchable` writes several widths of a slimmable model (uniform widths and
non-uniform ``{group: multiplier}`` configurations, e.g. from ``usnet search``) as one ONNX file
that runs the width asked for at run time (the graph: :mod:`usnet.deploy.switchable_onnx`). Weights are
stored once; each entry keeps its own BatchNorm statistics (or folds them, ``fuse_bn``). Like
every export it is verified before it is written: each entry's logits, run from the file's bytes
in onnxruntime, must equal the standalone export of that width (:func:`usnet.export_artifact`'s
file, run in onnxruntime) within 1e-5, and that export must equal the slimmable model within the
export tolerance; otherwise nothing is written.

The file's ``metadata_props`` hold ``usnet.switchable``: JSON with the entries (index, name,
width, config id, params, MACs, top-1 if known), the input size, the usnet version and, once
measured (:func:`profile_latency`, ``usnet profile --latency``), a latency table per runtime,
device, thread count and batch size. :func:`usnet.load_artifact` opens it as a
:class:`SwitchableArtifact`.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..channels import Width, config_id, format_width, width_value
from ..errors import UsnetValueError
from ..files import atomic_write_bytes
from ..state import check_input_size, get_state, input_size_of
from ..version import __version__
from .artifact import (
    VerificationError,
    check_tolerance,
    deployable,
    load_single,
    max_abs_diff,
    reference_logits,
    serialize,
    spectrum_top1,
)
from .cost import module_cost
from .onnx_file import read_onnx, set_metadata, switchable_metadata
from .plain import export
from .switchable_onnx import (
    ENTRY_INPUT,
    OUTPUT_NAMES,
    WIDTH_INPUT,
    EntryGraph,
    build_switchable,
    export_entry,
)

FORMAT_VERSION = 1
SWITCH_TOLERANCE = 1e-5
"""Largest |logits difference| allowed between an entry and the standalone export of its width."""
SWITCHABLE_FORMATS = ("onnx",)


@dataclass(frozen=True)
class SwitchableExport:
    """What :func:`export_switchable` wrote: the file, its entries and how they verified."""

    path: str
    format: str
    entries: list[dict]
    input_size: tuple[int, ...]
    fused_bn: bool
    file_bytes: int
    shared_bytes: int
    entry_bytes: list[int]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        return out


def entry_name(width: Width, cid: str) -> str:
    """``w0.500`` for a uniform width, ``config-<config id>`` for a non-uniform one."""
    return f"config-{cid}" if isinstance(width, Mapping) else f"w{float(width):.3f}"


def resolve_entries(model: nn.Module, widths) -> list[tuple[str, Width]]:
    """``(name, width)`` per distinct channel configuration of ``widths`` (a sequence of widths,
    or a mapping name -> width), validated: uniform widths first, narrowest first, then the
    non-uniform ones in the order given. Widths giving one configuration are one entry (the
    narrowest of them for uniform widths)."""
    plan = get_state(model).plan
    if isinstance(widths, Mapping):
        named = [(str(n), w) for n, w in widths.items()]
    elif isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise UsnetValueError(
            "widths must be a list of widths (0.5, or {group: multiplier}) or a mapping "
            f"name -> width, got {type(widths).__name__}"
        )
    else:
        named = [(None, w) for w in widths]
    checked = [(n, plan.check_width(w)) for n, w in named]
    uniform = sorted(((n, w) for n, w in checked if not isinstance(w, Mapping)),
                     key=lambda nw: nw[1])  # fmt: skip
    other = [(n, w) for n, w in checked if isinstance(w, Mapping)]
    out, seen = [], {}
    for name, width in uniform + other:
        cid = config_id(plan.config(width))
        if cid in seen:
            first = seen[cid]
            if name is not None and first[0] is not None:  # two names for one network
                raise UsnetValueError(
                    f"entries {first[0]!r} and {name!r} are the same network (channel "
                    f"configuration {cid}); give it once"
                )
            continue  # widths that round to the same channels: one entry
        seen[cid] = (name, width)
        out.append((name, width, cid))
    if len(out) < 2:
        raise UsnetValueError(
            f"a switchable artifact needs at least two distinct channel configurations, got "
            f"{len(out)} from {len(checked)} widths; export one width with usnet export --width"
        )
    names = [n if n is not None else entry_name(w, cid) for n, w, cid in out]
    for i, (n, (_, w, cid)) in enumerate(zip(names, out)):
        if names.count(n) > 1 and not isinstance(w, Mapping):
            names[i] = f"{n}-{cid}"  # two widths printing alike, different networks
    bad = [n for n in names if not n or names.count(n) > 1]
    if bad:
        raise UsnetValueError(f"entry names must be unique and non-empty, got {bad[0]!r} twice")
    return [(n, w) for n, (_, w, _) in zip(names, out)]


def export_switchable(
    model: nn.Module,
    widths,
    path: str | os.PathLike,
    format: str = "onnx",
    *,
    fuse_bn: bool = False,
    input_size: Sequence[int] | None = None,
    tolerance: float | None = None,
    spectrum: Sequence[Mapping] | None = None,
    seed: int = 0,
) -> SwitchableExport:
    """Write ``model`` at every width of ``widths`` to one file that runs any of them.

    Args:
        widths: uniform widths and/or ``{group: multiplier}`` widths, or a mapping
            ``name -> width`` naming the entries (default names ``w0.500``,
            ``config-<config id>``). Every width must be calibrated.
        format: ``"onnx"`` (the only switchable format; see docs/benchmarks.md on ExecuTorch).
        fuse_bn: fold each entry's BatchNorm into its convolutions (its own statistics).
        input_size: ``(N, C, H, W)`` (default: the model's); N is the verification batch.
        tolerance: bound of the standalone exports against the slimmable model (1e-4; 1e-3
            with ``fuse_bn``). Entries must equal their standalone export within 1e-5.
        spectrum: rows with ``config_id``/``top1`` (``usnet train``'s): top-1 per entry.

    Raises :class:`~usnet.VerificationError` (nothing written) if any entry differs.
    """
    import onnx
    import onnxruntime

    if format not in SWITCHABLE_FORMATS:
        raise UsnetValueError(
            f"switchable export writes {', '.join(SWITCHABLE_FORMATS)}, got {format!r} "
            "(one file per width: usnet.export_widths)"
        )
    if Path(path).is_dir():
        raise FileExistsError(f"{str(path)!r} is a directory; name the file to write")
    state = get_state(model)
    entries = resolve_entries(model, widths)
    size = check_input_size(input_size_of(model, input_size))
    tolerance = check_tolerance(tolerance, fuse_bn)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((max(2, size[0]), *size[1:]), generator=gen)
    graphs, rows, expected = [], [], []
    for index, (name, width) in enumerate(entries):
        plain = export(model, width, trace=True).cpu()
        images = images.to(next(plain.parameters()).dtype)
        uniform = not isinstance(width, Mapping)
        graphs.append(EntryGraph(export_entry(plain, images).graph, width if uniform else None))
        standalone = deployable(model, width, fuse_bn=fuse_bn)
        reference = load_single(serialize(standalone, "onnx", images), "onnx")(images)
        model_diff = max_abs_diff(reference, reference_logits(model, width, images))
        if not model_diff <= tolerance:
            raise VerificationError(
                f"the standalone onnx export at width {format_width(width)} differs from the "
                f"slimmable model by {model_diff:.3g} (tolerance {tolerance:g}); nothing was written"
            )
        params, flops = module_cost(standalone, (1, *size[1:]))
        row = {"index": index, "name": name, "width": width_value(width),
               "config_id": config_id(state.plan.config(width)), "params": params,
               "macs": flops // 2}  # fmt: skip
        top1 = spectrum_top1(model, spectrum, width)
        if top1 is not None:
            row["top1"] = top1
        rows.append(row)
        expected.append(reference)
    full = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    proto, sharing = build_switchable(graphs, full, fuse_bn=fuse_bn)
    meta = {
        "format_version": FORMAT_VERSION,
        "usnet_version": _usnet_version(),
        "input_size": list(size),
        "width_range": list(state.plan.width_range),
        "fused_bn": fuse_bn,
        "inputs": {"images": "input", "width": WIDTH_INPUT, "entry": ENTRY_INPUT},
        "outputs": list(OUTPUT_NAMES),
        "entries": rows,
        "latency": [],
    }
    set_metadata(proto, meta)
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    for row, reference in zip(rows, expected):
        feed = {"input": images.numpy()}
        if isinstance(row["width"], float):
            feed[WIDTH_INPUT] = np.array(row["width"], np.float32)
        else:  # reached by its index only; the width is then ignored
            feed[WIDTH_INPUT] = np.array(math.nan, np.float32)
            feed[ENTRY_INPUT] = np.array(row["index"], np.int64)
        logits, ran_width, ran = session.run(list(OUTPUT_NAMES), feed)
        diff = max_abs_diff(torch.from_numpy(logits), reference)
        if int(ran) != row["index"] or not diff <= SWITCH_TOLERANCE:
            raise VerificationError(
                f"switchable entry {row['name']!r} ran entry {int(ran)} and differs from the "
                f"standalone export by {diff:.3g} (tolerance {SWITCH_TOLERANCE:g}); nothing "
                "was written"
            )
        row["max_abs_diff"] = diff
    set_metadata(proto, meta)  # now with each entry's verified difference
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return SwitchableExport(
        path=str(path), format=format, entries=rows, input_size=size, fused_bn=fuse_bn,
        file_bytes=len(data), shared_bytes=sharing.shared_bytes, entry_bytes=sharing.entry_bytes,
    )  # fmt: skip


def _usnet_version() -> str:

    return __version__


class EntryTable:
    """The entries of a switchable artifact or runtime and the rule choosing one: a width runs
    the widest uniform entry at most that width (the narrowest below them); an entry is named
    or indexed directly."""

    def __init__(self, entries: list[dict], width_range: Sequence[float] = ()):
        self.entries = entries
        self.names = [e["name"] for e in entries]
        self.widths = [e["width"] for e in entries if _is_number(e["width"])]
        self.max_width = max([1.0, *self.widths, *width_range])

    def entry_index(self, width: float | None = None, entry: int | str | None = None) -> int:
        """The index of the entry that ``width`` (or ``entry``) runs, validated."""
        if entry is not None:
            if width is not None:
                raise UsnetValueError("give width= or entry=, not both")
            if isinstance(entry, str):
                if entry not in self.names:
                    raise UsnetValueError(
                        f"no entry named {entry!r}; entries: {', '.join(self.names)}"
                    )
                return self.names.index(entry)
            if (
                isinstance(entry, bool)
                or not isinstance(entry, int)
                or not 0 <= entry < len(self.names)
            ):
                raise UsnetValueError(
                    f"entry must be an index 0..{len(self.names) - 1} or a name "
                    f"({', '.join(self.names)}), got {entry!r}"
                )
            return entry
        if width is None:
            if not self.widths:
                return len(self.entries) - 1
            width = max(self.widths)
        if (
            isinstance(width, bool)
            or not isinstance(width, (int, float))
            or not (0 <= width <= self.max_width)
        ):
            raise UsnetValueError(
                f"width {width!r} is invalid: valid widths are 0 to {self.max_width:g} (below "
                f"{min(self.widths, default=0):g} the narrowest entry runs); entries: "
                f"{self.describe_entries()}"
            )
        # the uniform entries come first, narrowest first (resolve_entries)
        return max(bisect.bisect_right(self.widths, width) - 1, 0)

    def describe_entries(self) -> str:
        return ", ".join(f"{e['name']}" + (f" (width {e['width']:g})" if _is_number(e["width"]) else "")
                         for e in self.entries)  # fmt: skip


class SwitchableArtifact(EntryTable):
    """A switchable ONNX file in onnxruntime: ``artifact(images, width=0.5)`` -> logits.

    ``width`` runs the widest uniform entry whose width is at most it (the narrowest below
    them; default: the widest); ``entry=`` (an index or a name) runs any entry, non-uniform ones
    included. ``widths``, ``entries``, ``names`` and ``latency`` come from the file's metadata.

    ``dispatch="entries"`` (default) gives each entry a session of its own, built from the
    file's shared weights and that entry's subgraph, so that switching is a list lookup and a
    run costs what the standalone export costs; ``dispatch="graph"`` runs the file's own graph
    (its ``If`` nodes select the entry, as in a runtime without usnet).
    """

    def __init__(self, proto, source: str, *, threads: int | None = None,
                 dispatch: str = "entries", options=None):  # fmt: skip
        import onnxruntime

        from .switchable_onnx import entry_model

        meta = switchable_metadata(proto)
        if meta is None:
            raise UsnetValueError(f"{source} is not a switchable usnet artifact")
        if dispatch not in ("entries", "graph"):
            raise UsnetValueError(f"dispatch must be 'entries' or 'graph', got {dispatch!r}")
        super().__init__(meta["entries"], meta.get("width_range", ()))
        self.source = source
        self.meta = meta
        self.input_size = tuple(meta["input_size"])
        self.latency: list[dict] = meta.get("latency", [])
        self.threads = threads
        self.dispatch = dispatch
        if options is None:  # else the caller's onnxruntime.SessionOptions, as they are
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # not the overridable-initializer warning of `entry`
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]

        def session(model_bytes: bytes):
            return onnxruntime.InferenceSession(model_bytes, options, providers=providers)

        self.session = session(proto.SerializeToString()) if dispatch == "graph" else None
        self.input_names = {"input", WIDTH_INPUT} | (
            {ENTRY_INPUT} if any(i.name == ENTRY_INPUT for i in proto.graph.input) else set()
        )
        self.sessions = (
            [session(entry_model(proto, i).SerializeToString()) for i in range(len(self.entries))]
            if dispatch == "entries"
            else None
        )

    def check_images(self, images) -> np.ndarray:
        c, h, w = self.input_size[1:]
        array = images
        if isinstance(images, Tensor):
            try:
                array = images.numpy()  # the common case, without a copy or a detach
            except RuntimeError:  # on a GPU, or requiring grad
                array = images.detach().cpu().numpy()
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != np.float32
            or (array.ndim != 4 or tuple(array.shape[1:]) != (c, h, w) or array.shape[0] < 1)
        ):
            got = (f"{type(images).__name__} of shape {tuple(getattr(array, 'shape', ()))} and "
                   f"dtype {getattr(images, 'dtype', None)}")  # fmt: skip
            raise UsnetValueError(
                f"{self.source} takes images of shape (N, {c}, {h}, {w}) and dtype float32, got {got}"
            )
        return array

    def run(self, images, width: float | None = None, *, entry: int | str | None = None):
        """(logits, width run, entry index run) for ``images`` at ``width`` (or ``entry``); the
        width run is NaN for a non-uniform entry."""
        index = self.entry_index(width, entry)  # validates
        array = self.check_images(images)
        chosen = self.entries[index]["width"]
        if self.sessions is not None:
            (logits,) = self.sessions[index].run(["logits"], {"input": array})
            return (
                torch.from_numpy(logits),
                float(chosen) if _is_number(chosen) else math.nan,
                index,
            )
        feed = {"input": array, WIDTH_INPUT: np.array(math.nan, np.float32)}
        if entry is None and width is not None:
            feed[WIDTH_INPUT] = np.array(width, np.float32)  # the graph selects by itself
        elif ENTRY_INPUT in self.input_names:
            feed[ENTRY_INPUT] = np.array(index, np.int64)
        else:  # only uniform entries: the entry's own width selects it
            feed[WIDTH_INPUT] = np.array(chosen, np.float32)
        logits, ran_width, ran = self.session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(np.asarray(logits)), float(ran_width), int(ran)

    def __call__(
        self, images, width: float | None = None, *, entry: int | str | None = None
    ) -> Tensor:
        return self.run(images, width, entry=entry)[0]

    def __repr__(self) -> str:
        return f"SwitchableArtifact({self.source!r}, entries: {self.describe_entries()})"


def load_switchable(source: str | os.PathLike | bytes, *, threads: int | None = None,
                    dispatch: str = "entries", options=None) -> SwitchableArtifact:  # fmt: skip
    """Open a switchable ONNX file (or its bytes) for onnxruntime (``options``: an
    ``onnxruntime.SessionOptions`` for every session); errors name the file."""
    name = "the given bytes" if isinstance(source, bytes) else repr(str(source))
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return SwitchableArtifact(read_onnx(data, name), name, threads=threads, dispatch=dispatch,
                              options=options)  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Switchable(EntryTable):
    """Every width of a slimmable model prepared once as plain PyTorch modules: switching is a
    list lookup, and each width runs its own :func:`usnet.export` module, at its speed.

    ``Switchable(model, [0.35, 0.5, 1.0])(images, width=0.6)`` runs the widest entry at most
    0.6 (0.5 here), by the rule of the switchable ONNX file. Weights are stored once where the
    layout allows: an entry's tensor that equals the leading rows of the widest entry's tensor
    of the same name, with the other dimensions whole (a conv taking every input channel, a
    depthwise conv, BatchNorm affine parameters, biases), is a view of it; a tensor sliced in
    a second dimension (most convs) would be a strided view that convolutions copy on every
    call, so it keeps its own contiguous copy. :meth:`memory` says how much that is.
    """

    def __init__(self, model: nn.Module, widths, *, device: str | torch.device | None = None):
        entries = resolve_entries(model, widths)
        plan = get_state(model).plan
        self.modules: list[nn.Module] = []
        rows = []
        for index, (name, width) in enumerate(entries):
            with torch.inference_mode(False):  # copies made in inference mode have no versions
                module = export(model, width)
            if device is not None:
                module = module.to(device)
            self.modules.append(module)
            rows.append({"index": index, "name": name, "width": width_value(width),
                         "config_id": config_id(plan.config(width)),
                         "params": sum(p.numel() for p in module.parameters())})  # fmt: skip
        super().__init__(rows, plan.width_range)
        self.shared = _share_storage(self.modules)

    def module(self, width: float | None = None, *, entry: int | str | None = None) -> nn.Module:
        """The prepared module that ``width`` (or ``entry``) runs."""
        return self.modules[self.entry_index(width, entry)]

    def __call__(self, images: Tensor, width: float | None = None, *,
                 entry: int | str | None = None) -> Tensor:  # fmt: skip
        module = self.modules[self.entry_index(width, entry)]
        with torch.inference_mode():
            return module(images)

    def memory(self) -> dict:
        """Bytes of all entries' tensors (each storage once), of the widest entry alone, and
        the names of the tensors that are views of another entry's."""
        storages = {}
        for module in self.modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        widest = max(self.modules, key=lambda m: sum(p.numel() for p in m.parameters()))
        widest_bytes = sum(t.numel() * t.element_size()
                           for t in [*widest.parameters(), *widest.buffers()])  # fmt: skip
        return {"total_bytes": sum(storages.values()), "widest_entry_bytes": widest_bytes,
                "shared_tensors": self.shared}  # fmt: skip

    def __repr__(self) -> str:
        return f"Switchable(entries: {self.describe_entries()})"


@torch.no_grad()
def _share_storage(modules: Sequence[nn.Module]) -> int:
    """Make each tensor that equals the leading rows of the largest tensor of its name (in
    another module) a view of it; returns how many tensors became views."""
    tensors: dict[str, list[tuple[nn.Module, str]]] = {}
    for module in modules:
        for qualified, _ in [*module.named_parameters(), *module.named_buffers()]:
            owner_name, _, attr = qualified.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            tensors.setdefault(qualified, []).append((owner, attr))
    shared = 0
    for places in tensors.values():
        get = [getattr(owner, attr) for owner, attr in places]
        base = max(get, key=lambda t: t.numel())
        for (owner, attr), tensor in zip(places, get):
            if tensor is base or tensor.dtype != base.dtype or tensor.ndim != base.ndim:
                continue
            if tensor.ndim == 0 or tensor.shape[1:] != base.shape[1:]:
                continue  # a slice in another dimension would not be contiguous
            view = base[: tensor.shape[0]]
            if tensor.device != base.device or not torch.equal(view, tensor):
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = view
            else:
                owner._buffers[attr] = view
            shared += 1
    return shared
