"""usnet on CUDA: training steps, calibration, export, select, NCCL, checkpoints across devices.

Every test here needs a CUDA device and is skipped without one (CI has none); run them with
``pytest -m cuda`` on a GPU machine. Comparisons with the CPU switch TF32 off (PyTorch's default
lets cuDNN use TF32 for float32 convolutions, which rounds to ~1e-3): with it off, CUDA and CPU
float32 agree to float rounding, so the tolerances below are those of float32, not of TF32.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from usnet_testing import liven, zoo_model

import usnet
from usnet.cli import main
from usnet.evaluation import eval_forward
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.sandwich import sandwich_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 convolutions and matmuls in full precision (no TF32) for the duration of a test."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def batch(n=32, channels=1, size=28, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(
        0, classes, (n,), generator=g
    )


def grads(model):
    return {
        name: p.grad.detach().float().cpu()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def worst_relative(got: dict, ref: dict) -> float:
    """The largest relative difference of any one parameter's gradient."""
    assert got.keys() == ref.keys()
    return max(relative(got[k], ref[k]) for k in ref if ref[k].norm() > 0)


def overall_relative(got: dict, ref: dict) -> float:
    """Relative difference of all gradients as one vector (low precision: per-layer errors of
    small gradients are large, the step's direction is what matters)."""
    assert got.keys() == ref.keys()
    return relative(
        torch.cat([got[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])
    )


# -- sandwich step ---------------------------------------------------------------------------------
WIDTHS = [1.0, 0.25, 0.6, 0.4]


def _step(model, images, labels, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return sandwich_step(
        model, images, labels, optimizer, WIDTHS, InplaceDistillationLoss(), **kwargs
    )


def test_sandwich_step_fp32_on_cuda_equals_the_cpu():
    cpu = zoo_model("us_convnet").train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    images, labels = batch()
    ref = _step(cpu, images, labels)
    got = _step(gpu, images.to(CUDA), labels.to(CUDA))
    assert got.losses == pytest.approx(ref.losses, rel=1e-4)
    assert worst_relative(grads(gpu), grads(cpu)) < 1e-3
    assert usnet.get_width(gpu) == 1.0


def _dtypes_seen(model):
    """Record the dtype of every convolution's output during forward passes."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip
    return seen, hooks


def test_sandwich_step_bf16_autocast_on_cuda():
    cpu = zoo_model("us_convnet").train()
    gpu = copy.deepcopy(cpu).to(CUDA).to(memory_format=torch.channels_last)
    images, labels = batch()
    ref = _step(cpu, images, labels)
    seen, hooks = _dtypes_seen(gpu)
    got = _step(gpu, images.to(CUDA).contiguous(memory_format=torch.channels_last), labels.to(CUDA),
                autocast_dtype=torch.bfloat16)  # fmt: skip
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast really ran the convolutions in bf16
    assert all(p.grad.dtype == torch.float32 for p in gpu.parameters())
    assert got.losses == pytest.approx(ref.losses, rel=0.05)
    # bf16 keeps 8 bits of mantissa: the step within a few percent, not float32 rounding
    assert overall_relative(grads(gpu), grads(cpu)) < 0.1


def test_sandwich_step_fp16_with_grad_scaler_on_cuda():
    cpu = zoo_model("us_convnet").train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    images, labels = batch()
    _step(cpu, images, labels)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    seen, hooks = _dtypes_seen(gpu)
    scaled_grads = []
    hook = next(gpu.parameters()).register_hook(
        lambda g: scaled_grads.append(g.float().norm().item())
    )
    got = _step(gpu, images.to(CUDA), labels.to(CUDA), autocast_dtype=torch.float16, scaler=scaler)
    hook.remove()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.float16}
    assert all(torch.isfinite(torch.tensor(got.losses)))
    # the backward pass saw gradients scaled by 2^12; after the step they are unscaled
    first = next(gpu.parameters()).grad.float().norm().item()
    assert scaled_grads and scaled_grads[0] > 100 * first
    assert overall_relative(grads(gpu), grads(cpu)) < 0.02
    assert scaler.get_scale() == 2.0**12  # finite gradients: the scale stays (growth after 2000)


# -- calibration -----------------------------------------------------------------------------------
def test_calibration_on_cuda_equals_the_cpu():
    cpu = liven(zoo_model("us_mobilenet_v2"))
    gpu = copy.deepcopy(cpu).to(CUDA)
    images = torch.randn(192, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.2
    data = list(images.split(64))
    widths = [0.35, 0.6, 1.0]
    usnet.calibrate(cpu, data, widths, num_images=192)
    usnet.calibrate(gpu, data, widths, num_images=192)  # batches moved to the model's device
    probe = images[:16]
    for w in widths:
        ref = eval_forward(cpu, w, probe)
        got = eval_forward(gpu, w, probe.to(CUDA)).cpu()
        assert relative(got, ref) < 1e-4, w
    moved = copy.deepcopy(cpu).to(CUDA)  # statistics calibrated on the CPU move with the model
    for w in widths:
        ref = eval_forward(cpu, w, probe)
        assert relative(eval_forward(moved, w, probe.to(CUDA)).cpu(), ref) < 1e-4, w
    cpu_bns = [m for m in cpu.modules() if isinstance(m, usnet.nn.norm.SlimmableBatchNorm2d)]
    gpu_bns = [m for m in gpu.modules() if isinstance(m, usnet.nn.norm.SlimmableBatchNorm2d)]
    for w in widths[:2]:
        with usnet.width(cpu, w), usnet.width(gpu, w):
            for a, b in zip(cpu_bns, gpu_bns):
                mean_a, var_a = a.current_stats()
                mean_b, var_b = b.current_stats()
                torch.testing.assert_close(mean_b.cpu(), mean_a, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(var_b.cpu(), var_a, rtol=1e-4, atol=1e-5)


# -- export ----------------------------------------------------------------------------------------
EXPORT_CASES = {
    **{name: (lambda name=name: zoo_model(name), (1, 28, 28)) for name in usnet.models.list_models()},
    "torchvision_resnet18": (lambda: usnet.slimmable(torchvision.models.resnet18(num_classes=10),
                                                     input_size=(1, 3, 64, 64)), (3, 64, 64)),
    "torchvision_mobilenet_v3_small": (
        lambda: usnet.slimmable(torchvision.models.mobilenet_v3_small(num_classes=10),
                                input_size=(1, 3, 64, 64)), (3, 64, 64)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_equals_the_slimmable_model_on_cuda(name):
    torch.manual_seed(0)
    builder, shape = EXPORT_CASES[name]
    model = liven(builder()).to(CUDA)
    lo, hi = usnet.channel_plan(model).width_range
    gen = torch.Generator().manual_seed(7)
    widths = [lo, hi, round(lo + (hi - lo) * torch.rand((), generator=gen).item(), 4)]
    images = torch.randn(8, *shape, generator=gen).to(CUDA)
    usnet.calibrate(model, list(images.split(4)), widths, num_images=8)
    for w in widths:
        plain = usnet.export(model, w)
        assert next(plain.parameters()).is_cuda
        ref = eval_forward(model, w, images)
        with torch.no_grad():
            got = plain(images)
        assert relative(got, ref) < 1e-4, w


def test_export_artifact_from_a_cuda_model(tmp_path):
    """Artifacts are CPU files, verified against the model's CPU logits, whatever its device."""
    model = liven(zoo_model("us_convnet")).to(CUDA)
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    usnet.calibrate(model, [images], [0.5], num_images=64)
    for fmt, suffix in (("pt", ".pt2"), ("onnx", ".onnx")):
        result = usnet.export_artifact(
            model, 0.5, tmp_path / f"m{suffix}", fmt, input_size=(2, 1, 28, 28)
        )
        assert result.max_abs_diff <= 1e-4
        logits = usnet.load_artifact(tmp_path / f"m{suffix}")(images[:4])
        ref = eval_forward(model, 0.5, images[:4].to(CUDA)).cpu()
        assert relative(logits, ref) < 1e-4
    assert next(model.parameters()).is_cuda  # the model itself stays where it was


# -- checkpoints -----------------------------------------------------------------------------------
def test_save_on_cuda_load_on_the_cpu(tmp_path):
    model = liven(zoo_model("us_resnet18")).to(CUDA)
    images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    usnet.calibrate(model, [images.to(CUDA)], [0.25, 0.7, 1.0], num_images=32)
    usnet.set_width(model, 0.7)
    path = usnet.save(model, tmp_path / "m.pt")
    loaded = usnet.load(path)  # map_location cpu by default
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert usnet.get_width(loaded) == 0.7
    for w in (0.25, 0.7, 1.0):
        ref = eval_forward(model, w, images[:8].to(CUDA)).cpu()
        got = eval_forward(loaded, w, images[:8])
        assert relative(got, ref) < 1e-4, w
    back = usnet.load(path, map_location="cuda")
    assert all(t.is_cuda for t in back.state_dict().values())
    for w in (0.25, 0.7):  # the per-width statistics came along to the GPU too
        ref = eval_forward(model, w, images[:8].to(CUDA))
        assert relative(eval_forward(back, w, images[:8].to(CUDA)), ref) < 1e-5, w


# -- select ----------------------------------------------------------------------------------------
def test_cli_select_max_latency_on_cuda(tmp_path, capsys):
    model = zoo_model("us_convnet")
    path = usnet.save(model, tmp_path / "m.pt")
    argv = ["select", str(path), "--max-latency-ms", "1000", "--device", "cuda", "--widths",
            "0.25,0.5,1.0", "--input-size", "64,1,28,28", "--latency-cache", str(tmp_path / "cache"),
            "--repeats", "5", "--warmup", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["width"] == 1.0 and result["latency"]["measured"] == 3
    assert result["latency"]["device"].startswith("cuda:")
    assert all(0 < c["latency_ms"] < 1000 for c in result["candidates"])
    cache = json.loads(next((tmp_path / "cache" / "latency").iterdir()).read_text())
    assert cache["key"]["device"] == result["latency"]["device"] and cache["key"]["threads"] is None


# -- NCCL ------------------------------------------------------------------------------------------
def test_torchrun_one_process_nccl_trains(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "usnet", "train", str(REPO / "configs" / "fashion_mnist.yaml"), "--out", str(out),
               "--set", "device=cuda", "epochs=1", "data.limit_train=2048", "data.limit_test=500",
               "batch_size=128", "eval.widths=0.25,1.0", "calib.num_images=128",
               "eval.epoch_calib_images=128", "log_every=1"]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = next(r for r in records if r["kind"] == "run")
    assert run["device"].startswith("cuda")
    assert "x 1 processes" in result.stdout
    spectrum = next(r for r in records if r["kind"] == "spectrum")["rows"]
    assert [r["width"] for r in spectrum] == [0.25, 1.0]
    assert all(r["top1"] > 0.3 for r in spectrum)  # 16 steps from chance (0.1): clearly learning
    loaded = usnet.load(out / "model.pt")
    assert next(loaded.parameters()).device.type == "cpu"
