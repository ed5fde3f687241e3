"""What several commands share: reading the model or checkpoint a command names, its data and
input size, and recognizing a command's own earlier outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

from ..errors import UsnetError, UsnetValueError
from ..models import model_input_size


def load_model_arg(spec: str, num_classes: int | None = None, in_channels: int | None = None,
                   small_input: bool = False) -> nn.Module:  # fmt: skip
    """A checkpoint path written by ``usnet.save``, or a zoo model name (an existing file of
    that name wins, as in every command)."""
    from .. import checkpoint, models

    if Path(spec).is_file():
        return checkpoint.load(spec)
    if spec in models.list_models():
        kwargs = {"small_input": small_input}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        return models.create_model(spec, **kwargs)
    raise UsnetValueError(
        f"{spec!r} is neither a zoo model ({', '.join(models.list_models())}) nor a checkpoint file"
    )


def distinct_widths_for(model: nn.Module, widths: list, doing: str) -> list:
    """One width per distinct channel configuration (the others are the same network), saying
    so when that drops any."""
    from ..channels import distinct_widths
    from ..state import get_state

    plan = get_state(model).plan
    distinct = distinct_widths(plan, [plan.check_width(w) for w in widths])
    if len(distinct) < len(widths):
        print(f"{len(widths)} widths give {len(distinct)} distinct channel configurations; "
              f"{doing} each once", file=sys.stderr)  # fmt: skip
    return distinct


def check_data_fits(model: nn.Module, info, source: str, dataset: str) -> None:
    """Refuse data whose image channels or classes differ from the model's, naming both (else
    torch fails mid-run with a shape error, or accuracy is computed against the wrong labels)."""
    from ..errors import DataError

    channels, classes = model_io(model, info.input_size)
    if channels != info.in_channels:
        raise DataError(
            f"{source} takes {channels}-channel images but the {dataset} data has "
            f"{info.in_channels}-channel images; use the dataset it was trained on (--dataset, --data)"
        )
    if classes != info.num_classes:
        raise DataError(
            f"{source} has {classes} classes but the {dataset} data has {info.num_classes}; use "
            "the dataset it was trained on (--dataset, --data)"
        )


def model_io(model: nn.Module, input_size) -> tuple[int, int]:
    """(input channels, classes) of a slimmable classifier: from its zoo architecture record and
    build arguments, else from one forward pass of its plain export on a zero image."""
    import torch

    from ..deploy.plain import export
    from ..state import get_state

    state = get_state(model)
    channels = model_input_size(model)[1]
    classes = (state.arch or {}).get("kwargs", {}).get("num_classes")
    if classes is None:
        plain = export(model, state.width_range[1], require_stats=False)
        ref = next(plain.parameters())
        with torch.no_grad():
            out = plain.eval()(
                torch.zeros((1, channels, *input_size[2:]), dtype=ref.dtype, device=ref.device)
            )
        classes = out.shape[-1]
    return int(channels), int(classes)


def data_for(model_path: str, payload: dict, data_root: str | None, dataset: str | None):
    from ..train.config import TrainConfig, load_run_config
    from ..train.data import datasets_for

    config = load_run_config(payload)
    if config is None:
        if dataset is None:
            raise UsnetValueError(
                f"{model_path!r} records no training config: pass --dataset and --data"
            )
        config = TrainConfig()
    if dataset is not None:
        config.data.name = dataset
    if data_root is not None:
        config.data.root = data_root
    # The commands score on the test set, also for a run that held out a validation split.
    config.data.val_split = 0
    return config, datasets_for(config)


def spectrum_widths(payload: dict, model: nn.Module) -> list[float]:
    from ..state import get_state

    spectrum = payload.get("extra", {}).get("spectrum")
    if spectrum:
        return [float(r["width"]) for r in spectrum]
    lo, hi = get_state(model).width_range
    return sorted({lo, hi})


def same_file(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(a).samefile(b)
    except OSError:
        return False


def calibration_of(payload: dict):
    """Recognizes a checkpoint holding exactly ``payload``'s weights (an earlier calibration or
    search of the same model: only its BN statistics differ)."""

    def own(path: Path) -> str | None:
        import torch

        from .. import checkpoint

        try:
            other = checkpoint.read_checkpoint(path)
        except (UsnetError, OSError):
            return None
        mine, theirs = payload["state_dict"], other["state_dict"]
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return None
        return "an earlier checkpoint of the same weights"

    return own


def load_checkpoint_arg(spec: str) -> tuple[nn.Module, dict]:
    """A checkpoint (with its payload: spectrum, run config) or a zoo model name (empty payload),
    resolved as :func:`load_model_arg` does."""
    from .. import checkpoint

    if Path(spec).is_file():
        payload = checkpoint.read_checkpoint(spec)
        return checkpoint.model_from_checkpoint(payload, spec), payload
    return load_model_arg(spec), {}


def export_in(format: str):
    """Recognizes an artifact of ``format`` (an earlier ``usnet export``): its runtime loads it."""

    def own(path: Path) -> str | None:
        import zipfile

        from ..deploy.load import load_artifact

        if format in ("pt", "torchscript") and not zipfile.is_zipfile(path):
            return None  # both are zip archives (and torch logs a warning loading anything else)
        try:
            load_artifact(path, format)
        except Exception:  # noqa: BLE001 (any failure to load: not such an artifact)
            return None
        return f"an earlier {format} export"

    return own


def search_result(path: Path) -> str | None:
    """Recognizes a result file of ``usnet search --out``."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and "width" in report and "test_top1" in report:
        return "an earlier usnet search result"
    return None


def calibrate_missing(model: nn.Module, payload: dict, widths: list, args) -> None:
    """``usnet export``: calibrate the widths among ``widths`` the checkpoint has no BN
    statistics for, on ``--data``/``--dataset`` (``--calib-images``), or refuse naming one."""
    from ..calibration import calibrate, is_calibrated
    from ..channels import format_width

    missing = [w for w in widths if not is_calibrated(model, w)]
    if not missing:
        return
    if args.data is None and args.dataset is None:
        raise UsnetValueError(
            f"width {format_width(missing[0])} is not calibrated in {args.checkpoint}; pass "
            "--data ROOT to calibrate it first (or run usnet calibrate)"
        )
    config, (_, calib_set, _, info) = data_for(args.checkpoint, payload, args.data, args.dataset)
    check_data_fits(model, info, args.checkpoint, config.data.name)
    print(f"calibrating {len(missing)} widths on {args.calib_images} training images")
    calibrate(model, calib_set, missing, num_images=args.calib_images, seed=config.seed,
              batch_size=config.calib.batch_size)  # fmt: skip
