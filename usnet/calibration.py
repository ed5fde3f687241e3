"""BatchNorm calibration: fresh running statistics per width from a small sample of training images.

A US-Net trains with batch statistics only; before evaluating a width, its BatchNorm layers need
running statistics *of that width*. :func:`calibrate` draws one random sample (``num_images``,
deterministic for a seed), loads it once, and for each requested width resets the statistics and
accumulates the cumulative average over the sample (momentum ``1/t``, PyTorch's ``momentum=None``),
under ``no_grad`` with every weight untouched. It uses its own settings, never the layers'
``momentum``/``training`` flags (the reference implementation's calibration silently updated nothing
because it relied on them).

Models without such statistics (LayerNorm and GroupNorm normalize with the statistics of each
input: transformers, ConvNeXt-style and GroupNorm networks) need no calibration:
:func:`needs_calibration` says so, :func:`calibrate` is then a no-op that loads no images, and
:func:`is_calibrated` holds at every width.
"""

from __future__ import annotations

import logging
import numbers
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .channels import Width, config_key
from .errors import UsnetTypeError, UsnetValueError
from .nn.norm import SlimmableBatchNorm2d
from .progress import progress_bar
from .state import get_state, keep_width_and_mode, set_width
from .state import width as width_context

DEFAULT_BATCH_SIZE = 128

logger = logging.getLogger(__name__)


def _statistics_layers(model: nn.Module) -> list[SlimmableBatchNorm2d]:
    """The layers holding running statistics per width: slimmable BatchNorm (and subclasses)
    tracking running statistics. Every other layer normalizes with the statistics of its input."""
    return [
        m for m in model.modules() if isinstance(m, SlimmableBatchNorm2d) and m.track_running_stats
    ]


def needs_calibration(model: nn.Module) -> bool:
    """Whether ``model`` has layers with per-width running statistics (slimmable BatchNorm),
    which :func:`calibrate` must fill before a width is evaluated. False for a model normalized
    only by LayerNorm, GroupNorm or BatchNorm without running statistics: every width of it is
    ready as trained."""
    return bool(_statistics_layers(model))


