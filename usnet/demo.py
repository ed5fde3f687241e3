"""The main job until ``usnet train`` lands: the whole API on real Fashion-MNIST images.

A plain torchvision-style CNN is converted, trained briefly with the sandwich rule and in-place
distillation, calibrated per width, evaluated across the width range, exported width by width
(with proof of equality), profiled, saved and reloaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .calibrate import calibrate
from .channels import parse_widths
from .checkpoint import atomic_write_bytes, load, save
from .convert import slimmable
from .data import FashionMNIST
from .export import export
from .profile import format_count, profile
from .state import channel_plan, width

INPUT_SIZE = (1, 1, 28, 28)


def plain_cnn(num_classes: int = 10) -> nn.Sequential:
    """An ordinary 4-conv CNN for 28 px images, nothing slimmable about it."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return correct / len(images)


def run_demo(out: Path, data_root: str | None = None, num_images: int = 1024, steps: int = 300,
             seed: int = 0, widths: str = "0.25:1.0:0.125") -> list[dict]:  # fmt: skip
    from .training import InplaceDistillationLoss, WidthSampler, make_optimizer, make_scheduler, sandwich_step

    start = time.time()
    torch.manual_seed(seed)
    train_set = FashionMNIST(data_root, train=True)
    test_images, test_labels = FashionMNIST(data_root, train=False).tensors()
    print(f"Fashion-MNIST: {len(train_set)} training / {len(test_images)} test images")

    model = slimmable(plain_cnn(), width_range=(0.25, 1.0), input_size=INPUT_SIZE)
    plan = channel_plan(model)
    print(f"[1/5] converted a plain CNN: {plan}; root groups {', '.join(plan.root_names)}")

    images, labels = train_set.tensors()
    loader = DataLoader(TensorDataset(images, labels), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)  # fmt: skip
    optimizer = make_optimizer(model, lr=0.1, weight_decay=5e-5)
    scheduler = make_scheduler(optimizer, total_steps=steps, warmup_steps=min(50, steps // 10),
                               schedule="cosine")  # fmt: skip
    sampler = WidthSampler(plan.width_range, num_widths=4, seed=seed)
    criterion = InplaceDistillationLoss()
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            result = sandwich_step(model, x, y, optimizer, sampler, criterion)
            scheduler.step()
            step += 1
            if step % 50 == 0 or step == steps:
                losses = " ".join(f"{w:.2f}:{l:.3f}" for w, l in zip(result.widths, result.losses))
                print(f"      step {step}/{steps}  loss by width {losses}")
            if step == steps:
                break
    print(f"[2/5] trained {steps} sandwich-rule steps (n=4, in-place distillation) "
          f"in {time.time() - start:.0f}s")  # fmt: skip

    grid = parse_widths(widths)
    keys = calibrate(model, train_set, grid, num_images=num_images, seed=seed)
    print(f"[3/5] calibrated BN on {num_images} random training images: {len(keys)} configurations")

    rows = []
    probe = test_images[:256]
    for w in grid:
        with width(model, w):
            top1 = accuracy(model, test_images, test_labels)
        plain = export(model, w)
        with torch.no_grad():
            diff = (plain(probe) - reference_at(model, w, probe)).abs().max().item()
        cost = profile(model, w, INPUT_SIZE)
        rows.append({"width": w, "config_id": cost.config_id, "params": cost.params,
                     "macs": cost.macs, "top1": top1, "export_max_abs_diff": diff})  # fmt: skip
    print("[4/5] test accuracy across the width range, and each width exported as a plain model:")
    print(f"      {'width':>6} {'params':>9} {'MACs':>9} {'top-1':>7} {'export max|diff|':>17}")
    for r in rows:
        print(f"      {r['width']:>6.3f} {format_count(r['params']):>9} "
              f"{format_count(r['macs']):>9} {100 * r['top1']:>6.2f}% {r['export_max_abs_diff']:>17.2e}")  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    path = save(model, out / "usnet.pt", extra={"demo_rows": rows})
    restored = load(path)
    same = all(
        torch.equal(reference_at(restored, w, probe), reference_at(model, w, probe)) for w in grid
    )
    atomic_write_bytes(out / "spectrum.json", json.dumps(rows, indent=1).encode())
    print(f"[5/5] saved {path} and {out / 'spectrum.json'}; reloaded checkpoint reproduces "
          f"outputs: {same}. Total {time.time() - start:.0f}s")  # fmt: skip
    if not same or max(r["export_max_abs_diff"] for r in rows) > 1e-4:
        raise RuntimeError("demo self-check failed: export or checkpoint does not reproduce the model")
    return rows


def reference_at(model: nn.Module, w: float, x: torch.Tensor) -> torch.Tensor:
    with width(model, w), torch.no_grad():
        return model.eval()(x)
