"""One sandwich-rule training step, measured side by side in one run.

Variants: contiguous vs channels_last memory format (CPU or CUDA). Prints ms/step, images/s and
the ratio to the first variant. Usage::

    python benchmarks/train_step.py [--model us_convnet] [--batch 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import usnet
from usnet.training import InplaceDistillationLoss, WidthSampler, make_optimizer, sandwich_step


def time_steps(model_name: str, batch: int, steps: int, channels_last: bool, device: str) -> float:
    torch.manual_seed(0)
    model = usnet.models.create_model(model_name, num_classes=10, in_channels=1, small_input=True)
    model = model.to(device)
    images = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=0.1)
    sampler = WidthSampler(usnet.channel_plan(model).width_range, num_widths=4, seed=0)
    criterion = InplaceDistillationLoss()
    for _ in range(3):  # warm-up
        sandwich_step(model, images, labels, optimizer, sampler, criterion)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        sandwich_step(model, images, labels, optimizer, sampler, criterion)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="us_convnet")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    variants = {"contiguous": False, "channels_last": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved rounds: machine noise hits both variants alike
        for name, channels_last in variants.items():
            times[name].append(time_steps(args.model, args.batch, args.steps, channels_last, args.device))
    base = statistics.median(times["contiguous"])
    print(f"{args.model}, batch {args.batch}, n=4 widths, {args.device}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"  {name:<14} {ms:7.1f} ms/step {args.batch / ms * 1000:8.0f} img/s  ratio {ms / base:.2f}")


if __name__ == "__main__":
    main()