def sample_images(
    data: Any,
    num_images: int = 1024,
    seed: int = 0,
    batch_size: int | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
) -> list[Tensor]:
    """Draw ``num_images`` images from ``data`` as a list of batches.

    ``data`` may be a DataLoader or Dataset with random access (a random sample without
    replacement, drawn with ``seed``; a DataLoader's workers, collate function and batch size are
    reused), or any iterable of batches (image tensors or ``(images, ...)`` tuples), of which the
    first ``num_images`` images are taken.

    ``shard=(rank, world_size)``: this rank's share of every batch, the images ``rank``,
    ``rank + world_size``, ... of it (random-access data loads only those), so the shares of all
    ranks make up exactly the batches one process would draw. Every rank gets the same number of
    batches; a share can be empty (a ``(0, C, H, W)`` tensor).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UsnetValueError(f"num_images must be a positive integer, got {num_images!r}")
    rank, world = shard
    if not 0 <= rank < world:
        raise UsnetValueError(
            f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}"
        )
    if isinstance(data, DataLoader) and _random_access(data.dataset):
        dataset, bs = data.dataset, batch_size or data.batch_size or DEFAULT_BATCH_SIZE
        loader_kwargs = dict(num_workers=data.num_workers, collate_fn=data.collate_fn,
                             pin_memory=data.pin_memory)  # fmt: skip
    elif isinstance(data, Dataset) and _random_access(data):
        dataset, bs, loader_kwargs = data, batch_size or DEFAULT_BATCH_SIZE, {}
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise UsnetTypeError(
            "calibration data must be a DataLoader, a Dataset, or an iterable of batches "
            f"(image tensors or (images, labels) tuples), got {type(data).__name__}"
        )
    else:
        return _shares(_first_images(data, num_images, batch_size), rank, world)
    indices = _draw(len(dataset), num_images, seed)
    if len(indices) < num_images:
        warnings.warn(f"calibration data holds only {len(indices)} images (asked for {num_images})")
    _check_shardable(min(len(indices), bs), world)
    shares = [indices[i : i + bs][rank::world] for i in range(0, len(indices), bs)]
    loader = DataLoader(dataset, batch_sampler=[s for s in shares if s], **loader_kwargs)
    loaded = iter([_images_of(batch) for batch in loader])
    return _fill_empty([next(loaded) if s else None for s in shares])


def _first_images(data: Iterable, num_images: int, batch_size: int | None) -> list[Tensor]:
    """The first ``num_images`` images of an iterable of batches (re-batched if asked)."""
    batches: list[Tensor] = []
    taken = 0
    for batch in data:
        images = _images_of(batch)[: num_images - taken]
        if images.shape[0] == 0:
            continue  # an empty batch of the user's iterable
        batches.append(images)
        taken += images.shape[0]
        if taken >= num_images:
            break
    if taken == 0:
        raise UsnetValueError("calibration data yielded no images")
    if taken < num_images:
        warnings.warn(f"calibration data holds only {taken} images (asked for {num_images})")
    if batch_size is not None:
        batches = list(torch.cat(batches).split(batch_size))
    return batches


def _shares(batches: list[Tensor], rank: int, world: int) -> list[Tensor]:
    if world == 1:
        return batches
    _check_shardable(max(b.shape[0] for b in batches), world)
    return _fill_empty([b[rank::world] if b.shape[0] > rank else None for b in batches])


def _check_shardable(largest_batch: int, world: int) -> None:
    # Every rank evaluates this on the same numbers, so all raise together: a rank whose share
    # were empty in every batch would fail alone and leave the others waiting in a collective.
    if largest_batch < world:
        raise UsnetValueError(
            f"distributed calibration over {world} ranks needs batches of at least {world} images "
            f"(every rank calibrates on its share of each batch), got at most {largest_batch}; "
            "raise the calibration batch size and number of images"
        )


def _fill_empty(batches: list[Tensor | None]) -> list[Tensor]:
    """Empty shares as ``(0, C, H, W)`` tensors shaped like this rank's other images (there is
    one: :func:`_check_shardable` passed)."""
    like = next(b for b in batches if b is not None)
    return [like[:0] if b is None else b for b in batches]


def calibrate(
    model: nn.Module,
    data: Any,
    widths: Sequence[Width] | Width,
    num_images: int = 1024,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    distributed: bool = False,
) -> list[str]:
    """Calibrate the BatchNorm statistics of ``model`` at each of ``widths``.

    Widths that round to the same channel configuration are one network and are calibrated once.
    Returns the configuration keys calibrated. The model's width and train/eval mode are restored.

    A model without BatchNorm statistics (:func:`needs_calibration` is False: LayerNorm,
    GroupNorm) has nothing to calibrate: the widths are still checked, then nothing is loaded from
    ``data``, nothing changes, an info line goes to this module's logger and the result is ``[]``.

    ``distributed=True`` (inside a ``torch.distributed`` process group; every rank calls it with
    the same arguments): each rank loads and runs only its share of every calibration batch
    (:func:`sample_images` ``shard``), and every BatchNorm layer combines the shares' statistics
    across ranks (count, mean and variance; :func:`usnet.distributed.global_batch_stats`), so
    every rank ends with the statistics a single process computes on the whole sample, up to
    float rounding, for ``1 / world_size`` of the work. Outside a process group it is ignored.
    """
    state = get_state(model)
    if isinstance(widths, (numbers.Real, Mapping)):
        widths = [widths]  # type: ignore[list-item]
    widths = [state.plan.check_width(w) for w in widths]  # validate all before changing anything
    if not widths:
        raise UsnetValueError("calibrate needs at least one width")
    by_config: dict[tuple[int, ...], Width] = {}
    for w in widths:
        by_config.setdefault(state.plan.config(w), w)
    # Layers without running statistics always normalize with batch statistics: nothing to do.
    bns = _statistics_layers(model)
    if not bns:
        logger.info("no BatchNorm layers with running statistics: calibration not needed")
        return []
    from .process_group import rank, world_size

    param = next(model.parameters())
    shard = (rank(), world_size()) if distributed else (0, 1)
    batches = sample_images(data, num_images, seed, batch_size, shard=shard)
    total = len(by_config) * len(batches)
    show = progress if progress is not None else (total > 50 and sys.stderr.isatty())
    bar = progress_bar(total, show)
    # Eval mode: dropout and friends off; the BN layers calibrate regardless of this flag.
    with keep_width_and_mode(model, training=False):
        try:
            with torch.no_grad():
                for config, w in by_config.items():
                    set_width(model, w)
                    for bn in bns:
                        bn.start_calibration(distributed=shard[1] > 1)
                    for images in batches:
                        model(images.to(device=param.device, dtype=param.dtype, non_blocking=True))
                        bar.update(1)
                    idle = [bn for bn in bns if bn.calibration_batches == 0]
                    for bn in bns:
                        if bn not in idle:
                            bn.finish_calibration()
                    if idle:
                        _calibrate_training_branches(model, idle, batches, param)
        finally:
            for bn in bns:  # before the width is restored: no width changes while calibrating
                bn.cancel_calibration()
            bar.close()
    return [config_key(c) for c in by_config]


def _calibrate_training_branches(model: nn.Module, idle: list, batches: list, param) -> None:
    """BatchNorm layers that eval mode never reaches (auxiliary heads, which models run in
    training mode only) take their statistics from the same batches run in training mode: every
    other BatchNorm normalizes with batch statistics there, as it did while calibrating."""
    model.train()
    try:
        for images in batches:
            model(images.to(device=param.device, dtype=param.dtype, non_blocking=True))
    finally:
        model.eval()
    for bn in idle:
        bn.finish_calibration()  # still no batch: the layer is unused, and that is an error


def is_calibrated(model: nn.Module, width: Width) -> bool:
    """Whether every BatchNorm layer has statistics for ``width`` (always, for a model without
    BatchNorm statistics: see :func:`needs_calibration`)."""
    with width_context(model, width):
        return all(m.current_stats() is not None for m in _statistics_layers(model))


def _random_access(dataset: Any) -> bool:
    return (
        not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )


def _draw(length: int, num_images: int, seed: int) -> list[int]:
    if length == 0:
        raise UsnetValueError("calibration dataset is empty")
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
        raise UsnetTypeError(
            "calibration batches must be image tensors, (images, labels) tuples or "
            f"{{'image': tensor}} dicts, got {type(batch).__name__}"
        )
    if images.dim() != 4:
        raise UsnetValueError(
            f"calibration images must be (N, C, H, W), got shape {tuple(images.shape)}"
        )
    return images
