"""README "Train your own model", run as written: the config and its commands through the CLI,
the Python example by ``exec`` (only its sizes made small), and the claim that the public API in a
hand-written loop gives ``usnet train``'s weights exactly."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from test_models_by_name import colour_folder
from torch.utils.data import DataLoader, Subset
from torchvision import datasets

import usnet
from usnet.train.config import load_config
from usnet.train.data import IMAGENET_MEAN, IMAGENET_STD
from usnet.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CHANCE = 1 / 3  # the colour folder's three classes
# The README's sizes (224 px, 30 epochs, batch 64) made small for 2 CPU cores; nothing else changes.
SMALL = ["data.image_size=32", "epochs=3", "batch_size=12", "calib.num_images=36",
         "eval.every_epoch=false"]  # fmt: skip


def readme_block(name: str) -> str:
    """The fenced block after ``<!-- test: NAME -->`` in README.md (exactly one)."""
    found = re.findall(rf"<!-- test: {name} -->\n```\w+\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)  # fmt: skip
    assert len(found) == 1, f"README.md holds {len(found)} blocks marked {name!r}"
    return found[0]


def usnet_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # one intra-op thread, as conftest.py gives the tests' own process (busy 2-core machine)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("USNET_TEST_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "usnet", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env=env)  # fmt: skip
    assert done.returncode == 0, f"usnet {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def val_images(root: Path, size: int = 32) -> torch.Tensor:
    """The folder's val/ images as the trainer evaluates them (resize, centre crop, normalize)."""
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.Resize(int(round(size / 0.875))), T.CenterCrop(size), T.ToImage(),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    return torch.stack([image for image, _ in datasets.ImageFolder(str(root / "val"), tf)])


def test_config_example_trains_evaluates_exports_and_selects(tmp_path):
    colour_folder(tmp_path / "my_images", per_class=12)
    (tmp_path / "my_images.yaml").write_text(readme_block("train-your-own-config") + "\n")
    commands = [shlex.split(line.split("#")[0]) for line in
                readme_block("train-your-own-commands").splitlines() if line.strip()]  # fmt: skip
    assert [c[:2] for c in commands] == [["usnet", "train"], ["usnet", "eval"],
                                         ["usnet", "export"], ["usnet", "select"]]  # fmt: skip
    train, evaluate, export, select = (c[1:] for c in commands)
    usnet_cli(*train, "--set", *SMALL, cwd=tmp_path)
    run = tmp_path / "runs" / "my_images"
    spectrum = json.loads((run / "spectrum.json").read_text())
    assert [r["width"] for r in spectrum] == [0.25, 0.5, 0.75, 1.0]
    assert all(r["top1"] > 2 * CHANCE for r in spectrum), spectrum
    # the model is recorded as data: the final checkpoint loads without unpickling code
    payload = torch.load(run / "model.pt", weights_only=True)
    assert "module" not in payload
    assert payload["usnet"]["arch"]["source"] == "timm"
    assert payload["usnet"]["arch"]["kwargs"] == {"drop_rate": 0.1}

    rows = json.loads(usnet_cli(*evaluate, "--json", cwd=tmp_path).stdout)
    assert [(r["width"], r["top1"]) for r in rows] == [(r["width"], r["top1"]) for r in spectrum]

    usnet_cli(*export, cwd=tmp_path)
    exported = torch.export.load(tmp_path / export[export.index("--out") + 1]).module()
    model = usnet.load(run / "model.pt").eval()  # rebuilt from the record
    images = val_images(tmp_path / "my_images")
    with usnet.width(model, float(export[export.index("--width") + 1])), torch.no_grad():
        expected = model(images)
    assert (exported(images) - expected).abs().max().item() <= 1e-5
    assert torch.equal(exported(images).argmax(1), expected.argmax(1))

    # the budget made to fit 32 px images (the README's 600M is for 224 px); a few widths only
    budget = usnet.profile(model, 0.5).macs
    select[select.index("--max-macs") + 1] = str(budget)
    chosen = json.loads(usnet_cli(*select, "--widths", "0.25:1.0:0.125", "--json", cwd=tmp_path).stdout)  # fmt: skip
    assert chosen["width"] == 0.5 and chosen["macs"] == budget
    assert usnet.profile(model, 0.625).macs > budget  # the next width tried does not fit


