"""usnet.search_width / usnet search: greedy non-uniform widths under a MACs budget."""

from __future__ import annotations

import json

import pytest
import torch
from usnet_testing import liven, zoo_model

import usnet
from usnet.cli import main
from usnet.deploy.search import search_width
from usnet.nn.norm import SlimmableBatchNorm2d

SIZE = (1, 1, 28, 28)


def data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def stats_keys(model):
    return {
        k for m in model.modules() if isinstance(m, SlimmableBatchNorm2d) for k in m.width_stats
    }


def test_search_ends_under_budget_with_greedy_steps():
    model = liven(zoo_model("us_convnet"))
    calib, _ = data(32, 0)
    heldout = data(48, 1)
    usnet.calibrate(model, [calib], widths=[0.5], num_images=32)
    before = stats_keys(model)
    usnet.set_width(model, 0.7)
    full = usnet.profile(model, 1.0, SIZE).macs
    budget = int(0.6 * full)
    result = search_width(model, [calib], heldout, max_macs=budget, input_size=SIZE, step=0.25)
    plan = usnet.channel_plan(model)
    width = result.width
    assert set(width) == set(plan.root_names)
    assert all(0.25 <= v <= 1.0 for v in width.values()) and len(set(width.values())) > 1
    assert result.result.macs == usnet.profile(model, width, SIZE).macs <= budget
    # each step narrows one group and lowers the MACs; the last one is the first under budget
    macs = [full] + [s["macs"] for s in result.steps]
    assert all(a > b for a, b in zip(macs, macs[1:]))
    assert macs[-1] <= budget < macs[-2]
    for s in result.steps:  # the kept narrowing scored best among those tried at its step
        best = max(s["tried"], key=lambda t: (t["heldout_top1"], -t["heldout_loss"], -t["macs"]))
        assert (best["group"], best["multiplier"]) == (s["group"], s["multiplier"])
        assert len(s["tried"]) >= 2
    # the held-out score is what the model computes at that width with its calibrated BN
    model.eval()
    with torch.no_grad(), usnet.width(model, width):
        top1 = (model(heldout[0]).argmax(1) == heldout[1]).float().mean().item()
    assert result.result.heldout_top1 == pytest.approx(top1)
    # uniform comparison: the widest uniform width within the same budget
    uniform = result.uniform
    assert isinstance(uniform.width, float) and uniform.macs <= budget
    assert usnet.select_width(model, max_macs=budget, input_size=SIZE).width == uniform.width
    # the model keeps its width and only the BN statistics of the two answers were added
    assert usnet.get_width(model) == 0.7
    keys = {usnet.config_key(plan.config(width)), usnet.config_key(plan.config(uniform.width))}
    assert stats_keys(model) == before | keys
    assert json.loads(json.dumps(result.to_dict()))["width"] == width


def bn_stats(model):
    """Every BatchNorm's per-configuration statistics and its own running buffers (full width)."""
    return {(name, key): [t.clone() for t in value]
            for name, m in model.named_modules() if isinstance(m, SlimmableBatchNorm2d)
            for key, value in [*m.width_stats.items(), (None, (m.running_mean, m.running_var, m.num_batches_tracked))]}  # fmt: skip


def test_search_keeps_statistics_the_model_had():
    """Calibrations made before the search (the full width's own buffers, the uniform answer, any
    other width) are bit-identical after it, though the search recalibrates them on its sample;
    only the result's statistics, which the model lacked, are added."""
    model = liven(zoo_model("us_convnet"))
    size = (4, 1, 28, 28)  # MACs are per image: the batch of 4 changes nothing
    budget = int(0.6 * usnet.profile(model, 1.0, SIZE).macs)
    uniform = usnet.select_width(model, max_macs=budget, input_size=SIZE).width
    usnet.calibrate(model, [data(32, 7)[0]], widths=[1.0, 0.5, uniform], num_images=32)
    before = bn_stats(model)
    result = search_width(model, [data(32, 0)[0]], data(48, 1), max_macs=budget, input_size=size,
                          step=0.25)  # fmt: skip
    assert result.uniform.width == uniform
    assert result.result.macs == usnet.profile(model, result.width, SIZE).macs
    after = bn_stats(model)
    key = usnet.config_key(usnet.channel_plan(model).config(result.width))
    assert {k for k in after if k[1] != key} == set(before)
    for k, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[k])), k
    assert any(k[1] == key for k in after)


def test_search_within_budget_from_the_start_and_errors():
    model = zoo_model("us_convnet")
    calib, _ = data(16, 0)
    result = search_width(model, [calib], data(16, 1), max_macs=10**9, input_size=SIZE)
    assert (
        result.steps == [] and set(result.width.values()) == {1.0} and result.uniform.width == 1.0
    )
    with pytest.raises(
        ValueError,
        match=r"no width fits the budget: the narrowest, width 0.25, needs 1.41M MACs > 1.00M",
    ):
        search_width(model, [calib], data(16, 1), max_macs=1_000_000, input_size=SIZE)
    with pytest.raises(ValueError, match=r"step must be in \(0, 0.75\]"):
        search_width(model, [calib], data(16, 1), max_macs=10**7, input_size=SIZE, step=0)


def test_cli_search_then_export(tmp_path, capsys):
    model = usnet.models.us_convnet(num_classes=10, in_channels=1, small_input=True)
    path = usnet.save(model, tmp_path / "m.pt")
    full = usnet.profile(model, 1.0, SIZE).macs
    args = ["search", path, "--max-macs", int(0.8 * full), "--dataset", "fashion_mnist", "--step", "0.25",
            "--calib-images", 32, "--heldout-images", 32, "--test-images", 64, "--out", tmp_path / "r.json",
            "--save", tmp_path / "searched.pt"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "searched" in out and "uniform" in out and "wrote result" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["result"]["macs"] <= 0.8 * full and report["uniform"]["macs"] <= 0.8 * full
    assert set(report["test_top1"]) == {"searched", "uniform"} and report["test_images"] == 64
    # the searched width exports like any width, from the saved checkpoint's BN statistics
    assert main(["export", str(tmp_path / "searched.pt"), "--width", str(tmp_path / "r.json"),
                 "--format", "onnx", "--out", str(tmp_path / "s.onnx"), "--input-size", "1,1,28,28",
                 "--json"]) == 0  # fmt: skip
    exported = json.loads(capsys.readouterr().out)
    assert exported["width"] == report["width"] and exported["macs"] == report["result"]["macs"]
    assert exported["max_abs_diff"] <= 1e-4


def test_cli_search_errors_are_one_line(tmp_path, capsys):
    path = usnet.save(zoo_model("us_convnet"), tmp_path / "m.pt")
    assert main(["search", str(path), "--max-macs", "1M", "--dataset", "fashion_mnist",
                 "--calib-images", "16", "--heldout-images", "16"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no width fits the budget" in err[0]
