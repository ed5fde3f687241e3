"""Cost of data parallelism on CPU: sandwich steps in 1 process against 2 gloo processes.

The same global batch (default 128 Fashion-MNIST-sized images, us_convnet, n=4 widths with in-place
distillation, SGD) is trained for a number of steps:

* 1 process with 1 thread, and 1 process with ``world`` threads (the same cores as the ranks);
* 1 process with 1 thread on one rank's share (batch / world images): the compute of one rank
  without any communication;
* ``world`` processes with 1 thread each, DistributedDataParallel over gloo, batch / world images
  per rank (gradients all-reduced once per step), with plain and with synchronized BatchNorm.

Printed side by side, in one run (interleaved rounds, median): ms per step and the ratio to the
1-process, 1-thread run. DDP's own overhead is the ``world``-process time over the one-share time
(1.0 would be free communication on idle cores). Run from the repository root::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ddp_overhead.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from usnet import distributed
from usnet.models import create_model
from usnet.training import InplaceDistillationLoss, WidthSampler, make_optimizer, sandwich_step


def _setup(batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("us_convnet").to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    return model, images, labels


def _time_steps(model, train_model, images, labels, steps: int) -> float:
    optimizer = make_optimizer(model, lr=0.01)
    sampler = WidthSampler((0.25, 1.0), num_widths=4, seed=0)
    criterion = InplaceDistillationLoss()
    model.train()
    for _ in range(3):  # warm-up
        sandwich_step(train_model, images, labels, optimizer, sampler, criterion)
    start = time.perf_counter()
    for _ in range(steps):
        sandwich_step(train_model, images, labels, optimizer, sampler, criterion)
    return (time.perf_counter() - start) / steps


def single(batch: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, images, labels = _setup(batch)
    return _time_steps(model, model, images, labels, steps)


def _rank(rank: int, world: int, port: int, batch: int, steps: int, sync_bn: bool, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout=timedelta(seconds=120))
    try:
        model, images, labels = _setup(batch)
        share = batch // world
        images, labels = images[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]
        if sync_bn:
            distributed.convert_sync_batchnorm(model)
        ddp = DistributedDataParallel(model)
        seconds = _time_steps(model, ddp, images, labels, steps)
        if rank == 0:
            out.put(seconds)
    finally:
        distributed.destroy()


def parallel(batch: int, steps: int, world: int, sync_bn: bool) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(world, port, batch, steps, sync_bn, out), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    runs = {
        "1 process, 1 thread": lambda: single(args.batch, args.steps, 1),
        f"1 process, {args.world} threads": lambda: single(args.batch, args.steps, args.world),
        f"1 process, 1 thread, 1/{args.world} batch": lambda: single(args.batch // args.world, args.steps, 1),
        f"{args.world} processes (DDP, gloo)": lambda: parallel(args.batch, args.steps, args.world, False),
        f"{args.world} processes (DDP, gloo, SyncBN)": lambda: parallel(args.batch, args.steps, args.world, True),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    base = statistics.median(times["1 process, 1 thread"])
    print(f"us_convnet, global batch {args.batch}, n=4, {args.steps} steps x {args.rounds} rounds "
          f"(median); torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'run':<36} {'ms/step':>8} {'images/s':>9} {'ratio':>6}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:<36} {1000 * t:>8.1f} {args.batch / t:>9.0f} {t / base:>6.2f}")


if __name__ == "__main__":
    main()