@pytest.mark.filterwarnings("ignore:calibration data holds only")  # 72 images, not 1024
def test_python_example_trains_calibrates_and_exports(tmp_path, monkeypatch):
    colour_folder(tmp_path / "my_images")
    code = readme_block("train-your-own-python")
    sizes = 'root, size, epochs, batch_size = "my_images", 224, 30, 64'
    assert code.count(sizes) == 1
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code.replace(sizes, 'root, size, epochs, batch_size = "my_images", 32, 3, 12'),
                 "README.md:train-your-own-python", "exec"), namespace)  # fmt: skip
    spectrum, model, small = namespace["spectrum"], namespace["model"], namespace["small"]
    assert sorted(spectrum) == [0.25, 0.5, 0.75, 1.0]
    assert all(top1 > 2 * CHANCE for top1 in spectrum.values()), spectrum
    images = val_images(tmp_path / "my_images")
    assert not usnet.is_slimmable(small) and type(small).__module__.startswith("timm.")
    with usnet.width(model, 0.5), torch.no_grad():
        expected = model.eval()(images)
        assert (small.eval()(images) - expected).abs().max().item() <= 1e-5
    again = usnet.load(tmp_path / "my_usnet.pt").eval()  # weights, plan and BN statistics
    with usnet.width(again, 0.5), torch.no_grad():
        assert torch.equal(again(images), expected)


# -- the public API in a hand-written loop against usnet train -----------------------------------
SEED, EPOCHS = 3, 2


def hand_loop(root: Path, sampler_seed: int = SEED, order_seed: int = SEED) -> torch.nn.Module:
    """The README's loop with ``usnet train``'s seeding and data order written out: the weights
    initialized right after ``torch.manual_seed(seed)``; epoch ``e``'s order a permutation seeded
    with ``seed * 100_003 + e`` and its augmentation and dropout drawn after
    ``torch.manual_seed(seed * 100_003 + e)``; the widths from the rule's sampler seeded with
    ``seed``."""
    from torchvision.transforms import v2 as T

    size, batch_size = 32, 12
    norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # fmt: skip
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    train_set = datasets.ImageFolder(f"{root}/train", train_tf)
    torch.manual_seed(SEED)
    plain = timm.create_model("resnet18", num_classes=len(train_set.classes), drop_rate=0.1)
    model = usnet.slimmable(plain, width_range=(0.25, 1.0), input_size=(1, 3, size, size))
    rule = usnet.SandwichRule(model, num_widths=4, seed=sampler_seed, label_smoothing=0.1)
    optimizer = usnet.make_optimizer(model, lr=0.002, weight_decay=0.05, kind="adamw")
    steps = len(train_set) // batch_size
    scheduler = usnet.make_scheduler(optimizer, total_steps=EPOCHS * steps, warmup_steps=steps,
                                     schedule="cosine")  # fmt: skip
    model.train()
    for epoch in range(EPOCHS):
        epoch_seed = order_seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(epoch_seed))
        loader = DataLoader(Subset(train_set, order.tolist()), batch_size, drop_last=True)
        for images, labels in loader:
            rule.step(images, labels, optimizer)
            scheduler.step()
    return model


def test_public_api_loop_gives_usnet_trains_weights_exactly(tmp_path):
    root = colour_folder(tmp_path / "my_images", per_class=12)  # 36 images: 3 steps per epoch
    (tmp_path / "my_images.yaml").write_text(readme_block("train-your-own-config") + "\n")
    config = load_config(tmp_path / "my_images.yaml", [f"data.root={root}", *SMALL,
                         f"epochs={EPOCHS}", f"seed={SEED}", "eval.widths=0.25,1.0"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda s: None)
    trainer.run()
    assert trainer.step == EPOCHS * 3
    trained = dict(usnet.load(tmp_path / "run" / "model.pt").named_parameters())
    ours = dict(hand_loop(root).named_parameters())
    assert trained.keys() == ours.keys()
    assert all(torch.equal(trained[k], ours[k]) for k in trained), max(
        (trained[k] - ours[k]).abs().max().item() for k in trained
    )
    # the comparison can fail: another sampler seed or another data order moves the weights
    for wrong in (hand_loop(root, sampler_seed=SEED + 1), hand_loop(root, order_seed=SEED + 1)):
        moved = dict(wrong.named_parameters())
        assert max((trained[k] - moved[k]).abs().max().item() for k in trained) > 1e-3
