"""Training configuration: typed dataclasses, loaded from YAML and validated strictly.

An unknown key or a value of the wrong type is an error naming the key and what would be valid:
the reference implementation trained without in-place distillation for a misspelled key, silently.
``--set key=value`` overrides use dotted keys (``data.limit_train=3000``) and YAML syntax for
values (``width_range=[0.25,1.0]``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..channels import parse_widths
from ..device import check_device_name
from ..errors import ConfigError
from .distill import DISTILL_LABEL_WEIGHT
from .recipe import SCHEDULE, WEIGHT_DECAY


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "imagefolder", "cifar10", "cifar100"] = "fashion_mnist"
    root: str | None = None  # default: Debian's Fashion-MNIST directory; required for imagefolder
    limit_train: int | None = None  # use only the first N training images (quick runs)
    limit_test: int | None = None  # evaluate on the first N test images only
    # Hold N training images (after limit_train) out as a validation set, drawn with val_seed, and
    # score on them instead of the test set (choose recipes there; report the test set once).
    val_split: int = 0
    val_seed: int = 0
    image_size: int = 224  # imagefolder: train crop / eval center crop
    augment: bool = False  # fashion_mnist/cifar: random crop (pad 2/4) + horizontal flip
    num_workers: int = 0


@dataclass
class EvalConfig:
    widths: str = "0.25:1.0:0.025"  # start:stop:step or a comma-separated list
    batch_size: int = 1000
    every_epoch: bool = True  # validate the narrowest and widest widths after each epoch
    epoch_calib_images: int = 1024  # sample for the per-epoch validation's calibration


@dataclass
class CalibConfig:
    num_images: int = 1024
    batch_size: int = 128


@dataclass
class ConvertConfig:
    """The converter's options (``usnet.slimmable``) for a model converted on the fly
    (``model: torchvision:NAME``, ``timm:NAME``, ``package.module:callable``)."""

    fixed_outputs: list[str] = field(default_factory=list)  # layers whose outputs never slim
    ratio_ties: list[str] = field(default_factory=list)  # layers following their input at a ratio
    divisor: int = 8  # active channel counts are multiples of this
    slim_outputs: bool = False  # let the model's outputs slim (a backbone)
    input_averaging: bool = False  # scale outputs by full/active fan-in


@dataclass
class InitConfig:
    """Start from a trained model (``usnet.warm_start``) instead of random weights."""

    checkpoint: str | None = None  # a usnet checkpoint, or a plain state_dict file of the model
    # usnet.reorder_channels
    reorder: Literal["none", "l1", "bn", "taylor", "activation", "reconstruction"] = "none"
    num_images: int = 512  # training images scored by reorder=taylor|activation|reconstruction


@dataclass
class TrainConfig:
    # a zoo model (us_convnet), torchvision:NAME, timm:NAME or package.module:callable
    model: str = "us_convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    convert: ConvertConfig = field(default_factory=ConvertConfig)  # for models converted on the fly
    width_range: list[float] = field(default_factory=lambda: [0.25, 1.0])
    mode: Literal["universal", "individual", "slimmable"] = "universal"
    width: float | None = None  # mode=individual: the one width trained
    widths: list[float] | None = None  # mode=slimmable: the fixed widths trained every step
    # The recipe chosen with benchmarks/paper_claims.py on short schedules (docs/benchmarks.md); the
    # ImageNet configs spell out the paper's (n=4, pure distillation) instead.
    num_widths: int = 5  # sandwich rule: widest + narrowest + (n-2) random
    sandwich_ends: Literal["both", "max", "min", "none"] = (
        "both"  # ends trained every step (ablation)
    )
    inplace_distill: bool = True
    distill_temperature: float = 1.0
    distill_label_weight: float = (
        DISTILL_LABEL_WEIGHT  # narrower widths: (1-λ)·distillation + λ·labels
    )
    distill_warmup_epochs: float = 0.0  # λ falls linearly from 1 to distill_label_weight over these
    label_smoothing: float = 0.0
    epochs: int = 4
    # The global batch: under torchrun each of N processes trains on batch_size / N images per
    # step, so a config means the same optimization on any number of GPUs. lr belongs to it:
    # when changing batch_size, scale lr linearly (Goyal et al. 2017: lr = 0.1 * batch_size / 256).
    batch_size: int = 128
    lr: float = 0.1
    lr_schedule: Literal["linear", "cosine"] = SCHEDULE
    warmup_epochs: float = 0.0
    # sgd: the paper's SGD with (Nesterov) momentum; adamw: AdamW with betas, the usual vision
    # transformer recipe. momentum/nesterov belong to sgd and betas to adamw: a value changed from
    # its default for the other optimizer is an error (it would be silently unused).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = WEIGHT_DECAY  # conv/linear weights only (usnet.train.recipe.param_groups)
    amp: Literal["none", "bf16", "fp16"] = "none"
    # CUDA: cuDNN autotuning, with every channel configuration tuned before the first step (a
    # random width then never re-tunes mid-training). On the CPU only the warm-up runs.
    cudnn_benchmark: bool = False
    channels_last: bool = False
    sync_bn: bool = False  # torchrun: BN statistics over the global batch (small per-GPU batches)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 50  # steps between metrics.jsonl training records
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    init: InitConfig = field(default_factory=InitConfig)
    # init: every width, the widest included, also distils from the frozen init model
    teacher: Literal["none", "init"] = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trained_widths_description(self) -> str:
        if self.mode == "individual":
            return f"individual network at width {self.width}"
        if self.mode == "slimmable":
            return f"slimmable network at widths {self.widths}"
        return f"universally slimmable over {self.width_range}, n={self.num_widths}"


# --- loading ---------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config {str(path)!r} is a directory; give a YAML file such as "
                              "configs/fashion_mnist.yaml")  # fmt: skip
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{str(path)!r} is not valid YAML: {str(err).splitlines()[0]}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of config keys")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"invalid override {item!r}; expected key=value, e.g. epochs=1")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"invalid override {item!r}; expected key=value, e.g. epochs=1")
    if re.fullmatch(r"[\d.]+(:[\d.]+)+", text.strip()):
        return key, text.strip()  # a width spec, not YAML 1.1's base-60 integer
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, raw, "")
    _check_semantics(config)
    return config


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys (``lr``, ``data.limit_train``) whose values differ between two config
    dicts (``TrainConfig.to_dict()`` or saved ones), a key missing on one side included."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += config_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


# A checkpoint written before a field existed lacks its key. Such fields take their default,
# except where the default changed after the field was added: then the value that reproduces
# the behaviour from before the field existed.
_VALUE_BEFORE_FIELD: dict[str, Any] = {"distill_label_weight": 0.0}


def config_from_saved(raw: Mapping[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with (``extra.config``), also one written by an
    earlier usnet with fewer fields."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"saved config must be a mapping, got {raw!r}")
    return config_from_dict(
        {**{k: v for k, v in _VALUE_BEFORE_FIELD.items() if k not in raw}, **raw}
    )


def _build(cls: type, raw: Mapping[str, Any], prefix: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + str(unknown[0])!r}; valid keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".")
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: invalid value {value!r}; valid: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover


def _check_semantics(c: TrainConfig) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")

    for key in ("epochs", "batch_size", "lr", "num_widths", "log_every"):
        positive(key, getattr(c, key))
    positive("calib.num_images", c.calib.num_images)
    positive("calib.batch_size", c.calib.batch_size)
    positive("eval.batch_size", c.eval.batch_size)
    positive("eval.epoch_calib_images", c.eval.epoch_calib_images)
    positive("data.image_size", c.data.image_size)
    for key in ("limit_train", "limit_test"):
        if getattr(c.data, key) is not None:
            positive(f"data.{key}", getattr(c.data, key))
    if c.data.val_split < 0:
        raise ConfigError(
            f"data.val_split must not be negative (0: no validation split), got {c.data.val_split}"
        )
    if c.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must not be negative, got {c.data.num_workers}")
    if c.num_widths < 2 and c.mode == "universal":
        raise ConfigError(
            f"num_widths must be at least 2 (widest and narrowest), got {c.num_widths}"
        )
    if len(c.width_range) != 2 or not (0 < c.width_range[0] <= c.width_range[1] <= 1.0):
        raise ConfigError(
            f"width_range must be [lo, hi] with 0 < lo <= hi <= 1, got {c.width_range}"
        )
    lo, hi = c.width_range
    if c.mode == "universal" and lo == hi:
        raise ConfigError(
            f"width_range [{lo}, {hi}] leaves nothing to slim in mode=universal; use a range with "
            f"lo < hi, or mode=individual width={hi} to train one width"
        )
    if c.mode == "individual":
        if c.width is None or not (lo <= c.width <= hi):
            raise ConfigError(f"mode=individual needs width= in the width range [{lo}, {hi}]")
    if c.mode == "slimmable":
        if not c.widths or any(not (lo <= w <= hi) for w in c.widths):
            raise ConfigError(
                f"mode=slimmable needs widths=[...] inside the width range [{lo}, {hi}]"
            )
    if c.data.name == "imagefolder" and not c.data.root:
        raise ConfigError("data.name=imagefolder needs data.root (a folder with train/ and val/)")
    if not (0.0 <= c.label_smoothing < 1.0):
        raise ConfigError(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    positive("distill_temperature", c.distill_temperature)
    if not (0.0 <= c.distill_label_weight <= 1.0):
        raise ConfigError(f"distill_label_weight must be in [0, 1], got {c.distill_label_weight}")
    if not (0.0 <= c.distill_warmup_epochs <= c.epochs):
        raise ConfigError(
            f"distill_warmup_epochs must be in [0, epochs={c.epochs}], got {c.distill_warmup_epochs}"
        )
    if c.warmup_epochs < 0 or c.weight_decay < 0:
        raise ConfigError("warmup_epochs and weight_decay must not be negative")
    _check_optimizer(c)
    try:
        widths = parse_widths(c.eval.widths)
    except ValueError as err:
        raise ConfigError(f"eval.widths: {err}") from None
    if any(not (0 < w <= 1) for w in widths):
        raise ConfigError(f"eval.widths: widths must lie in (0, 1], got {c.eval.widths!r}")
    positive("init.num_images", c.init.num_images)
    if c.init.checkpoint is None and c.init.reorder != "none":
        raise ConfigError(
            f"init.reorder={c.init.reorder} needs init.checkpoint (a trained model to reorder)"
        )
    if c.teacher == "init" and c.init.checkpoint is None:
        raise ConfigError("teacher=init needs init.checkpoint (the trained model to distil from)")
    check_device_name(c.device)
    _check_model(c)


def _check_model(c: TrainConfig) -> None:
    """The model's name, keyword arguments and conversion options, before any work (no model
    is built here)."""
    from ..models.sources import ConvertOptions, check_model, parse_model

    try:
        convert = ConvertOptions.from_dict(dataclasses.asdict(c.convert))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        check_model(parse_model(c.model, c.model_kwargs), convert)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def _check_optimizer(c: TrainConfig) -> None:
    defaults = TrainConfig()
    if len(c.betas) != 2 or not all(0.0 <= b < 1.0 for b in c.betas):
        raise ConfigError(f"betas must be [beta1, beta2], each in [0, 1), got {c.betas}")
    if c.optimizer == "sgd":
        if c.momentum < 0:
            raise ConfigError(f"momentum must not be negative, got {c.momentum}")
        if c.nesterov and c.momentum == 0:
            raise ConfigError("nesterov=true needs momentum > 0 (or set nesterov=false)")
        if c.betas != defaults.betas:
            raise ConfigError(
                f"betas={c.betas} applies to optimizer=adamw only; with optimizer=sgd set "
                "momentum and nesterov instead (or set optimizer=adamw)"
            )
        return
    unused = [
        f"{key}={getattr(c, key)}"
        for key in ("momentum", "nesterov")
        if getattr(c, key) != getattr(defaults, key)
    ]
    if unused:
        raise ConfigError(
            f"{' and '.join(unused)} applies to optimizer=sgd only; AdamW's momentum terms are "
            f"betas (now {c.betas}), so remove {' and '.join(k.split('=')[0] for k in unused)}"
        )


def load_run_config(payload: Mapping[str, Any]) -> TrainConfig | None:
    """The training config stored in a checkpoint payload (``extra["config"]``), if any."""
    raw = (payload.get("extra") or {}).get("config")
    return None if raw is None else config_from_saved(raw)
