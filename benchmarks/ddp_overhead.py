"""Cost of data parallelism on CPU: the trainer's sandwich step in 1 process against 2 gloo processes.

The step is the one ``usnet train`` runs for the main job's config (``configs/fashion_mnist.yaml``,
overridable with ``--set``): us_convnet, ``channels_last``, n=5 widths with in-place distillation
mixed with the labels, SGD with Nesterov momentum and weight decay, on random 28 px images. The
same global batch (default 128) is trained for a number of steps:

* 1 process with 1 thread, and 1 process with ``world`` threads (the same cores as the ranks);
* 1 process with 1 thread on one rank's share (batch / world images): the compute of one rank
  without any communication;
* ``world`` processes with 1 thread each, batch / world images per rank, wrapped as the trainer
  wraps the model (``DistributedDataParallel`` over gloo without buffer broadcasts, gradients
  all-reduced once per step in the last width's backward), with plain and with synchronized
  BatchNorm.

Printed side by side, in one run (interleaved rounds, median): ms per step, images/s (the
images that row's step processes: the global batch, or one rank's share for the share row), and
the ratio to the 1-process, 1-thread run. DDP's own overhead is the ``world``-process time over
the one-share time (1.0 would be free communication on idle cores). Run from the repository root::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ddp_overhead.py [--steps 20] [--rounds 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from usnet import distributed
from usnet.models import create_model
from usnet.train.config import TrainConfig, load_config
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.recipe import make_optimizer
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import sandwich_step
from usnet.train.trainer import _NO_BUFFER_SYNC

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"


def _setup(config: TrainConfig, batch: int):
    """The trainer's model, optimizer, sampler and loss for ``config`` (as usnet.trainer builds
    them), and one random batch of ``batch`` images."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=10, in_channels=1, small_input=True,
                         width_range=tuple(config.width_range), **config.model_kwargs)  # fmt: skip
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)  # fmt: skip
    sampler = WidthSampler(tuple(config.width_range), num_widths=config.num_widths, seed=config.seed,
                           ends=config.sandwich_ends)  # fmt: skip
    criterion = InplaceDistillationLoss(
        label_smoothing=config.label_smoothing, temperature=config.distill_temperature,
        enabled=config.inplace_distill, label_weight=config.distill_label_weight,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(config.seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    return model, optimizer, sampler, criterion, images, labels


def _time_steps(train_model, optimizer, sampler, criterion, images, labels, steps: int) -> float:
    train_model.train()
    for _ in range(3):  # warm-up
        sandwich_step(train_model, images, labels, optimizer, sampler, criterion)
    start = time.perf_counter()
    for _ in range(steps):
        sandwich_step(train_model, images, labels, optimizer, sampler, criterion)
    return (time.perf_counter() - start) / steps


def single(config: TrainConfig, batch: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, optimizer, sampler, criterion, images, labels = _setup(config, batch)
    return _time_steps(model, optimizer, sampler, criterion, images, labels, steps)


def _rank(
    rank: int, world: int, port: int, config: TrainConfig, steps: int, sync_bn: bool, out
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout=timedelta(seconds=120))
    try:
        model, optimizer, sampler, criterion, images, labels = _setup(config, config.batch_size)
        share = config.batch_size // world
        images, labels = (
            images[rank * share : (rank + 1) * share],
            labels[rank * share : (rank + 1) * share],
        )
        if sync_bn:
            distributed.convert_sync_batchnorm(model)
        # As usnet.trainer wraps it: no buffer broadcast before each forward (BN keeps no running
        # statistics in training), no unused-parameter search (every parameter is used).
        ddp = DistributedDataParallel(model, find_unused_parameters=config.mode == "slimmable",
                                      **_NO_BUFFER_SYNC)  # fmt: skip
        seconds = _time_steps(ddp, optimizer, sampler, criterion, images, labels, steps)
        if rank == 0:
            out.put(seconds)
    finally:
        distributed.destroy()


def parallel(config: TrainConfig, steps: int, world: int, sync_bn: bool) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(world, port, config, steps, sync_bn, out), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as usnet train --set (e.g. batch_size=256)")  # fmt: skip
    args = parser.parse_args()
    config = load_config(CONFIG, args.set)
    batch, world = config.batch_size, args.world
    if batch % world:
        raise SystemExit(
            f"ddp_overhead: error: batch_size {batch} is not divisible by --world {world}"
        )
    share = batch // world
    runs = {  # name: (images per step, run)
        "1 process, 1 thread": (batch, lambda: single(config, batch, args.steps, 1)),
        f"1 process, {world} threads": (batch, lambda: single(config, batch, args.steps, world)),
        f"1 process, 1 thread, {share} images (one rank's share)":
            (share, lambda: single(config, share, args.steps, 1)),
        f"{world} processes (DDP, gloo)": (batch, lambda: parallel(config, args.steps, world, False)),
        f"{world} processes (DDP, gloo, SyncBN)": (batch, lambda: parallel(config, args.steps, world, True)),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, run) in runs.items():
            times[name].append(run())
    base = statistics.median(times["1 process, 1 thread"])
    print(f"{config.model}, global batch {batch}, n={config.num_widths}, channels_last="
          f"{config.channels_last}, {args.steps} steps x {args.rounds} rounds (median); "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| run | images/step | ms/step | images/s | ratio | spread (ms, min-max) |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        images = runs[name][0]
        print(
            f"| {name} | {images} | {1000 * t:.1f} | {images / t:.0f} | {t / base:.2f} | "
            f"{1000 * min(values):.0f}-{1000 * max(values):.0f} |"
        )


if __name__ == "__main__":
    main()
