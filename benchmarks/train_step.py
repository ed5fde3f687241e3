"""One sandwich-rule training step against its physical limit, measured side by side in one run.

*slimmable*: :func:`usnet.train.sandwich.sandwich_step` on a zoo model (n=4 widths, in-place distillation,
one SGD step). *limit*: the same widths as separate plain networks of exactly those shapes
(``usnet.export`` at each width, BatchNorm on batch statistics like the slimmable one), the same
batch, the same loss (the widest width's detached softmax teaches the others), and **one** SGD
optimizer over all of them, stepped once (two parameter groups, decay and no decay, like the
slimmable model's: the same number of optimizer kernels on both sides; separate optimizers per
network would charge the limit one extra optimizer launch sequence per width). The ratio
slimmable / limit is what slimmability costs.

Variants: ``fixed`` widths (the issue's 1.0, 0.35, 0.6, 0.8 for US-MobileNetV2; the range's top,
bottom and two widths between for other models) or ``random`` widths (a seeded
:class:`~usnet.train.samplers.WidthSampler`; both sides see the same draws); ``fp32`` eager,
``bf16_cl`` (bf16 autocast + channels_last), and on CUDA the same with
``torch.backends.cudnn.benchmark`` on (``+bench``). Random widths warm every distinct channel
configuration they will draw first (:func:`usnet.train.sandwich.warm_up_widths`; the plain networks
are warmed too), so the steady state is measured; the warm-up time is printed. Rounds alternate
the order (slimmable first, then limit first, ...).

``--memory``: peak memory of one sandwich step against one step of the widest width alone
(see ``PeakMemory`` in ``_common.py`` for the method). ``--compile``: the sandwich step on
``torch.compile(model)`` (one graph per channel configuration, bounded by the number of distinct
configurations the widths can take; the count is printed) against the compiled limit (each plain
network compiled) and the eager limit.

Usage::

    python benchmarks/train_step.py --size cpu                 # about a minute on 2 CPU cores
    python benchmarks/train_step.py --size gpu --device cuda   # the issue's H100 size
    python benchmarks/train_step.py --size cpu --memory
    python benchmarks/train_step.py --size cpu --compile       # slow on CPU: inductor builds
    python benchmarks/train_step.py --size cpu --model vit     # the Fashion-MNIST US-ViT
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from _common import PeakMemory, add_common_args, header, resolve_device, sync, table
from torch import nn

import usnet
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.recipe import make_optimizer
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import sandwich_step, warm_up_widths


@dataclass
class Size:
    model: str
    model_kwargs: dict
    batch: int
    image: int
    steps: int
    rounds: int
    variants: tuple[str, ...]
    compile_model: str
    compile_kwargs: dict
    compile_batch: int
    compile_image: int


SIZES = {
    # 2 CPU cores: US-MobileNetV2 on 64 px images (the 224 px layout, 10 classes), batch 32.
    "cpu": Size("us_mobilenet_v2", {"num_classes": 10, "dropout": 0.0}, 32, 64, 3, 4,
                ("fp32", "bf16_cl"), "us_convnet", {}, 64, 28),
    # The H100 size: US-MobileNetV2, 1000 classes, batch 256, 224 px.
    "gpu": Size("us_mobilenet_v2", {"num_classes": 1000, "dropout": 0.0}, 256, 224, 8, 3,
                ("fp32", "bf16_cl", "fp32+bench", "bf16_cl+bench"), "us_mobilenet_v2",
                {"num_classes": 1000, "dropout": 0.0}, 256, 224),
}  # fmt: skip

# --model vit: the Fashion-MNIST US-ViT of configs/fashion_mnist_vit.yaml on the CPU (batch 128,
# 28 px); US-ViT-Small on 224 px ImageNet-size images on a GPU.
FASHION_VIT = {"num_classes": 10, "in_channels": 1, "small_input": True, "image_size": 28,
               "hidden_dim": 96, "num_heads": 6, "mlp_dim": 192, "num_layers": 6}  # fmt: skip
VIT_SIZES = {
    "cpu": Size("us_vit", FASHION_VIT, 128, 28, 3, 4, ("fp32", "bf16_cl"), "us_vit",
                FASHION_VIT, 128, 28),
    "gpu": Size("us_vit_small", {"num_classes": 1000}, 256, 224, 8, 3,
                ("fp32", "bf16_cl", "fp32+bench", "bf16_cl+bench"), "us_vit_small",
                {"num_classes": 1000}, 256, 224),
}  # fmt: skip


@dataclass
class Variant:
    channels_last: bool
    autocast: torch.dtype | None
    cudnn_benchmark: bool

    @classmethod
    def parse(cls, name: str) -> "Variant":
        base, _, bench = name.partition("+")
        if base not in ("fp32", "bf16_cl") or bench not in ("", "bench"):
            raise SystemExit(f"train_step: error: unknown variant {name!r}")
        bf16 = base == "bf16_cl"
        return cls(bf16, torch.bfloat16 if bf16 else None, bench == "bench")


def fixed_widths(model: nn.Module) -> list[float]:
    lo, hi = usnet.channel_plan(model).width_range
    if (lo, hi) == (0.35, 1.0):
        return [1.0, 0.35, 0.6, 0.8]  # the widths
    return [hi, lo, round(lo + (hi - lo) / 3, 3), round(lo + 2 * (hi - lo) / 3, 3)]


def build(size_model: str, kwargs: dict, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = usnet.models.create_model(size_model, **kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def batch_for(model: nn.Module, batch: int, image: int, device, channels_last: bool):
    """A fixed random batch of the model's input channels and classes."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, first.in_channels, image, image, generator=g).to(device)
    labels = torch.randint(0, head.out_features, (batch,), generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


class Limit:
    """The same widths as separate plain networks: one exported model per channel configuration,
    all stepped by one optimizer (parameters of networks not in a step have no gradient and are
    skipped, as the slimmable model's inactive channels get zero gradient)."""

    def __init__(self, model: nn.Module, channels_last: bool, compile: bool = False):
        self.model = model
        self.channels_last = channels_last
        self.compile = compile
        self.plan = usnet.channel_plan(model)
        self.nets: dict[tuple[int, ...], nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def net(self, width: float) -> nn.Module:
        config = self.plan.config(width)
        if config not in self.nets:
            plain = usnet.export(self.model, width, require_stats=False).train()
            for m in plain.modules():
                if isinstance(m, nn.BatchNorm2d):  # batch statistics only, like slimmable BN
                    m.track_running_stats = False
            if self.channels_last:
                plain = plain.to(memory_format=torch.channels_last)
            self._add_to_optimizer(plain)
            self.nets[config] = torch.compile(plain) if self.compile else plain
        return self.nets[config]

    def _add_to_optimizer(self, plain: nn.Module) -> None:
        """Rebuild the one optimizer with ``plain``'s parameters added to its two groups (decay,
        no decay), keeping the momentum buffers of the networks already in it."""
        new = make_optimizer(plain, lr=0.1)
        if self.optimizer is not None:
            old = self.optimizer
            for group, old_group in zip(new.param_groups, old.param_groups):
                group["params"] = old_group["params"] + group["params"]
            new = torch.optim.SGD(new.param_groups, lr=0.1, momentum=0.9, nesterov=True)
            for p, state in old.state.items():
                new.state[p] = state
        self.optimizer = new

    def step(self, images, labels, widths: Sequence[float], criterion, autocast_dtype) -> None:
        nets = [self.net(w) for w in widths]
        self.optimizer.zero_grad(set_to_none=True)
        teacher = None
        losses = []
        for i, net in enumerate(nets):
            with _autocast(images.device, autocast_dtype):
                logits = net(images)
                loss = criterion(logits, labels, teacher)
            if i == 0:
                teacher = criterion.teacher_probs(logits)
            loss.backward()
            losses.append(loss.detach().float())
        torch.stack(losses).tolist()  # the one device sync per step sandwich_step also does
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self, images, widths: Sequence[float], autocast_dtype) -> None:
        """One forward/backward per plain network (cuDNN autotuning of its shapes)."""
        for w in widths:
            net = self.net(w)
            with _autocast(images.device, autocast_dtype):
                out = net(images)
            out.float().mean().backward()
            self.zero_grad()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def ms_per_step(step, widths_per_step: Sequence[Sequence[float]], device) -> float:
    """Milliseconds per call of ``step(widths)``, timed over all the given steps."""
    sync(device)
    start = time.perf_counter()
    for widths in widths_per_step:
        step(widths)
    sync(device)
    return (time.perf_counter() - start) / len(widths_per_step) * 1000


def run_pair(
    size: Size,
    variant_name: str,
    mode: str,
    device,
    rounds: int,
    steps: int,
    random_choices: int = 0,
) -> dict:
    """Median ms/step of the slimmable step and of the limit, interleaved per round."""
    v = Variant.parse(variant_name)
    torch.backends.cudnn.benchmark = v.cudnn_benchmark
    model = build(size.model, size.model_kwargs, device, v.channels_last)
    images, labels = batch_for(model, size.batch, size.image, device, v.channels_last)
    criterion = InplaceDistillationLoss()
    optimizer = make_optimizer(model, lr=0.1)
    plan = usnet.channel_plan(model)
    if mode == "fixed":
        schedule = [fixed_widths(model)] * (rounds * steps + 2)
    else:
        choices = None
        if random_choices:  # a finite set: bounds the one-off warm-up, not the steady state
            distinct = plan.distinct_widths()
            choices = distinct[:: max(1, len(distinct) // random_choices)][:random_choices]
        sampler = WidthSampler(plan.width_range, num_widths=4, seed=0, choices=choices)
        schedule = [sampler.sample() for _ in range(rounds * steps + 2)]
    limit = Limit(model, v.channels_last)
    start = time.perf_counter()
    if mode == "random":  # steady state: every configuration of the schedule seen once, both sides
        drawn = sorted({w for ws in schedule for w in ws})
        warm_up_widths(model, images, drawn, autocast_dtype=v.autocast)
        limit.warm_up(images, drawn, v.autocast)
    for ws in schedule[:2]:
        sandwich_step(model, images, labels, optimizer, ws, criterion, autocast_dtype=v.autocast)
        limit.step(images, labels, ws, criterion, v.autocast)
    sync(device)
    warm_s = time.perf_counter() - start
    slim_ms, limit_ms = [], []
    for r in range(rounds):
        part = schedule[2 + r * steps : 2 + (r + 1) * steps]
        sides = [(slim_ms, lambda ws: sandwich_step(model, images, labels, optimizer, ws,
                                                    criterion, autocast_dtype=v.autocast)),
                 (limit_ms, lambda ws: limit.step(images, labels, ws, criterion, v.autocast))]  # fmt: skip
        for out, step in sides if r % 2 == 0 else sides[::-1]:  # A B, B A, ...: no order bias
            out.append(ms_per_step(step, part, device))
    torch.backends.cudnn.benchmark = False
    slim, lim = statistics.median(slim_ms), statistics.median(limit_ms)
    return {"slim": slim, "limit": lim, "warm_s": warm_s, "configs": len(plan.distinct_configs())}


def main_steps(args, size: Size, device) -> None:
    rounds = args.rounds or size.rounds
    steps = args.steps or size.steps
    variants = args.variants.split(",") if args.variants else list(size.variants)
    if device.type != "cuda":
        variants = [v for v in variants if "+bench" not in v]  # cuDNN: CUDA only
    rows = []
    for mode in args.widths.split(","):
        for name in variants:
            r = run_pair(size, name, mode, device, rounds, steps, args.random_choices)
            rows.append([mode, name, f"{r['slim']:.1f}", f"{r['limit']:.1f}",
                         f"{size.batch / r['slim'] * 1000:.0f}",
                         f"{size.batch / r['limit'] * 1000:.0f}",
                         f"**{r['slim'] / r['limit']:.3f}**", f"{r['warm_s']:.1f}"])  # fmt: skip
            print("  " + " | ".join(rows[-1]), flush=True)
    print(header(f"train_step: {size.model}, batch {size.batch}, {size.image} px, n=4 widths, "
                 f"in-place distillation + SGD; median of {rounds} interleaved rounds x {steps} "
                 "steps", device))  # fmt: skip
    print(table(rows, ["widths", "variant", "slimmable ms", "limit ms", "slimmable img/s",
                       "limit img/s", "ratio", "warm-up s"]))  # fmt: skip


# -- peak memory ---------------------------------------------------------------------------------
def memory_worker(args, size: Size, device) -> None:
    """Print peak bytes of (sandwich step, widest-only slimmable step, widest plain step)."""
    v = Variant.parse(args.variants or "fp32")
    model = build(size.model, size.model_kwargs, device, v.channels_last)
    images, labels = batch_for(model, size.batch, size.image, device, v.channels_last)
    criterion = InplaceDistillationLoss()
    optimizer = make_optimizer(model, lr=0.1)
    widths = fixed_widths(model)
    limit = Limit(model, v.channels_last)
    plain_widest = [widths[0]]
    cases = {
        "sandwich step (4 widths)": lambda: sandwich_step(
            model, images, labels, optimizer, widths, criterion, autocast_dtype=v.autocast),
        "slimmable, widest width only": lambda: sandwich_step(
            model, images, labels, optimizer, widths[:1], criterion, autocast_dtype=v.autocast),
        "plain widest network": lambda: limit.step(
            images, labels, plain_widest, criterion, v.autocast),
        "limit (4 plain networks)": lambda: limit.step(
            images, labels, widths, criterion, v.autocast),
    }  # fmt: skip
    for fn in cases.values():  # optimizer state and allocator pools exist before measuring
        fn()
        fn()
    peaks: dict[str, list[int]] = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            optimizer.zero_grad(set_to_none=True)
            limit.zero_grad()
            with PeakMemory(device) as pm:
                fn()
            peaks[name].append(pm.peak)
    for name, values in peaks.items():
        print(f"PEAK\t{name}\t{statistics.median(values)}")


def main_memory(args, size: Size, device) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        __file__,
        "--size",
        size_name(size),
        "--device",
        str(device),
        "--memory-worker",
        "--model",
        args.model,
        "--threads",
        str(torch.get_num_threads()),
    ]
    cmd += ["--variants", args.variants] if args.variants else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    peaks = {}
    for line in out.splitlines():
        if line.startswith("PEAK\t"):
            _, name, value = line.split("\t")
            peaks[name] = int(float(value))
    base = peaks["slimmable, widest width only"]
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "peak RSS (VmHWM) above RSS at step start, MALLOC_MMAP_THRESHOLD_=65536")  # fmt: skip
    print(header(f"peak memory of one training step: {size.model}, batch {size.batch}, "
                 f"{size.image} px, {args.variants or 'fp32'}; method: {method}", device))  # fmt: skip
    rows = [[name, f"{b / 2**20:.1f}", f"{b / base:.2f}"] for name, b in peaks.items()]
    print(table(rows, ["step", "peak MiB above start", "ratio to widest only"]))


def size_name(size: Size) -> str:
    return next(name for name, s in SIZES.items() if s is size)


# -- torch.compile -------------------------------------------------------------------------------
def main_compile(args, size: Size, device) -> None:
    from torch._dynamo.utils import counters

    rounds = args.rounds or size.rounds
    steps = args.steps or size.steps
    sz = Size(size.compile_model, size.compile_kwargs, size.compile_batch, size.compile_image,
              steps, rounds, ("fp32",), "", {}, 0, 0)  # fmt: skip
    model = build(sz.model, sz.model_kwargs, device, False)
    images, labels = batch_for(model, sz.batch, sz.image, device, False)
    criterion = InplaceDistillationLoss()
    plan = usnet.channel_plan(model)
    fixed = fixed_widths(model)
    # Random widths drawn from a finite list bound the graphs: one per channel configuration.
    choices = (
        [fixed[2], fixed[3]]
        if args.compile_choices == 0
        else plan.distinct_widths()[:: max(1, len(plan.distinct_widths()) // args.compile_choices)]
    )
    sampler = WidthSampler(plan.width_range, 4, seed=0, choices=choices)
    configs = {plan.config(w) for w in [*fixed[:2], *choices]}
    bound = len(configs)
    compiled_model = torch.compile(model)
    optimizer = make_optimizer(model, lr=0.1)
    limit = Limit(model, False)
    compiled_limit = Limit(model, False, compile=True)
    schedule = [sampler.sample() for _ in range(rounds * steps)]
    counters.clear()
    # torch >= 2.6 calls it recompile_limit (cache_size_limit before; both exist on 2.11)
    name = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    with torch._dynamo.config.patch(**{name: max(8, bound)}):
        t = time.perf_counter()
        warm_up_widths(compiled_model, images, [*fixed[:2], *choices])
        for ws in schedule[:2]:
            sandwich_step(compiled_model, images, labels, optimizer, ws, criterion)
        sync(device)
        compile_s = time.perf_counter() - t
        graphs_after_warm = counters["stats"]["unique_graphs"]
        drawn = sorted({w for ws in schedule for w in ws})
        limit.warm_up(images, drawn, None)
        t = time.perf_counter()
        compiled_limit.warm_up(images, drawn, None)
        for ws in schedule[:2]:
            compiled_limit.step(images, labels, ws, criterion, None)
        sync(device)
        limit_compile_s = time.perf_counter() - t
        slim_ms, eager_ms, limit_ms, climit_ms = [], [], [], []
        for r in range(rounds):
            part = schedule[r * steps : (r + 1) * steps]
            for fn, out in ((lambda ws: sandwich_step(compiled_model, images, labels, optimizer,
                                                      ws, criterion), slim_ms),
                            (lambda ws: sandwich_step(model, images, labels, optimizer, ws,
                                                      criterion), eager_ms),
                            (lambda ws: compiled_limit.step(images, labels, ws, criterion, None), climit_ms),
                            (lambda ws: limit.step(images, labels, ws, criterion, None), limit_ms)):  # fmt: skip
                out.append(ms_per_step(fn, part, device))
        graphs = counters["stats"]["unique_graphs"]
    lim, clim = statistics.median(limit_ms), statistics.median(climit_ms)
    print(header(f"torch.compile sandwich step: {sz.model}, batch {sz.batch}, {sz.image} px, "
                 f"fp32, random widths from {len(choices)} choices + top/bottom; median of "
                 f"{rounds} interleaved rounds x {steps} steps", device))  # fmt: skip
    print(
        f"  distinct channel configurations the sampler can draw (the recompile bound): {bound}; "
        f"graphs compiled: {graphs_after_warm} after warm-up ({compile_s:.0f} s), {graphs} at the "
        f"end (both sides; the compiled limit's warm-up took {limit_compile_s:.0f} s)"
    )
    rows = [[name, f"{statistics.median(v):.1f}", f"{sz.batch / statistics.median(v) * 1000:.0f}",
             f"**{statistics.median(v) / clim:.3f}**", f"{statistics.median(v) / lim:.3f}",
             f"{min(v):.1f}-{max(v):.1f}"]
            for name, v in (("compiled slimmable", slim_ms), ("compiled limit", climit_ms),
                            ("eager slimmable", eager_ms), ("eager limit", limit_ms))]  # fmt: skip
    print(table(rows, ["step", "ms", "img/s", "ratio to compiled limit", "ratio to eager limit",
                       "range of rounds (ms)"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--widths", default="fixed,random", help="fixed, random or both")
    parser.add_argument(
        "--variants", default=None, help="comma list of fp32, bf16_cl, fp32+bench, bf16_cl+bench"
    )
    parser.add_argument("--random-choices", type=int, default=0,
                        help="random widths drawn from about this many distinct widths (0: any "
                             "width; a finite set bounds the one-off warm-up on a GPU, where each "
                             "new shape costs seconds of cuDNN kernel compilation)")  # fmt: skip
    parser.add_argument("--model", choices=("cnn", "vit"), default="cnn",
                        help="cnn: US-MobileNetV2 (ConvNet when compiling on the CPU); vit: the "
                             "Fashion-MNIST US-ViT on the CPU, US-ViT-Small on a GPU")  # fmt: skip
    parser.add_argument("--memory", action="store_true", help="peak memory instead of speed")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help="torch.compile instead of eager")
    parser.add_argument("--compile-choices", type=int, default=0,
                        help="random widths from about this many distinct widths (0: the two "
                             "fixed middle widths)")  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args)
    size = (VIT_SIZES if args.model == "vit" else SIZES)[args.size]
    if args.memory_worker:
        memory_worker(args, size, device)
    elif args.memory:
        main_memory(args, size, device)
    elif args.compile:
        main_compile(args, size, device)
    else:
        main_steps(args, size, device)


if __name__ == "__main__":
    main()
