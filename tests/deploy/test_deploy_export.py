"""Deployment artifacts (usnet.export_artifact, usnet export): pt / TorchScript / ONNX files that
compute what the slimmable model computes at their width."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn
from usnet_testing import liven, max_abs_diff, zoo_model

import usnet
from usnet.cli import main
from usnet.deploy.artifact import FORMATS, VerificationError, deployable

MODELS = {
    # name: (builder, input size, widths)
    "us_convnet": (lambda: zoo_model("us_convnet"), (1, 1, 28, 28), (0.25, 0.6, 1.0)),
    "us_mobilenet_v2": (
        lambda: zoo_model("us_mobilenet_v2", in_channels=3),
        (1, 3, 32, 32),
        (0.35, 0.8),
    ),
    "torchvision_resnet18": (
        lambda: usnet.slimmable(
            torchvision.models.resnet18(num_classes=10), input_size=(1, 3, 32, 32)
        ),
        (1, 3, 32, 32),
        (0.25, 0.55),
    ),
}


@functools.lru_cache(maxsize=None)
def calibrated(name: str):
    """A model with O(1) logits, calibrated at its test widths on random images."""
    torch.manual_seed(0)
    builder, size, widths = MODELS[name]
    model = liven(builder())
    gen = torch.Generator().manual_seed(1)
    usnet.calibrate(
        model, [torch.randn(16, *size[1:], generator=gen)], widths=list(widths), num_images=16
    )
    return model, size, widths


def slimmable_logits(model, width, images):
    model.eval()
    with torch.no_grad(), usnet.width(model, width):
        return model(images)


def images_for(size, n=3, seed=5):
    return torch.randn(n, *size[1:], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("format", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_artifact_equals_slimmable_model(name, format, tmp_path):
    model, size, widths = calibrated(name)
    if format == "pt" and name == "us_mobilenet_v2":
        widths = widths[-1:]  # torch.export takes seconds per width of this deep model
    for width in widths:
        path = tmp_path / f"m{FORMATS[format]}"
        result = usnet.export_artifact(model, width, path, format, input_size=size)
        assert path.is_file() and result.path == str(path)
        assert result.max_abs_diff <= result.tolerance == 1e-4
        cost = usnet.profile(model, width, size)
        assert (result.params, result.macs, result.config_id) == (
            cost.params,
            cost.macs,
            cost.config_id,
        )
        # the file on disk, run by its own runtime on another batch size, equals the model
        x = images_for(size)
        expected = slimmable_logits(model, width, x)
        assert expected.abs().max() > 0.05  # logits are not ~0
        got = usnet.load_artifact(path)(x)
        assert got.shape == expected.shape == (3, 10)
        assert max_abs_diff(got, expected) <= 1e-4


def test_onnx_file_is_valid_and_runs_in_onnxruntime(tmp_path):
    model, size, _ = calibrated("torchvision_resnet18")
    path = tmp_path / "r18.onnx"
    usnet.export_artifact(model, 0.55, path, "onnx", input_size=size)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images_for(size, n=5)
    (logits,) = session.run(None, {"input": x.numpy()})
    expected = slimmable_logits(model, 0.55, x).numpy()
    assert logits.shape == (5, 10)
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("format", list(FORMATS))
def test_fused_bn_export(format, tmp_path):
    model, size, _ = calibrated("us_convnet")
    plain = deployable(model, 0.6, fuse_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    result = usnet.export_artifact(
        model, 0.6, tmp_path / "f", format, fuse_bn=True, input_size=size
    )
    assert result.fused_bn and result.tolerance == 1e-3 and result.max_abs_diff <= 1e-3
    unfused = usnet.profile(model, 0.6, size)
    bn_params = sum(m.weight.numel() + m.bias.numel() for m in usnet.export(model, 0.6).modules()
                    if isinstance(m, nn.BatchNorm2d))  # fmt: skip
    assert bn_params > 0
    # folding replaces each BN's weight and bias by a conv bias (the convs here have none)
    assert result.params == unfused.params - bn_params // 2
    assert result.macs == unfused.macs
    x = images_for(size)
    assert (
        max_abs_diff(
            usnet.load_artifact(tmp_path / "f", format)(x), slimmable_logits(model, 0.6, x)
        )
        <= 1e-3
    )


def test_pt_artifact_loads_with_plain_torch(tmp_path):
    model, size, _ = calibrated("us_convnet")
    path = tmp_path / "convnet.pt2"
    usnet.export_artifact(model, 0.25, path, "pt", input_size=size)
    x = images_for(size, n=2)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(n.split('.')[0] in ('usnet', 'torchvision') for n in sys.modules), 'imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    got = torch.load(tmp_path / "y.pt")
    assert max_abs_diff(got, slimmable_logits(model, 0.25, x)) <= 1e-4


def test_non_uniform_width_exports(tmp_path):
    model, size, _ = calibrated("us_convnet")
    width = {name: 0.4 + 0.1 * i for i, name in enumerate(usnet.channel_plan(model).root_names)}
    usnet.calibrate(model, [images_for(size, n=8, seed=9)], widths=[width], num_images=8)
    result = usnet.export_artifact(model, width, tmp_path / "m.onnx", "onnx", input_size=size)
    assert result.width == width and result.max_abs_diff <= 1e-4
    assert result.macs == usnet.profile(model, width, size).macs


def test_failed_verification_writes_nothing(tmp_path):
    model, size, _ = calibrated("torchvision_resnet18")
    path = tmp_path / "r18.onnx"
    # folding BN rounds differently from the slimmable model: a 1e-12 bound cannot hold
    with pytest.raises(
        VerificationError, match=r"differs from the slimmable model by .* tolerance 1e-12"
    ):
        usnet.export_artifact(
            model, 0.55, path, "onnx", fuse_bn=True, input_size=size, tolerance=1e-12
        )
    assert not path.exists() and not list(tmp_path.iterdir())
    result = usnet.export_artifact(model, 0.55, path, "onnx", fuse_bn=True, input_size=size)
    assert 0 < result.max_abs_diff <= 1e-3 and path.is_file()


def test_export_errors(tmp_path):
    model, size, _ = calibrated("us_convnet")
    with pytest.raises(
        ValueError, match="unknown export format 'tflite'; valid: pt, torchscript, onnx"
    ):
        usnet.export_artifact(model, 0.6, tmp_path / "m", "tflite", input_size=size)
    with pytest.raises(ValueError, match="outside the width range"):
        usnet.export_artifact(model, 1.2, tmp_path / "m", "onnx", input_size=size)
    with pytest.raises(usnet.UncalibratedWidthError, match="calibrate"):
        usnet.export_artifact(model, 0.45, tmp_path / "m", "onnx", input_size=size)
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        usnet.export_artifact(model, 0.6, tmp_path / "m", "onnx", input_size=size, tolerance=0)
    assert not list(tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="is a directory"):
        usnet.export_artifact(model, 0.6, tmp_path, "onnx", input_size=size)
    with pytest.raises(ValueError, match="needs format= for bytes; valid: pt, torchscript, onnx"):
        usnet.load_artifact(b"")


def test_export_widths_index(tmp_path):
    model, size, _ = calibrated("us_convnet")
    spectrum = [
        {"width": 0.6, "config_id": usnet.profile(model, 0.6, size).config_id, "top1": 0.875}
    ]
    # 0.25 and 0.26 round to the same channels: one file for both
    rows = usnet.export_widths(model, [0.25, 0.26, 0.6], tmp_path / "out", "torchscript", input_size=size,
                               spectrum=spectrum)  # fmt: skip
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert (
        index["models"] == rows
        and index["format"] == "torchscript"
        and index["input_size"] == [1, 1, 28, 28]
    )
    names = [
        f"w{w:.3f}-{r['config_id']}.torchscript.pt" for w, r in ((0.25, rows[0]), (0.6, rows[2]))
    ]
    assert [r["file"] for r in rows] == names[:1] * 2 + names[1:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", *names]
    assert [r.get("top1") for r in rows] == [None, None, 0.875]
    for r in rows:
        cost = usnet.profile(model, r["width"], size)
        assert (r["params"], r["macs"]) == (cost.params, cost.macs)


def test_export_widths_names_never_collide(tmp_path):
    """0.2776 and 0.2779 both print as 0.278 but are different networks: two files, each its own."""
    model, size, _ = calibrated("us_convnet")
    plan = usnet.channel_plan(model)
    assert f"{0.2776:.3f}" == f"{0.2779:.3f}" and plan.config(0.2776) != plan.config(0.2779)
    usnet.calibrate(model, [images_for(size, n=8, seed=9)], widths=[0.2779], num_images=8)
    rows = usnet.export_widths(model, [0.2776, 0.2779], tmp_path, "torchscript", input_size=size)
    assert len({r["file"] for r in rows}) == 2
    assert json.loads((tmp_path / "index.json").read_text())["models"] == rows
    x = images_for(size)
    for r in rows:
        logits = usnet.load_artifact(tmp_path / r["file"])(x)
        assert max_abs_diff(logits, slimmable_logits(model, r["width"], x)) <= 1e-4


# --- usnet export -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A calibrated US-ConvNet checkpoint with a spectrum (top-1 values as usnet train records them)."""
    model, size, widths = calibrated("us_convnet")
    rows = [{"width": w, "config_id": usnet.profile(model, w, size).config_id, "top1": 0.8 + 0.1 * w}
            for w in widths]  # fmt: skip
    return usnet.save(model, tmp_path_factory.mktemp("ckpt") / "m.pt", extra={"spectrum": rows})


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_one_width(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, _ = run(["export", checkpoint, "--width", 0.6, "--format", "onnx", "--out", out,
                           "--input-size", "1,1,28,28"], capsys)  # fmt: skip
    assert code == 0
    assert (
        "wrote" in stdout and "verified with onnxruntime" in stdout and "tolerance 0.0001" in stdout
    )
    model, size, _ = calibrated("us_convnet")
    x = images_for(size)
    assert max_abs_diff(usnet.load_artifact(out)(x), slimmable_logits(model, 0.6, x)) <= 1e-4
    code, stdout, _ = run(["export", checkpoint, "--width", 0.6, "--format", "pt", "--out", tmp_path / "m.pt2",
                           "--fuse-bn", "--json", "--input-size", "1,1,28,28"], capsys)  # fmt: skip
    result = json.loads(stdout)
    assert code == 0 and result["fused_bn"] and result["tolerance"] == 1e-3
    assert result["macs"] == usnet.profile(model, 0.6, size).macs


def test_cli_export_widths_directory(checkpoint, tmp_path, capsys):
    code, stdout, _ = run(["export", checkpoint, "--widths", "0.25,0.6,1.0", "--format", "pt",
                           "--out", tmp_path / "dir", "--input-size", "1,1,28,28"], capsys)  # fmt: skip
    assert code == 0 and "index.json" in stdout
    index = json.loads((tmp_path / "dir" / "index.json").read_text())
    plan = usnet.channel_plan(calibrated("us_convnet")[0])
    assert [(r["width"], r["file"]) for r in index["models"]] == [
        (w, f"w{w:.3f}-{usnet.config_id(plan.config(w))}.pt2") for w in (0.25, 0.6, 1.0)
    ]
    assert [r["top1"] for r in index["models"]] == pytest.approx([0.825, 0.86, 0.9])


def test_cli_export_calibrates_with_data(checkpoint, tmp_path, capsys):
    code, stdout, _ = run(["export", checkpoint, "--width", 0.45, "--format", "torchscript",
                           "--out", tmp_path / "m.ts", "--dataset", "fashion_mnist",
                           "--calib-images", 64], capsys)  # fmt: skip
    assert code == 0, stdout
    assert "calibrating 1 widths on 64 training images" in stdout and (tmp_path / "m.ts").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--width", "0.6", "--format", "tflite"],
            "unknown export format 'tflite'; valid: pt, torchscript, onnx",
        ),
        (
            ["--width", "1.5", "--format", "onnx"],
            "width 1.5 is outside the width range [0.25, 1.0]",
        ),
        (["--width", "0.45", "--format", "onnx"], "width 0.45 is not calibrated in"),
        (["--width", '{"nope": 0.5}', "--format", "onnx"], "unknown channel group 'nope'"),
        (["--format", "onnx"], "give one of --width W (one file) or --widths SPEC"),
    ],
)
def test_cli_export_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
    code, _, err = run(["export", checkpoint, *args, "--out", tmp_path / "x"], capsys)
    lines = err.strip().splitlines()
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith("usnet: error: ")
        and message in lines[0]
    )
    assert not list(tmp_path.iterdir())
