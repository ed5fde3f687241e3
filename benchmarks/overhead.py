"""Per-call Python/host overheads of the slimmable path: ``set_width`` and a batch-1 eval forward.

Prints microseconds per ``usnet.set_width`` call on US-MobileNetV2 (cycling the issue's four widths,
as a sandwich step does) and the batch-1 eval forward of the slimmable model at width 1.0 against
the exported model, interleaved. Used for the before/after numbers of issue 5's optimizations
(run it with ``PYTHONPATH`` pointing at each version of the package).

Usage::

    python benchmarks/overhead.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, header, interleaved, resolve_device

import usnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    device = resolve_device(args)
    rounds = args.rounds or 7
    torch.manual_seed(0)
    model = usnet.models.us_mobilenet_v2(num_classes=1000).to(device)
    widths = [1.0, 0.35, 0.6, 0.8]

    def switch() -> None:
        for w in widths:
            usnet.set_width(model, w)

    switch_ms = interleaved({"set_width x4": switch}, 200, rounds, device)["set_width x4"]
    x = torch.randn(1, 3, 64, 64, device=device)
    usnet.calibrate(model, [x.repeat(8, 1, 1, 1) + torch.randn(8, 3, 64, 64, device=device)],
                    widths=[1.0], num_images=8)  # fmt: skip
    model.eval()
    usnet.set_width(model, 1.0)
    plain = usnet.export(model, 1.0)
    with torch.inference_mode():
        ms = interleaved({"slimmable": lambda: model(x), "exported": lambda: plain(x)}, 50,
                         rounds, device)  # fmt: skip
    print(header(f"overhead: us_mobilenet_v2; median of {rounds} interleaved rounds", device))
    print(f"  set_width: {switch_ms / 4 * 1000:.0f} us per call")
    print(
        f"  eval forward, batch 1, 64 px, width 1.0: slimmable {ms['slimmable']:.2f} ms, "
        f"exported {ms['exported']:.2f} ms, ratio {ms['slimmable'] / ms['exported']:.3f}"
    )


if __name__ == "__main__":
    main()
