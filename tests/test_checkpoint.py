"""usnet.save / usnet.load: one-file checkpoints of slimmable models."""

from __future__ import annotations

import os

import pytest
import torch
from usnet_testing import assert_same_tensors, liven, params_snapshot, tiny_slimmable, zoo_model

import usnet
from usnet.nn.norm import SlimmableBatchNorm2d

WIDTHS = [0.25, 0.5, 0.8, 1.0]


def calibrated_zoo_model():
    model = liven(zoo_model("us_mobilenet_v2"))
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    usnet.calibrate(model, data, widths=[0.35, 0.5, 0.8, 1.0], num_images=16)
    return model


def eval_outputs(model, widths, x):
    model.eval()
    out = {}
    with torch.no_grad():
        for w in widths:
            with usnet.width(model, w):
                out[w] = model(x)
    return out


def bn_caches(model):
    return {
        name: {k: (m.clone(), v.clone()) for k, (m, v) in layer.width_stats.items()}
        for name, layer in model.named_modules()
        if isinstance(layer, SlimmableBatchNorm2d)
    }


def assert_same_caches(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key][0], b[name][key][0])
            assert torch.equal(a[name][key][1], b[name][key][1])


def test_round_trip_zoo_model(tmp_path):
    model = calibrated_zoo_model()
    usnet.set_width(model, 0.5)
    path = usnet.save(model, tmp_path / "model.pt", extra={"epoch": 3})
    assert path == tmp_path / "model.pt" and path.is_file()
    loaded = usnet.load(path)
    assert loaded is not model
    assert type(loaded) is type(model)
    assert usnet.channel_plan(loaded) == usnet.channel_plan(model)
    assert usnet.get_width(loaded) == 0.5
    assert loaded.features[0][0].active_out_channels == 16
    assert usnet.state.get_state(loaded).arch == usnet.state.get_state(model).arch
    assert_same_tensors(params_snapshot(loaded), params_snapshot(model))
    caches = bn_caches(model)
    assert sum(len(c) for c in caches.values()) > 0
    assert_same_caches(bn_caches(loaded), caches)
    x = torch.randn(3, 1, 28, 28)
    widths = [0.35, 0.5, 0.8, 1.0]
    expected, got = eval_outputs(model, widths, x), eval_outputs(loaded, widths, x)
    for w in widths:
        assert expected[w].abs().max() > 0.05
        assert torch.equal(got[w], expected[w]), w
    assert not usnet.is_calibrated(loaded, 0.6)
    payload = torch.load(path, weights_only=True)  # zoo checkpoints hold only plain data
    assert payload["extra"] == {"epoch": 3}
    assert "module" not in payload


def test_round_trip_mapping_width(tmp_path):
    model = zoo_model("us_resnet18")
    roots = usnet.channel_plan(model).root_names
    width = {roots[0]: 0.25, roots[1]: 0.5}
    usnet.set_width(model, width)
    loaded = usnet.load(usnet.save(model, tmp_path / "m.pt"))
    assert usnet.get_width(loaded) == width
    assert usnet.channels_at(loaded) == usnet.channels_at(model)
    assert loaded.conv1.active_out_channels == 16


def test_round_trip_converted_model(tmp_path):
    model = liven(tiny_slimmable(channels=32))
    usnet.calibrate(model, [torch.randn(16, 3, 8, 8)], widths=WIDTHS, num_images=16)
    usnet.set_width(model, 0.25)
    assert usnet.state.get_state(model).arch is None
    loaded = usnet.load(usnet.save(model, tmp_path / "custom.ckpt"))
    assert type(loaded) is torch.nn.Sequential
    assert usnet.get_width(loaded) == 0.25
    assert usnet.channel_plan(loaded) == usnet.channel_plan(model)
    assert_same_tensors(params_snapshot(loaded), params_snapshot(model))
    assert_same_caches(bn_caches(loaded), bn_caches(model))
    assert len(loaded[1].width_stats) == 3
    x = torch.randn(4, 3, 8, 8)
    expected, got = eval_outputs(model, WIDTHS, x), eval_outputs(loaded, WIDTHS, x)
    for w in WIDTHS:
        assert torch.equal(got[w], expected[w]), w


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny_slimmable()
    path = tmp_path / "ckpt.pt"
    usnet.save(model, path)
    good = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    usnet.set_width(model, 0.5)
    with pytest.raises(OSError, match="disk full"):
        usnet.save(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert usnet.get_width(usnet.load(path)) == 1.0


def test_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch):
    model = tiny_slimmable()
    path = tmp_path / "ckpt.pt"
    usnet.save(model, path)
    good = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        usnet.save(model, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert path.read_bytes() == good
    # a successful save replaces the file and leaves nothing else behind
    usnet.set_width(model, 0.5)
    usnet.save(model, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert usnet.get_width(usnet.load(path)) == 0.5


def test_save_creates_directories(tmp_path):
    path = usnet.save(tiny_slimmable(), tmp_path / "a" / "b" / "m.pt")
    assert path.is_file()


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        usnet.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        usnet.load(tmp_path)  # a directory is not a checkpoint


def test_load_random_bytes(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="garbage.pt"):
        usnet.load(path)


@pytest.mark.parametrize(
    "payload, pattern",
    [
        ({"a": 1}, "not a usnet checkpoint"),
        (torch.zeros(3), "not a usnet checkpoint"),
        ({"format": "usnet-checkpoint", "version": 99}, "version 99"),
        ({"format": "usnet-checkpoint", "version": 1, "usnet": {}}, "missing state_dict, bn_stats"),
    ],
)
def test_load_non_checkpoint(tmp_path, payload, pattern):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=pattern) as info:
        usnet.load(path)
    assert "other.pt" in str(info.value)


def test_load_tampered_state_dict(tmp_path):
    path = usnet.save(zoo_model("us_resnet18"), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"m\.pt.*weights do not match"):
        usnet.load(path)
    payload["state_dict"].pop("conv1.weight")
    torch.save(payload, path)
    with pytest.raises(ValueError, match="weights do not match"):
        usnet.load(path)


def test_load_plan_mismatch(tmp_path):
    path = usnet.save(zoo_model("us_resnet18"), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["usnet"]["plan"]["width_range"] = [0.5, 1.0]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="channel plan differs"):
        usnet.load(path)


def test_load_bn_stats_for_unknown_layer(tmp_path):
    model = zoo_model("us_resnet18")
    usnet.calibrate(model, [torch.randn(4, 1, 28, 28)], widths=[0.5], num_images=4)
    path = usnet.save(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["bn_stats"]["nope"] = payload["bn_stats"]["bn1"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        usnet.load(path)
