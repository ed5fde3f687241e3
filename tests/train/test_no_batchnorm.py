"""Models without BatchNorm statistics (LayerNorm, GroupNorm: transformers, ConvNeXt-style nets)
need no calibration: usnet.calibrate is a no-op that loads nothing, every width counts as
calibrated, and usnet train / usnet calibrate skip the step and say so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from usnet_testing import tiny_slimmable

import usnet
from usnet.cli import main
from usnet.train.config import load_config
from usnet.train.trainer import FINAL, NO_CALIBRATION, Trainer

REPO = Path(__file__).resolve().parents[2]
SIZE = (1, 1, 28, 28)


def layer_norm_net(num_classes: int = 10, **kwargs) -> nn.Module:
    """A small CNN normalized by LayerNorm2d and GroupNorm only (any zoo keyword ignored)."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), LayerNorm2d(16), nn.GELU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip
    return usnet.slimmable(model, (0.25, 1.0), input_size=SIZE)


class Untouchable:
    """Calibration data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("calibration loaded images of a model without BatchNorm")

    def __len__(self):
        raise AssertionError("calibration looked at the data of a model without BatchNorm")


def test_calibrate_is_a_no_op_that_loads_nothing(caplog):
    model = layer_norm_net()
    assert not usnet.needs_calibration(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    usnet.set_width(model, 0.6)
    with caplog.at_level(logging.INFO, logger="usnet.calibration"):
        assert usnet.calibrate(model, Untouchable(), widths=[0.25, 0.5, 1.0]) == []
    assert "calibration not needed" in caplog.text
    assert usnet.get_width(model) == 0.6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(usnet.UsnetError, match="width"):  # widths are still checked
        usnet.calibrate(model, Untouchable(), widths=[1.5])


@pytest.mark.parametrize("width", [0.25, 0.4, 1.0, "per group"])
def test_every_width_counts_as_calibrated(width):
    model = layer_norm_net()
    if width == "per group":  # a non-uniform width
        roots = usnet.channel_plan(model).root_names
        width = {name: 0.25 + 0.5 * (i % 2) for i, name in enumerate(roots)}
    assert usnet.is_calibrated(model, width)
    usnet.export(model, width)  # needs no statistics either


def test_a_model_with_batchnorm_still_needs_calibration():
    model = tiny_slimmable()
    assert usnet.needs_calibration(model) and not usnet.is_calibrated(model, 0.5)
    for m in model.modules():  # BatchNorm without running statistics: batch statistics always
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    assert not usnet.needs_calibration(model) and usnet.is_calibrated(model, 0.5)


def test_search_on_a_model_without_batchnorm():
    model = layer_norm_net()
    gen = torch.Generator().manual_seed(0)
    heldout = torch.randn(32, *SIZE[1:], generator=gen), torch.randint(0, 10, (32,), generator=gen)
    budget = int(0.6 * usnet.profile(model, 1.0, SIZE).macs)
    calib = [torch.randn(16, *SIZE[1:], generator=gen)]
    result = usnet.search_width(model, calib, heldout, max_macs=budget, input_size=SIZE, step=0.25)
    assert result.result.macs <= budget and result.steps


def test_train_skips_calibration_and_the_checkpoint_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(usnet.train.trainer, "build_model", lambda spec, **kw: layer_norm_net())

    def no_calibration(*args, **kwargs):
        raise AssertionError("usnet train calibrated a model without BatchNorm")

    monkeypatch.setattr(usnet.train.trainer, "calibrate", no_calibration)
    config = load_config(
        REPO / "configs" / "fashion_mnist.yaml",
        ["epochs=1", "data.limit_train=256", "data.limit_test=200", "batch_size=64",
         "eval.widths=0.25,0.5,1.0", "channels_last=false", "optimizer=adamw", "lr=2e-3",
         "weight_decay=0.05"],
    )  # fmt: skip
    logged: list[str] = []
    out = tmp_path / "run"
    trainer = Trainer(config, out, progress=False, log=logged.append)
    assert not trainer.calibrates
    rows = trainer.run()
    assert NO_CALIBRATION in logged
    assert not any(line.startswith("calibrating BN") for line in logged)
    assert any("validation (no BatchNorm: not calibrated)" in line for line in logged)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if r["kind"] == "val")
    assert 0.0 <= val["top1@0.25"] <= 1.0 and 0.0 <= val["top1@1"] <= 1.0
    assert [r["width"] for r in rows] == [0.25, 0.5, 1.0]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 1.0 for r in rows)
    assert rows[0]["macs"] < rows[-1]["macs"]

    model = usnet.load(out / FINAL)
    assert all(usnet.is_calibrated(model, w) for w in (0.25, 0.33, 1.0))

    # usnet calibrate: nothing to do, exit 0, the checkpoint untouched; --out still gets a copy
    monkeypatch.undo()
    mtime = (out / FINAL).stat().st_mtime_ns
    assert main(["calibrate", str(out / FINAL), "--widths", "0.3,0.6"]) == 0
    assert "nothing to calibrate" in capsys.readouterr().out
    assert (out / FINAL).stat().st_mtime_ns == mtime
    assert (
        main(["calibrate", str(out / FINAL), "--widths", "0.3", "--out", str(tmp_path / "c.pt")])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    copy = usnet.load(tmp_path / "c.pt")
    for a, b in zip(copy.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert main(["calibrate", str(out / FINAL), "--widths", "1.5"]) == 2  # a bad width: an error

    # usnet eval evaluates the spectrum without calibrating (the same numbers as training)
    assert main(["eval", str(out / FINAL), "--widths", "0.25,1.0", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert [r["top1"] for r in evaluated] == [rows[0]["top1"], rows[-1]["top1"]]
