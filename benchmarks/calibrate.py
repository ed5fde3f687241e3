"""BatchNorm calibration of K widths on N images against K forward-only passes over the same images.

*calibrate*: ``usnet.calibrate(model, batches, widths, num_images=N)`` with the N images already
loaded (a list of batches: data loading is paid once for all widths, outside both timings).
*limit*: for each width, the exported plain model of that width in eval mode runs forward over
the same batches under ``torch.inference_mode``. Target: calibrate / limit <= 1.10. A second
limit row runs the same plain networks with BatchNorm on batch statistics (train mode, running
statistics untouched): the arithmetic calibration cannot avoid. On CUDA a
third row passes calibrate batches that live in CPU memory (its usual input), which adds K
host-to-device copies of the sample.

Usage::

    python benchmarks/calibrate.py --size cpu                # 4 widths x 256 images, 64 px
    python benchmarks/calibrate.py --size gpu --device cuda  # 8 widths x 1024 images, 224 px
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import add_common_args, header, interleaved, resolve_device, table

import usnet

SIZES = {
    "cpu": {"image": 64, "widths": [0.35, 0.5, 0.75, 1.0], "images": 256, "batch": 64,
            "rounds": 5},
    "gpu": {"image": 224, "widths": [0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0],
            "images": 1024, "batch": 128, "rounds": 5},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    device = resolve_device(args)
    size = SIZES[args.size]
    rounds = args.rounds or size["rounds"]
    widths, n = size["widths"], size["images"]
    torch.manual_seed(0)
    model = usnet.models.us_mobilenet_v2(num_classes=1000).to(device)
    g = torch.Generator().manual_seed(0)
    host = [torch.randn(size["batch"], 3, size["image"], size["image"], generator=g)
            for _ in range(n // size["batch"])]  # fmt: skip
    batches = [b.to(device) for b in host]
    usnet.calibrate(model, batches, widths=widths, num_images=n)
    plain = [usnet.export(model, w) for w in widths]

    # The same plain networks normalizing with batch statistics (running statistics untouched):
    # the arithmetic calibration cannot avoid, since each width's statistics are what it measures.
    batch_stat = [copy.deepcopy(net).train() for net in plain]
    for net in batch_stat:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False

    def forward_all(nets) -> None:
        with torch.inference_mode():
            for net in nets:
                for b in batches:
                    net(b)

    fns = {"calibrate": lambda: usnet.calibrate(model, batches, widths=widths, num_images=n),
           "limit": lambda: forward_all(plain),
           "limit, BN on batch statistics": lambda: forward_all(batch_stat)}  # fmt: skip
    if device.type == "cuda":
        fns["calibrate, batches in CPU memory"] = lambda: usnet.calibrate(
            model, host, widths=widths, num_images=n)  # fmt: skip
    ms = interleaved(fns, 1, rounds, device)
    print(header(f"calibrate: us_mobilenet_v2, {len(widths)} widths x {n} images "
                 f"(batch {size['batch']}, {size['image']} px); median of {rounds} interleaved "
                 "rounds", device))  # fmt: skip
    rows = [[name, f"{t:.0f}", f"{len(widths) * n / t * 1000:.0f}", f"**{t / ms['limit']:.3f}**"]
            for name, t in ms.items()]  # fmt: skip
    print(table(rows, ["run", "ms", "images x widths / s", "ratio to limit"]))


if __name__ == "__main__":
    main()
