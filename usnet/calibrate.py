"""BatchNorm calibration: fresh running statistics per width from a small sample of training images.

A US-Net trains with batch statistics only; before evaluating a width, its BatchNorm layers need
running statistics *of that width*. :func:`calibrate` draws one random sample (``num_images``,
deterministic for a seed), loads it once, and for each requested width resets the statistics and
accumulates the cumulative average over the sample (momentum ``1/t``, PyTorch's ``momentum=None``),
under ``no_grad`` with every weight untouched. It uses its own settings, never the layers'
``momentum``/``training`` flags (the reference implementation's calibration silently updated nothing
because it relied on them).
"""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .channels import Width, config_key
from .layers import SlimmableBatchNorm2d
from .state import get_state, set_width
from .state import width as width_context

DEFAULT_BATCH_SIZE = 128


def sample_images(
    data: Any, num_images: int = 1024, seed: int = 0, batch_size: int | None = None
) -> list[Tensor]:
    """Draw ``num_images`` images from ``data`` as a list of batches.

    ``data`` may be a DataLoader or Dataset with random access (a random sample without
    replacement, drawn with ``seed``; a DataLoader's workers, collate function and batch size are
    reused), or any iterable of batches (image tensors or ``(images, ...)`` tuples), of which the
    first ``num_images`` images are taken.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    loader: Iterable
    if isinstance(data, DataLoader) and _random_access(data.dataset):
        dataset = data.dataset
        indices = _draw(len(dataset), num_images, seed)
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=batch_size or data.batch_size or DEFAULT_BATCH_SIZE,
            shuffle=False,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
        )
    elif isinstance(data, Dataset) and _random_access(data):
        indices = _draw(len(data), num_images, seed)
        loader = DataLoader(Subset(data, indices), batch_size=batch_size or DEFAULT_BATCH_SIZE)
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "calibration data must be a DataLoader, a Dataset, or an iterable of batches "
            f"(image tensors or (images, labels) tuples), got {type(data).__name__}"
        )
    else:
        loader = data
    batches: list[Tensor] = []
    taken = 0
    for batch in loader:
        images = _images_of(batch)
        images = images[: num_images - taken]
        batches.append(images)
        taken += images.shape[0]
        if taken >= num_images:
            break
    if taken == 0:
        raise ValueError("calibration data yielded no images")
    if taken < num_images:
        warnings.warn(f"calibration data holds only {taken} images (asked for {num_images})")
    if batch_size is not None and loader is data:  # re-batch a plain iterable as asked
        batches = list(torch.cat(batches).split(batch_size))
    return batches


def calibrate(
    model: nn.Module,
    data: Any,
    widths: Sequence[Width] | Width,
    num_images: int = 1024,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> list[str]:
    """Calibrate the BatchNorm statistics of ``model`` at each of ``widths``.

    Widths that round to the same channel configuration are one network and are calibrated once.
    Returns the configuration keys calibrated. The model's width and train/eval mode are restored.
    """
    state = get_state(model)
    if isinstance(widths, (numbers.Real, Mapping)):
        widths = [widths]  # type: ignore[list-item]
    widths = [state.plan.check_width(w) for w in widths]  # validate all before changing anything
    if not widths:
        raise ValueError("calibrate needs at least one width")
    by_config: dict[tuple[int, ...], Width] = {}
    for w in widths:
        by_config.setdefault(state.plan.config(w), w)
    # Layers without running statistics always normalize with batch statistics: nothing to do.
    bns = [m for m in model.modules() if isinstance(m, SlimmableBatchNorm2d) and m.track_running_stats]
    if not bns:
        return [config_key(c) for c in by_config]
    param = next(model.parameters())
    batches = sample_images(data, num_images, seed, batch_size)
    total = len(by_config) * len(batches)
    show = progress if progress is not None else (total > 50 and sys.stderr.isatty())
    bar = _progress(total, show)
    previous_width, was_training = state.width, model.training
    model.eval()  # dropout and friends off; the BN layers calibrate regardless of this flag
    try:
        with torch.no_grad():
            for config, w in by_config.items():
                set_width(model, w)
                for bn in bns:
                    bn.start_calibration()
                for images in batches:
                    model(images.to(device=param.device, dtype=param.dtype, non_blocking=True))
                    if bar is not None:
                        bar.update(1)
                for bn in bns:
                    bn.finish_calibration()
    finally:
        for bn in bns:
            bn.cancel_calibration()
        if bar is not None:
            bar.close()
        set_width(model, previous_width)
        model.train(was_training)
    return [config_key(c) for c in by_config]


def is_calibrated(model: nn.Module, width: Width) -> bool:
    """Whether every BatchNorm layer has statistics for ``width``."""
    with width_context(model, width):
        return all(
            m.current_stats() is not None
            for m in model.modules()
            if isinstance(m, SlimmableBatchNorm2d) and m.track_running_stats
        )


def _random_access(dataset: Any) -> bool:
    return (
        not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


def _draw(length: int, num_images: int, seed: int) -> list[int]:
    if length == 0:
        raise ValueError("calibration dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=generator)[:num_images].tolist()


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        images = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
    elif isinstance(batch, dict) and isinstance(batch.get("image"), Tensor):
        images = batch["image"]
    else:
        raise TypeError(
            "calibration batches must be image tensors, (images, labels) tuples or "
            f"{{'image': tensor}} dicts, got {type(batch).__name__}"
        )
    if images.dim() != 4:
        raise ValueError(f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def _progress(total: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="batch", leave=False)
