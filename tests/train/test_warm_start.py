"""Training from a trained model: init weights, reordering, refusal of a mismatch, the teacher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import usnet
from usnet.train.config import ConfigError, load_config
from usnet.train.distill import (
    TEACHER,
    TEACHER_INPLACE,
    InplaceDistillationLoss,
    soft_cross_entropy,
)
from usnet.train.sandwich import sandwich_step
from usnet.train.trainer import FINAL, Trainer
from usnet.train.warm_start import check_init_matches, make_teacher

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "configs" / "fashion_mnist_finetune.yaml"
QUICK = [
    "data.limit_train=1024", "data.limit_test=500", "batch_size=64", "eval.widths=0.25,1.0",
    "calib.num_images=256", "eval.every_epoch=false", "log_every=4", "epochs=1",
]  # fmt: skip


def _plain_weights(tmp_path, **kwargs) -> Path:
    """A state_dict file of the configured network (random weights, calibrated full-width BN)."""
    torch.manual_seed(1)
    model = usnet.models.create_model(
        "us_convnet", **{"num_classes": 10, "in_channels": 1, **kwargs}
    )
    usnet.calibrate(model, [torch.randn(16, 1, 28, 28)], [1.0], num_images=16)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    return path


def _config(path, *overrides):
    return load_config(FINETUNE, [*QUICK, f"init.checkpoint={path}", *overrides])


def test_init_loads_the_weights_and_reordering_keeps_the_function(tmp_path):
    path = _plain_weights(tmp_path)
    weights = torch.load(path)
    plain = Trainer(
        _config(path, "init.reorder=none", "teacher=none"), tmp_path / "a", log=lambda s: None
    )
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value.cpu(), weights[key]), key
    plain.lock.release()
    notes = []
    trainer = Trainer(_config(path, "init.reorder=activation"), tmp_path / "b", log=notes.append)
    trainer.lock.release()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        same = torch.equal(
            trainer.model.state_dict()["features.0.0.weight"], weights["features.0.0.weight"]
        )
        assert not same  # reordered
        assert torch.allclose(trainer.model.eval()(x), plain.model.eval()(x), atol=1e-5)
    assert any("reordered the channels" in n for n in notes)


def test_mismatched_init_is_refused_naming_the_keys(tmp_path):
    path = _plain_weights(tmp_path, num_classes=7)
    with pytest.raises(ConfigError, match=r"does not match model us_convnet with 10 classes: shapes "
                                          r"differ: classifier\.\S+ \(file \(7"):  # fmt: skip
        Trainer(_config(path), tmp_path / "run", log=lambda s: None)
    resnet = usnet.models.create_model("us_resnet18", num_classes=10, in_channels=1)
    with pytest.raises(
        ConfigError,
        match=r"missing: features\.0\.0\.weight, .*unexpected: conv1\.weight, .*\(\+119 more\)",
    ):
        check_init_matches(usnet.models.create_model("us_convnet", in_channels=1), resnet.state_dict(),
                           "x.pt", "us_convnet")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "usnet", "train", str(FINETUNE), "--out",
                             str(tmp_path / "cli"), "--set", *QUICK, f"init.checkpoint={path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "classifier" in lines[0] and "Traceback" not in result.stderr, (
        result.stderr
    )


def test_config_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="teacher=init needs init.checkpoint"):
        load_config(None, ["teacher=init"])
    with pytest.raises(ConfigError, match="init.reorder=l1 needs init.checkpoint"):
        load_config(None, ["init.reorder=l1"])
    with pytest.raises(ConfigError, match="unknown config key 'init.chekpoint'"):
        load_config(None, ["init.chekpoint=x.pt"])
    with pytest.raises(ConfigError, match="init.reorder: invalid value 'random'"):
        load_config(None, ["init.checkpoint=x.pt", "init.reorder=random"])
    with pytest.raises(ConfigError, match="teacher: invalid value 'self'"):
        load_config(None, ["teacher=self"])
    config = load_config(None)
    assert (
        config.init.checkpoint is None and config.teacher == "none"
    )  # default: unchanged training


def test_external_teacher_is_what_every_width_distils_from():
    """With labels weighted 0, each width's loss is exactly the soft cross-entropy with the
    teacher's targets (teacher alone), or with the mean of the teacher's and the widest's
    (alongside in-place distillation); ignoring the teacher would change every number."""
    torch.manual_seed(0)
    model = usnet.models.create_model("us_convnet", in_channels=1).train()
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    probs = torch.softmax(torch.randn(8, 10) * 3, dim=1)
    widths = [1.0, 0.25]
    for inplace in (False, True):
        criterion = InplaceDistillationLoss(enabled=inplace, label_weight=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        with torch.no_grad():
            logits = {w: usnet.set_width(model, w)(images) for w in widths}
        result = sandwich_step(
            model, images, labels, optimizer, widths, criterion, teacher_probs=probs
        )
        wide_targets = torch.softmax(logits[1.0], dim=1)
        expected = [soft_cross_entropy(logits[1.0], probs),
                    soft_cross_entropy(logits[0.25], (probs + wide_targets) / 2 if inplace else probs)]  # fmt: skip
        assert result.losses == pytest.approx([e.item() for e in expected], rel=1e-5)
        assert result.loss_kinds == [TEACHER, TEACHER_INPLACE if inplace else TEACHER]
        plain = sandwich_step(model, images, labels, optimizer, widths, criterion)
        assert abs(plain.losses[0] - result.losses[0]) > 1e-3  # the teacher changes the loss


def test_teacher_is_frozen_at_full_width():
    model = usnet.models.create_model("us_convnet", in_channels=1, width_range=(0.25, 0.5))
    with pytest.raises(ConfigError, match="no trained running statistics"):
        make_teacher(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(1)  # as loaded from a trained model
    teacher = make_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # full width although hi = 0.5
    assert usnet.get_width(model) == 0.5


@pytest.mark.parametrize("inplace", [True, False])
def test_finetune_run_with_teacher_logs_which_distillation(tmp_path, inplace):
    path = _plain_weights(tmp_path)
    out = tmp_path / "run"
    logs = []
    trainer = Trainer(_config(path, "init.reorder=l1", "teacher=init", f"inplace_distill={str(inplace).lower()}"),
                      out, log=logs.append)  # fmt: skip
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    rows = trainer.run()
    assert rows[-1]["top1"] > 0.3
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # frozen
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = next(r for r in records if r["kind"] == "run")
    n = trainer.config.num_widths
    if inplace:
        assert run["distillation"] == "teacher+inplace" and "alongside in-place" in run["losses"]
        kinds = [TEACHER] + [TEACHER_INPLACE] * (n - 1)
    else:
        assert run["distillation"] == "teacher" and "instead of in-place" in run["losses"]
        kinds = [TEACHER] * n
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["loss_kinds"] == kinds and train[-1]["teacher_s"] > 0
    assert [r for r in records if r["kind"] == "teacher"][-1]["teacher_s"] >= train[-1]["teacher_s"]
    assert any("frozen init model" in line for line in logs)
    assert any("teacher forward" in line for line in logs)
    assert (out / FINAL).is_file()


def test_resume_rebuilds_the_teacher(tmp_path):
    path = _plain_weights(tmp_path)
    out = tmp_path / "run"
    config = _config(path, "teacher=init", "epochs=2")
    first = Trainer(config, out, log=lambda s: None)
    first.run(max_epochs=1)
    resumed = Trainer(config, out, resume=True, log=lambda s: None)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(resumed.teacher(x), first.teacher(x), atol=1e-6)
    resumed.lock.release()


def test_torchvision_mobilenet_v2_weights_match_the_imagenet_finetune_config(tmp_path):
    """The ImageNet fine-tuning config reads torchvision's weight file: its keys are the zoo's."""
    config = load_config(REPO / "configs" / "imagenet_us_mobilenet_v2_finetune.yaml")
    assert config.init.checkpoint.endswith(".pth") and config.teacher == "init"
    model = usnet.models.create_model(
        config.model, num_classes=1000, width_range=tuple(config.width_range)
    )
    check_init_matches(
        model, torchvision.models.mobilenet_v2().state_dict(), "torchvision", config.model
    )
