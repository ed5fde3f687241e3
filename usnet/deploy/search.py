"""Non-uniform widths for a MACs budget: a greedy search in the spirit of AutoSlim.

Start from the widest network (every root channel group at the top of the width range). At each
step, try narrowing each group alone by ``step`` of its multiplier (at least down to its next
smaller channel count, never below the range), calibrate BatchNorm for that configuration on a
small calibration sample, and score it on a held-out batch of training images; keep the narrowing
that costs the least (highest held-out top-1, then lowest cross-entropy). Stop as soon as the MACs
fit the budget. The result is a ``{group: multiplier}`` width that ``usnet.set_width``,
``usnet.export`` and ``usnet export --width RESULT.json`` take like any width.

The comparison that matters is with the uniform width of the same budget: :class:`SearchResult`
holds the widest uniform width within ``max_macs`` (what ``usnet.select_width`` picks; channel
rounding makes uniform MACs a staircase, so its MACs may be above or below the result's), scored
the same way. The held-out
batch chose the result, so its held-out score is optimistic: judge both on test data
(``usnet search`` does).

Every candidate is calibrated afresh on the search's sample, the full width and configurations the
model already had statistics for included, so all are scored alike. Afterwards the model's BatchNorm
statistics are restored exactly as they were; the only ones added are those of the result and of
the uniform comparison where the model had none (so both run), and its width is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..calibration import calibrate
from ..channels import ChannelPlan, config_id, config_key
from ..errors import UsnetValueError
from ..evaluation import evaluate
from ..nn import bn_stats
from ..state import check_input_size, get_state, keep_width_and_mode
from .cost import format_count, profile


@dataclass(frozen=True)
class Scored:
    """One width with its cost and held-out score."""

    width: float | dict
    config_id: str
    params: int
    macs: int
    heldout_top1: float
    heldout_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    result: Scored
    uniform: Scored  # the widest uniform width within the same budget
    max_macs: int
    steps: list[dict] = field(default_factory=list)  # each step's narrowing and the ones it beat

    @property
    def width(self) -> dict:
        return self.result.width  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"width": self.result.width, "max_macs": self.max_macs, "result": self.result.to_dict(),
                "uniform": self.uniform.to_dict(), "steps": list(self.steps)}  # fmt: skip


def search_width(
    model: nn.Module,
    calib_images: Sequence[Tensor] | Tensor,
    heldout: tuple[Tensor, Tensor],
    *,
    max_macs: int | float,
    input_size: Sequence[int],
    step: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Greedy non-uniform width of ``model`` within ``max_macs`` (counted per image of
    ``input_size``: its batch dimension is ignored, as in :func:`usnet.select_width`).

    Args:
        calib_images: image batches (or one tensor) for calibrating each candidate's BatchNorm.
        heldout: ``(images, labels)`` that score the candidates.
        step: how much a narrowing lowers one group's multiplier (at least one channel step).
    """
    state = get_state(model)
    plan = state.plan
    lo, hi = plan.width_range
    if isinstance(max_macs, bool) or not isinstance(max_macs, (int, float)) or not max_macs > 0:
        raise UsnetValueError(f"max_macs must be a positive number, got {max_macs!r}")
    if not 0 < step <= hi - lo:
        raise UsnetValueError(f"step must be in (0, {hi - lo:g}] (the width range), got {step!r}")
    batches = [calib_images] if isinstance(calib_images, Tensor) else list(calib_images)
    num_calib = sum(b.shape[0] for b in batches)
    input_size = (1, *check_input_size(input_size)[1:])
    images, labels = heldout
    if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
        raise UsnetValueError(
            "heldout must be (images, labels) with the same positive number of items"
        )
    narrowest = profile(model, lo, input_size).macs
    if narrowest > max_macs:
        raise UsnetValueError(f"no width fits the budget: the narrowest, width {lo:g}, needs "
                         f"{format_count(narrowest)} MACs > {format_count(max_macs)}")  # fmt: skip
    say = log or (lambda message: None)
    saved = bn_stats.snapshot(model)
    cache: dict[tuple[int, ...], Scored] = {}

    def score(width: float | dict) -> Scored:
        config = plan.config(width)
        if config not in cache:
            calibrate(model, batches, [width], num_images=num_calib, progress=False)
            ((top1, _, loss),) = evaluate(model, [(images, labels)], [width], loss=True)
            cost = profile(model, width, input_size)
            cache[config] = Scored(width, config_id(config), cost.params, cost.macs, top1, loss)
        return replace(cache[config], width=width)  # same channels, same network and score

    keep: set[tuple[int, ...]] = set()
    with keep_width_and_mode(model):  # the width, whatever happens
        try:
            current = {name: hi for name in plan.root_names}
            best = score(dict(current))
            steps: list[dict] = []
            say(
                f"start: MACs {format_count(best.macs)}, held-out top-1 {100 * best.heldout_top1:.2f}%"
            )
            while best.macs > max_macs:
                trials = []
                for name in plan.root_names:
                    narrower = _narrow(plan, current, name, step)
                    if narrower is None:
                        continue
                    trial = score({**current, name: narrower})
                    if trial.macs < best.macs:
                        trials.append((name, narrower, trial))
                assert trials, "the narrowest width fits the budget, so some narrowing is left"
                name, narrower, best = max(
                    trials, key=lambda t: (t[2].heldout_top1, -t[2].heldout_loss, -t[2].macs)
                )
                current[name] = narrower
                tried = [{"group": g, "multiplier": m, "macs": t.macs, "heldout_top1": t.heldout_top1,
                          "heldout_loss": t.heldout_loss} for g, m, t in trials]  # fmt: skip
                steps.append({"group": name, "multiplier": narrower, "macs": best.macs,
                              "heldout_top1": best.heldout_top1, "heldout_loss": best.heldout_loss,
                              "tried": tried})  # fmt: skip
                say(f"step {len(steps)}: {name} -> {narrower:g}, MACs {format_count(best.macs)}, "
                    f"held-out top-1 {100 * best.heldout_top1:.2f}%")  # fmt: skip
            from .select import select_width  # the uniform width the same budget allows, exactly

            uniform_width = select_width(model, max_macs=max_macs, input_size=input_size).width
            uniform = score(uniform_width)
            keep = {plan.config(best.width), plan.config(uniform.width)}
        finally:
            keys = {
                None if c == state.full_config else config_key(c) for c in keep
            }  # None: own buffers
            bn_stats.restore(model, saved, keys)
    return SearchResult(best, uniform, int(max_macs), steps)


