"""Is data loading the bottleneck of the main job? Batches per second of the ways to feed it,
next to the sandwich step they feed, measured side by side in one run.

*loader*: ``DataLoader`` over Fashion-MNIST, one ``__getitem__`` per image, collated, copied to
the device (``pin_memory`` on CUDA), ``--workers`` worker processes: what the trainer did before.
*tensor batches*: :class:`usnet.train.data.TensorBatches`, the whole training set on the device once,
each batch one index operation: what the trainer does now for in-memory datasets without
augmentation. *step*: one sandwich step (n=5, in-place distillation, SGD) of the main job's
US-ConvNet on the same batch size. A loader slower than a step leaves the device idle.

Usage::

    python benchmarks/data_loading.py --device cuda      # the main job's batch 128
    python benchmarks/data_loading.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from _common import add_common_args, header, resolve_device, sync, table
from torch.utils.data import DataLoader, RandomSampler

import usnet
from usnet.train.data import FashionMNIST, TensorBatches, as_tensors
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.recipe import make_optimizer
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import sandwich_step


def ms_per_batch(batches, device: torch.device, count: int) -> float:
    it = iter(batches)
    next(it)  # workers started, first batch out of the way
    sync(device)
    start = time.perf_counter()
    for images, labels in itertools.islice(it, count):
        images.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)
    sync(device)
    return (time.perf_counter() - start) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100, help="batches timed per round")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    device = resolve_device(args)
    rounds = args.rounds or 3
    data = FashionMNIST(train=True)
    order = list(RandomSampler(data, generator=torch.Generator().manual_seed(0)))
    loader = DataLoader(data, batch_size=args.batch, sampler=order, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda")  # fmt: skip
    tensors = tuple(t.to(device) for t in as_tensors(data))
    fast = TensorBatches(*tensors, order, args.batch)

    torch.manual_seed(0)
    model = usnet.models.create_model("us_convnet", num_classes=10, in_channels=1, small_input=True)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, lr=0.1)
    sampler = WidthSampler((0.25, 1.0), num_widths=5, seed=0)
    criterion = InplaceDistillationLoss(label_weight=0.5)
    images, labels = next(iter(fast))
    images = images.contiguous(memory_format=torch.channels_last)

    def step_ms(count: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            sandwich_step(model, images, labels, optimizer, sampler, criterion)
        sync(device)
        return (time.perf_counter() - start) / count * 1000

    step_ms(3)  # warm-up
    times: dict[str, list[float]] = {"loader": [], "tensor batches": [], "sandwich step": []}
    for _ in range(rounds):
        times["loader"].append(ms_per_batch(loader, device, args.batches))
        times["tensor batches"].append(ms_per_batch(fast, device, args.batches))
        times["sandwich step"].append(step_ms(max(5, args.batches // 5)))
    step = statistics.median(times["sandwich step"])
    print(header(f"data loading: Fashion-MNIST, batch {args.batch}, {args.workers} loader workers; "
                 f"median of {rounds} rounds", device))  # fmt: skip
    rows = [[name, f"{statistics.median(v):.2f}", f"{min(v):.2f}-{max(v):.2f}",
             f"{statistics.median(v) / step:.3f}"] for name, v in times.items()]  # fmt: skip
    print(table(rows, ["per batch", "ms", "range (ms)", "ratio to the step"]))


if __name__ == "__main__":
    main()
