"""Inference at several widths: slimmable model (eval) vs exported model vs plain torchvision model.

For each width ``w`` of US-MobileNetV2: the slimmable model in eval mode at ``w`` (BatchNorm
calibrated there), ``usnet.export(model, w)``, and ``torchvision.models.mobilenet_v2(width_mult=w)``
holding the exported weights (loaded strictly; outputs are checked equal before timing). Forward
passes under ``torch.inference_mode``, batch 1 and batch 64, timed in interleaved rounds.
Targets: exported / torchvision = 1.00 (within noise); slimmable / exported <= 1.15 at batch 64.

Usage::

    python benchmarks/inference.py --size cpu                # 64 px images, about a minute
    python benchmarks/inference.py --size gpu --device cuda  # 224 px, fp32 and bf16 channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torchvision
from _common import add_common_args, header, interleaved, resolve_device, table

import usnet

SIZES = {
    "cpu": {"image": 64, "widths": [0.35, 0.5, 0.75, 1.0], "batches": [1, 64], "rounds": 5,
            "target_ms": 150.0, "variants": ["fp32"]},
    "gpu": {"image": 224, "widths": [0.35, 0.5, 0.75, 1.0], "batches": [1, 64], "rounds": 5,
            "target_ms": 100.0, "variants": ["fp32", "bf16_cl"]},
}  # fmt: skip


def build(widths: list[float], image: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = usnet.models.us_mobilenet_v2(num_classes=1000).to(device)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, image, image, generator=g) for _ in range(2)]
    usnet.calibrate(model, data, widths=widths, num_images=64)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--variants", default=None, help="comma list of fp32, bf16_cl")
    args = parser.parse_args()
    device = resolve_device(args)
    size = SIZES[args.size]
    rounds = args.rounds or size["rounds"]
    variants = args.variants.split(",") if args.variants else size["variants"]
    model = build(size["widths"], size["image"], device)
    rows = []
    for variant in variants:
        channels_last = variant == "bf16_cl"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if channels_last
                    else contextlib.nullcontext())  # fmt: skip
        for w in size["widths"]:
            exported = usnet.export(model, w)
            plain = torchvision.models.mobilenet_v2(width_mult=w, num_classes=1000).to(device)
            plain.load_state_dict(exported.state_dict(), strict=True)
            plain.eval()
            if channels_last:
                exported = exported.to(memory_format=torch.channels_last)
                plain = plain.to(memory_format=torch.channels_last)
            for batch in size["batches"]:
                x = torch.randn(batch, 3, size["image"], size["image"], device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                usnet.set_width(model, w)
                with torch.inference_mode(), autocast:
                    ref = plain(x)
                    diff = max((model(x) - ref).abs().max().item(),
                               (exported(x) - ref).abs().max().item())  # fmt: skip
                    fns = {"slim": lambda: model(x), "exported": lambda: exported(x),
                           "torchvision": lambda: plain(x)}  # fmt: skip
                    # calls per timing: about target_ms, from one untimed call each
                    probe = interleaved(fns, 1, 1, device)
                    repeats = max(1, int(size["target_ms"] / max(probe.values())))
                    # one interleaved round at a time: the ratio of each round shows the noise
                    per_round = [interleaved(fns, repeats, 1, device) for _ in range(rounds)]
                ms = {k: statistics.median(r[k] for r in per_round) for k in fns}
                slim_ratio = [r["slim"] / r["exported"] for r in per_round]
                rows.append([variant, w, batch, f"{ms['torchvision']:.2f}", f"{ms['exported']:.2f}",
                             f"{ms['slim']:.2f}",
                             f"**{ms['exported'] / ms['torchvision']:.3f}**",
                             f"**{statistics.median(slim_ratio):.3f}**",
                             f"{min(slim_ratio):.2f}-{max(slim_ratio):.2f}", f"{diff:.1e}"])  # fmt: skip
                print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
    print(header(f"inference: us_mobilenet_v2 (1000 classes), {size['image']} px, inference_mode; "
                 f"median of {rounds} interleaved rounds", device))  # fmt: skip
    print(table(rows, ["variant", "width", "batch", "torchvision ms", "exported ms", "slimmable ms",
                       "exported / torchvision", "slimmable / exported (median of rounds)",
                       "slimmable / exported, rounds min-max", "max abs diff"]))  # fmt: skip


if __name__ == "__main__":
    main()