def search_data(dataset: Dataset, calib_images: int, heldout_images: int, seed: int = 0,
                batch_size: int = 128) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:  # fmt: skip
    """One seeded draw of ``calib_images + heldout_images`` training images: the first part,
    in batches, calibrates BatchNorm; the rest (images, labels) scores the candidates."""
    for name, value in (("calib_images", calib_images), ("heldout_images", heldout_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsnetValueError(f"--{name.replace('_', '-')} must be a positive number of images")
    need = calib_images + heldout_images
    if need > len(dataset):
        raise UsnetValueError(f"--calib-images + --heldout-images ({need}) exceed the {len(dataset)} "
                              "training images")  # fmt: skip
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[
        :need
    ].tolist()
    images, labels = zip(*(dataset[i] for i in order))
    images, labels = torch.stack(images), torch.as_tensor(labels)
    calib = list(images[:calib_images].split(batch_size))
    return calib, (images[calib_images:], labels[calib_images:])


def _narrow(
    plan: ChannelPlan, current: Mapping[str, float], name: str, step: float
) -> float | None:
    """``current[name]`` lowered by ``step``, or further to its next smaller channel count."""
    lo = plan.width_range[0]
    now = current[name]
    channels = plan.channels(current)[name]
    candidate = max(lo, round(now - step, 6))
    while True:
        if plan.channels({**current, name: candidate})[name] < channels:
            return candidate
        if candidate <= lo:
            return None
        candidate = max(lo, round(candidate - 0.001, 6))


def format_search(result: SearchResult, test: Mapping[str, float] | None = None) -> str:
    """Result against the uniform width of the same budget (and test top-1 if given)."""
    lines = [
        f"{'':>9} {'width':<34} {'params':>8} {'MACs':>8} {'held-out':>9}"
        + (f" {'test':>7}" if test else "")
    ]
    for label, s in (("searched", result.result), ("uniform", result.uniform)):
        width = (
            s.width if isinstance(s.width, float) else ", ".join(f"{v:g}" for v in s.width.values())
        )
        width = width if isinstance(width, str) else f"{width:g}"
        if len(width) > 34:
            width = width[:31] + "..."
        row = (f"{label:>9} {width:<34} {format_count(s.params):>8} {format_count(s.macs):>8} "
               f"{100 * s.heldout_top1:>8.2f}%")  # fmt: skip
        if test:
            row += f" {100 * test[label]:>6.2f}%"
        lines.append(row)
    lines.append(
        f"budget: {format_count(result.max_macs)} MACs; {len(result.steps)} narrowing steps"
    )
    return "\n".join(lines)
