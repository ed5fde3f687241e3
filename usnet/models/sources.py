"""Models users bring, by name: ``torchvision:NAME``, ``timm:NAME`` and ``package.module:callable``.

:func:`build_model` builds the plain model (no weights are downloaded: ``weights=None``,
``pretrained=False``), gives it the data's input channels and classes, and converts it over the
width range at the data's input size. The model records itself as plain data (source, name,
keyword arguments, conversion options, input size) in ``SlimmableState.arch``, so a checkpoint
rebuilds it with :func:`rebuild` without unpickling any code; only the ``module:callable`` source
imports code, the user's own module, by the name the config gives.

Zoo names (``us_mobilenet_v2``) keep going to :func:`usnet.models.create_model`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..convert import slimmable
from ..errors import UsnetValueError
from .zoo import create_model, list_models

__all__ = [
    "SOURCES",
    "ConvertOptions",
    "ModelSpec",
    "build_model",
    "check_model",
    "parse_model",
    "rebuild",
]

CONVERT_OPTIONS = ("fixed_outputs", "ratio_ties", "divisor", "slim_outputs", "input_averaging")


@dataclass(frozen=True)
class ConvertOptions:
    """The converter's options a config may set for a model it names (``usnet.slimmable``)."""

    fixed_outputs: tuple[str, ...] = ()
    ratio_ties: tuple[str, ...] = ()
    divisor: int = 8
    slim_outputs: bool = False
    input_averaging: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"fixed_outputs": list(self.fixed_outputs), "ratio_ties": list(self.ratio_ties),
                "divisor": self.divisor, "slim_outputs": self.slim_outputs,
                "input_averaging": self.input_averaging}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ConvertOptions:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(CONVERT_OPTIONS))
        if unknown:
            raise UsnetValueError(
                f"unknown conversion option {unknown[0]!r}; valid: {', '.join(CONVERT_OPTIONS)}"
            )
        divisor = int(raw.get("divisor", 8))
        if divisor < 1:
            raise UsnetValueError(f"convert.divisor must be >= 1, got {divisor}")
        return cls(fixed_outputs=tuple(raw.get("fixed_outputs", ())),
                   ratio_ties=tuple(raw.get("ratio_ties", ())), divisor=divisor,
                   slim_outputs=bool(raw.get("slim_outputs", False)),
                   input_averaging=bool(raw.get("input_averaging", False)))  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A model named by a config: ``source`` (``zoo``, ``torchvision``, ``timm``, ``python``),
    ``name`` within it, and the builder's keyword arguments."""

    source: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name if self.source in ("zoo", "python") else f"{self.source}:{self.name}"


