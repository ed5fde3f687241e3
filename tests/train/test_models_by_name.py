"""Models users bring, named in the run config: ``torchvision:NAME``, ``timm:NAME`` and
``package.module:callable``, converted on the fly, trained, checkpointed as plain data (no
pickled code) and rebuilt by every command that reads the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import usnet
from usnet.errors import ConfigError
from usnet.train.config import load_config
from usnet.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
FASHION = REPO / "configs" / "fashion_mnist.yaml"
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def colour_folder(root: Path, per_class: int = 24) -> Path:
    """Three classes of 32 px images, one colour each plus noise: learnable in a few steps."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", 8)):
        for label, colour in enumerate(COLOURS):
            directory = root / split / f"class{label}"
            directory.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 50, (36, 36, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray((torch.tensor(colour, dtype=torch.uint8) + noise).numpy()).save(
                    directory / f"{i}.png"
                )
    return root


def folder_config(root: Path, model: str, *extra: str):
    return load_config(FASHION, [
        f"model={model}", "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
        "epochs=3", "batch_size=12", "optimizer=adamw", "lr=0.003", "warmup_epochs=0", "num_widths=3",
        "eval.widths=0.25:1.0:0.25", "eval.every_epoch=false", "calib.num_images=48",
        "calib.batch_size=24", *extra,
    ])  # fmt: skip


def pickled_globals(path: Path) -> set[str]:
    import pickletools

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_torchvision_model_trains_exports_and_selects_from_its_checkpoint(tmp_path):
    root = colour_folder(tmp_path / "folder")
    out = tmp_path / "run"
    rows = Trainer(folder_config(root, "torchvision:mobilenet_v3_small"), out, progress=False,
                   log=lambda s: None).run()  # fmt: skip
    assert [r["width"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert all(r["top1"] > 0.6 for r in rows), [r["top1"] for r in rows]  # chance: 1/3
    # the checkpoint describes the model as data: no module, no class of the model pickled
    payload = torch.load(out / "model.pt", weights_only=True)
    assert "module" not in payload
    assert payload["usnet"]["arch"]["source"] == "torchvision"
    assert not any("torchvision.models" in g for g in pickled_globals(out / "model.pt"))
    model = usnet.load(out / "model.pt")
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    with usnet.width(model, 0.5), torch.no_grad():
        expected = model(images)
    plain = usnet.export(model, 0.5)
    assert torch.allclose(plain.eval()(images), expected, atol=1e-5)
    # the commands rebuild it from the record
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per test process, as conftest
    run = lambda *a: subprocess.run([sys.executable, "-m", "usnet", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    exported = run("export", str(out / "model.pt"), "--width", "0.5", "--format", "onnx",
                   "--out", str(tmp_path / "m.onnx"))  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    selected = run("select", str(out / "model.pt"), "--max-macs", "2M", "--json",
                   "--widths", "0.25:1.0:0.25")  # fmt: skip
    assert selected.returncode == 0, selected.stderr
    assert 0.25 <= json.loads(selected.stdout)["width"] < 1.0


def test_timm_model_trains_above_chance(tmp_path):
    root = colour_folder(tmp_path / "folder")
    rows = Trainer(folder_config(root, "timm:resnet18"), tmp_path / "run", progress=False,
                   log=lambda s: None).run()  # fmt: skip
    assert all(r["top1"] > 0.6 for r in rows), [r["top1"] for r in rows]
    model = usnet.load(tmp_path / "run" / "model.pt")
    assert type(model).__module__.startswith("timm.")  # the user's own class, rebuilt


def build_tiny(num_classes: int = 10, hidden: int = 16) -> torch.nn.Module:
    """A user's builder (``model: test_models_by_name:build_tiny`` in a config)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, hidden, 3, padding=1), torch.nn.BatchNorm2d(hidden), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(hidden, num_classes),
    )  # fmt: skip


def not_a_model(num_classes: int = 10):
    return "a string"


def test_a_users_callable_builds_with_its_kwargs_and_rebuilds_from_the_record():
    from usnet.models.sources import build_model, parse_model, rebuild

    spec = parse_model("test_models_by_name:build_tiny", {"hidden": 24})
    model = build_model(spec, num_classes=4, in_channels=1, input_size=(1, 1, 28, 28),
                        width_range=(0.25, 1.0))  # fmt: skip
    assert model[0].out_channels == 24 and model[-1].out_features == 4
    again = rebuild(usnet.state.get_state(model).arch)
    assert usnet.channel_plan(again) == usnet.channel_plan(model)


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        ("torchvision:mobilenet_v3_smal", {}, "unknown torchvision classification model "
         "'mobilenet_v3_smal'; did you mean mobilenet_v3_small"),
        ("timm:resnet181", {}, "unknown timm model 'resnet181'; did you mean resnet18"),
        ("us_convnett", {}, "unknown model 'us_convnett'; did you mean us_convnet"),
        ("test_models_by_name:build_tiny", {"width": 3}, "'width' is not an argument of it; it "
         "takes hidden, num_classes"),
        ("no_such_package.models:build", {}, "cannot import 'no_such_package.models'"),
        ("test_models_by_name:missing", {}, "has no callable 'missing'"),
    ],
)  # fmt: skip
def test_bad_model_names_and_kwargs_are_refused_before_any_work(model, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(FASHION, [f"model={model}", f"model_kwargs={json.dumps(kwargs)}"])


def test_a_callable_that_returns_no_module_or_does_not_convert_is_named(tmp_path):
    config = load_config(FASHION, ["model=test_models_by_name:not_a_model", "data.limit_train=64"])
    with pytest.raises(ValueError, match="returned a str, not a torch.nn.Module"):
        Trainer(config, tmp_path / "r", progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="convert options apply to models converted on the fly"):
        load_config(FASHION, ["convert.divisor=4"])  # the default zoo model
