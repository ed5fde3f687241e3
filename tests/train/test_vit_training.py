"""Training a US-ViT through ``usnet train``'s config: the shipped ViT config loads, a short real
run learns (well above chance at the narrowest and widest widths, no calibration step), and bf16
autocast actually runs inside the attention and the MLP on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import usnet
from usnet.nn.attention import SlimmableMultiheadAttention
from usnet.nn.linear import SlimmableLinear
from usnet.train.config import load_config
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.recipe import make_optimizer
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import sandwich_step
from usnet.train.trainer import Trainer

VIT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist_vit.yaml"
SMALL = ("model_kwargs={in_channels: 1, num_classes: 10, small_input: true, image_size: 28, "
         "patch_size: 7, hidden_dim: 64, num_heads: 8, mlp_dim: 128, num_layers: 2}")  # fmt: skip


def test_shipped_vit_config_is_the_adamw_recipe():
    config = load_config(VIT_CONFIG)
    assert config.model == "us_vit" and config.optimizer == "adamw"
    assert config.label_smoothing > 0 and config.warmup_epochs > 0 and config.weight_decay > 0
    model = usnet.models.create_model(config.model, **config.model_kwargs)
    assert not usnet.needs_calibration(model)  # LayerNorm only


@pytest.mark.slow
def test_a_short_run_learns_well_above_chance(tmp_path):
    config = load_config(VIT_CONFIG, [SMALL, "epochs=3", "lr=3e-3", "data.limit_train=4096",
                                      "data.limit_test=1000", "eval.widths=0.25,1.0",
                                      "eval.every_epoch=false", "warmup_epochs=0.2"])  # fmt: skip
    lines: list[str] = []
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lines.append)
    rows = trainer.run()
    top1 = {round(r["width"], 2): r["top1"] for r in rows}
    assert top1[0.25] > 0.4 and top1[1.0] > 0.55, top1  # chance is 0.10
    assert any("calibration not needed" in line for line in lines)


def test_bf16_autocast_runs_inside_attention_and_mlp():
    torch.manual_seed(0)
    model = usnet.models.us_vit(num_classes=10, in_channels=1, small_input=True, image_size=28,
                                patch_size=7, hidden_dim=32, num_heads=4, mlp_dim=64,
                                num_layers=1).train()  # fmt: skip
    seen: dict[str, set] = {"attention": set(), "linear": set()}

    def hook(kind):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[kind].add(out.dtype)

        return record

    for m in model.modules():
        if isinstance(m, SlimmableMultiheadAttention):
            m.register_forward_hook(hook("attention"))
        elif isinstance(m, SlimmableLinear):
            m.register_forward_hook(hook("linear"))
    optimizer = make_optimizer(model, 1e-3, weight_decay=0.05, kind="adamw")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    result = sandwich_step(model, x, y, optimizer, WidthSampler((0.25, 1.0), 3, seed=0),
                           InplaceDistillationLoss(), autocast_dtype=torch.bfloat16)  # fmt: skip
    assert seen == {"attention": {torch.bfloat16}, "linear": {torch.bfloat16}}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