def parse_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """``us_convnet`` (the zoo), ``torchvision:resnet18``, ``timm:efficientnet_b0`` or
    ``package.module:build`` (a callable of the user's, imported by that name)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsnetValueError(
            f"model must be a name such as us_convnet or timm:resnet18, got {spec!r}"
        )
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if not sep:
        return ModelSpec("zoo", spec, dict(kwargs or {}))
    if not rest:
        raise UsnetValueError(f"model {spec!r} names no model after {prefix + ':'!r}")
    if prefix in SOURCES:
        return ModelSpec(prefix, rest, dict(kwargs or {}))
    return ModelSpec("python", spec, dict(kwargs or {}))


def check_model(spec: ModelSpec, convert: ConvertOptions | None = None) -> None:
    """Refuse, before any work, a model name its source does not have (listing close matches),
    a callable that cannot be imported, a keyword argument the callable does not take, or
    conversion options for a zoo model (which sets its own)."""
    if spec.source == "zoo" and convert not in (None, ConvertOptions()):
        raise UsnetValueError(
            f"convert options apply to models converted on the fly (torchvision:NAME, timm:NAME, "
            f"module:callable); the zoo model {spec.name!r} sets its own"
        )
    if spec.source == "zoo":
        if spec.name not in list_models():
            raise UsnetValueError(
                _close(spec.name, list_models(), "") + f"; the zoo has {', '.join(list_models())}; "
                "or give torchvision:NAME, timm:NAME or package.module:callable"
            )
    elif spec.source == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if spec.name not in names:
            raise UsnetValueError(_close(spec.name, names, "torchvision classification"))
    elif spec.source == "timm":
        names = _timm_module(spec.name).list_models()
        if spec.name not in names:
            raise UsnetValueError(_close(spec.name, names, "timm"))
    else:
        build = _import_callable(spec.name)
        accepted = _parameters(build)
        unknown = sorted(set(spec.kwargs) - accepted) if accepted is not None else []
        if unknown:
            raise UsnetValueError(
                f"model_kwargs for {spec.name}: {unknown[0]!r} is not an argument of it; it takes "
                f"{', '.join(sorted(accepted)) or 'none'}"
            )


def _close(name: str, names: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown {what + ' ' if what else ''}model {name!r}{hint}"


def _torchvision(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _timm_module(name: str):
    try:
        import timm
    except ImportError:
        raise UsnetValueError(f"model timm:{name} needs timm: pip install 'usnet[timm]'") from None
    return timm


def _timm(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    return _timm_module(name).create_model(
        name, pretrained=False, num_classes=num_classes, **kwargs
    )


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsnetValueError(
            f"model {spec!r}: cannot import {module_name!r} ({err}); give package.module:callable "
            "of a module on the Python path, torchvision:NAME, timm:NAME, or a zoo model "
            f"({', '.join(list_models())})"
        ) from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise UsnetValueError(f"model {spec!r}: {module_name!r} has no callable {attr!r}")
    return build


def _python(spec: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    build = _import_callable(spec)
    accepted = _parameters(build)
    call_kwargs = dict(kwargs)
    if accepted is None or "num_classes" in accepted:
        call_kwargs.setdefault("num_classes", num_classes)
    return build(**call_kwargs)


def _parameters(fn: Callable) -> set[str] | None:
    """The keyword names ``fn`` takes (None: any, it has ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


SOURCES: dict[str, Callable[[str, int, Mapping[str, Any]], nn.Module]] = {
    "torchvision": _torchvision,
    "timm": _timm,
    "python": _python,
}
"""Source -> ``build(name, num_classes, kwargs)``, the plain model with ``num_classes``
outputs and no trained weights (the name already checked by :func:`check_model`)."""


def _with_input_channels(model: nn.Module, in_channels: int, spec: ModelSpec) -> nn.Module:
    """The model reading ``in_channels`` channels: its first conv, if it reads 3, is replaced by
    one of the same shape otherwise (new random weights: nothing trained is lost, none was)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels == in_channels:
        return model
    if first.groups != 1:
        raise UsnetValueError(
            f"{spec.label}: its first conv is grouped; give images with {first.in_channels} channels"
        )
    replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                            first.padding, first.dilation, 1, first.bias is not None,
                            first.padding_mode)  # fmt: skip
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is first:
                setattr(module, child_name, replacement)
                return model
    return model  # pragma: no cover - the first conv is somewhere in the tree


def build_model(
    spec: ModelSpec,
    *,
    num_classes: int,
    in_channels: int,
    input_size: Sequence[int],
    width_range: Sequence[float],
    convert: ConvertOptions | None = None,
    small_input: bool = False,
) -> nn.Module:
    """The slimmable model ``spec`` names, for data of ``input_size`` ``(1, C, H, W)`` and
    ``num_classes`` classes, over ``width_range``."""
    check_model(spec, convert)  # names, kwargs and options: refused before any model is built
    if spec.source == "zoo":
        # the data's sizes, unless model_kwargs set them (a ViT's image size, ...)
        kwargs = {"num_classes": num_classes, "in_channels": in_channels,
                  "small_input": small_input, "width_range": tuple(width_range), **spec.kwargs}  # fmt: skip
        return create_model(spec.name, **kwargs)
    convert = convert or ConvertOptions()
    kwargs = dict(spec.kwargs)
    if spec.source == "timm":
        kwargs.setdefault("in_chans", in_channels)
    try:
        plain = SOURCES[spec.source](spec.name, num_classes, kwargs)
    except TypeError as err:  # a keyword the builder does not take
        raise UsnetValueError(f"model_kwargs for {spec.label}: {err}") from None
    if not isinstance(plain, nn.Module):
        raise UsnetValueError(
            f"model {spec.label} returned a {type(plain).__name__}, not a torch.nn.Module"
        )
    plain = _with_input_channels(plain, in_channels, spec)
    arch = {
        "source": spec.source, "name": spec.name, "kwargs": dict(spec.kwargs),
        "num_classes": int(num_classes), "in_channels": int(in_channels),
        "input_size": [int(s) for s in input_size], "width_range": [float(w) for w in width_range],
        "convert": convert.to_dict(),
    }  # fmt: skip
    return slimmable(plain, tuple(width_range), input_size=tuple(input_size), arch=arch,
                     fixed_outputs=convert.fixed_outputs, ratio_ties=convert.ratio_ties,
                     divisor=convert.divisor, slim_outputs=convert.slim_outputs,
                     input_averaging=convert.input_averaging)  # fmt: skip


def rebuild(arch: Mapping[str, Any]) -> nn.Module:
    """The model a checkpoint's ``arch`` record describes, freshly built (weights to be loaded):
    a zoo builder and its arguments, or a source model with its conversion options."""
    if "source" not in arch:
        return create_model(arch["name"], **arch["kwargs"])
    try:
        spec = ModelSpec(str(arch["source"]), str(arch["name"]), dict(arch.get("kwargs") or {}))
        if spec.source not in SOURCES:
            raise UsnetValueError(f"unknown model source {spec.source!r}")
        return build_model(
            spec, num_classes=int(arch["num_classes"]), in_channels=int(arch["in_channels"]),
            input_size=[int(s) for s in arch["input_size"]],
            width_range=[float(w) for w in arch["width_range"]],
            convert=ConvertOptions.from_dict(arch.get("convert")),
        )  # fmt: skip
    except KeyError as err:
        raise UsnetValueError(f"the checkpoint's model record lacks {err}") from None
