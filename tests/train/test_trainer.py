"""usnet train end to end (real Fashion-MNIST images), resume, and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import usnet
from usnet.train.config import ConfigError, load_config
from usnet.train.trainer import CHECKPOINT, FINAL, Trainer, TrainingError

REPO = Path(__file__).resolve().parents[2]
FASHION = REPO / "configs" / "fashion_mnist.yaml"
QUICK = [
    "data.limit_train=2048", "data.limit_test=1000", "batch_size=64", "eval.widths=0.25:1.0:0.25",
    "calib.num_images=512", "eval.epoch_calib_images=256", "log_every=8",
]  # fmt: skip


def quick_config(*overrides):
    return load_config(FASHION, [*QUICK, *overrides])


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "usnet", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", str(FASHION), "--out", str(out), "--set", "epochs=1", *QUICK,
                     "data.limit_train=4096")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in (
        CHECKPOINT,
        FINAL,
        "metrics.jsonl",
        "spectrum.csv",
        "spectrum.json",
        "spectrum.png",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "spectrum.json").read_text())
    assert [r["width"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    for r in rows:
        assert set(r) == {"width", "config_id", "params", "macs", "top1", "top5"}
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    assert [r["macs"] for r in rows] == sorted(r["macs"] for r in rows)
    # 64 steps on 4096 images: both ends far above chance (10%) after calibration.
    assert rows[0]["top1"] > 0.6 and rows[-1]["top1"] > 0.6, rows
    assert "top-1" in result.stdout and "1.000" in result.stdout  # the spectrum table
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"run", "train", "val", "spectrum"} <= kinds
    run = next(r for r in records if r["kind"] == "run")
    assert "in-place distillation" in run["losses"]
    train = next(r for r in records if r["kind"] == "train")
    n = load_config(FASHION).num_widths  # widths per step of the shipped recipe
    assert train["loss_kinds"] == ["labels"] + ["distill"] * (n - 1)
    # the final checkpoint is a usnet.save file with calibrated widths and the config
    model = usnet.load(out / FINAL)
    assert usnet.is_calibrated(model, 0.25) and usnet.is_calibrated(model, 1.0)
    payload = usnet.checkpoint.read_checkpoint(out / FINAL)
    assert payload["extra"]["config"]["epochs"] == 1
    assert payload["extra"]["spectrum"] == rows

    # usnet eval reproduces the spectrum from the checkpoint alone
    result = run_cli("eval", str(out / FINAL), "--widths", "0.25,1.0", "--json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert [r["top1"] for r in evaluated] == [rows[0]["top1"], rows[-1]["top1"]]

    # usnet calibrate adds a width
    result = run_cli("calibrate", str(out / FINAL), "--widths", "0.33", "--images", "256",
                     "--out", str(out / "more.pt"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert usnet.is_calibrated(usnet.load(out / "more.pt"), 0.33)
    assert not usnet.is_calibrated(usnet.load(out / FINAL), 0.33)


def test_distillation_switch_is_logged(tmp_path):
    trainer = Trainer(quick_config("epochs=1", "inplace_distill=false", "data.limit_train=256",
                                   "eval.every_epoch=false"), tmp_path / "r", progress=False,
                      log=lambda s: None)  # fmt: skip
    assert "in-place distillation off" in trainer.describe_losses()
    trainer.run()
    records = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    train = next(r for r in records if r["kind"] == "train")
    assert train["loss_kinds"] == ["labels"] * trainer.config.num_widths


def test_loss_narrowest_is_logged_for_the_narrowest_width(tmp_path):
    """With ``sandwich_ends: max`` the step's widths come widest first, so the narrowest is the
    last; the trainer once logged the second as ``loss_narrowest``."""
    trainer = Trainer(quick_config("epochs=1", "sandwich_ends=max", "data.limit_train=256",
                                   "log_every=1", "eval.every_epoch=false"), tmp_path / "r",
                      progress=False, log=lambda s: None)  # fmt: skip
    trainer.run()
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert train
    for record in train:
        widths = record["widths"]
        assert widths == sorted(widths, reverse=True) and widths[1] != widths[-1]
        assert record["loss_narrowest"] == record["width_losses"][widths.index(min(widths))]


def test_distillation_warmup_moves_the_label_weight_from_labels_to_the_teacher(tmp_path):
    config = quick_config("epochs=2", "distill_label_weight=0.25", "distill_warmup_epochs=1",
                          "data.limit_train=256", "eval.every_epoch=false")  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", progress=False, log=lambda s: None)
    n = trainer.steps_per_epoch
    assert n == 4
    assert [trainer.distill_label_weight(s) for s in (0, 2, 4, 7)] == [1.0, 0.625, 0.25, 0.25]
    assert "falling linearly from 1 over the first 1 epochs" in trainer.describe_losses()
    trainer.run()
    assert trainer.criterion.label_weight == 0.25
    with pytest.raises(ConfigError, match=r"distill_warmup_epochs must be in \[0, epochs=2\]"):
        quick_config("epochs=2", "distill_warmup_epochs=3")


def test_cudnn_benchmark_warm_up_changes_nothing_but_the_log(tmp_path):
    """The warm-up runs every configuration once and leaves weights, data order and widths as
    they were: the run ends with the same weights as one without it."""
    common = ("epochs=1", "data.limit_train=256", "eval.every_epoch=false", "channels_last=false")
    logs: list[str] = []
    warm = Trainer(quick_config(*common, "cudnn_benchmark=true"), tmp_path / "warm", progress=False,
                   log=logs.append)  # fmt: skip
    warm.run()
    cold = Trainer(quick_config(*common), tmp_path / "cold", progress=False, log=lambda s: None)
    cold.run()
    configs = len(usnet.channel_plan(warm.model).distinct_configs())
    assert any(f"warmed up {configs} channel configurations" in line for line in logs)
    for (name, a), b in zip(warm.model.state_dict().items(), cold.model.state_dict().values()):
        if torch.is_floating_point(a):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _final_state(out):
    return usnet.checkpoint.read_checkpoint(out / CHECKPOINT)


ADAMW = ("optimizer=adamw", "lr=2e-3", "weight_decay=0.05", "betas=[0.9, 0.95]")


@pytest.mark.parametrize(
    "overrides, steps",
    [
        (("data.limit_train=640",), 10),
        # AdamW's moments must come back too; a smaller run keeps the case cheap.
        (("data.limit_train=256", "data.limit_test=200", "eval.widths=0.25,1.0",
          "calib.num_images=128", *ADAMW), 4),
    ],
    ids=["sgd", "adamw"],
)  # fmt: skip
def test_resume_reproduces_an_uninterrupted_run(tmp_path, overrides, steps):
    overrides = ("epochs=2", "eval.every_epoch=false", *overrides)
    quiet = dict(progress=False, log=lambda s: None)
    Trainer(quick_config(*overrides), tmp_path / "straight", **quiet).run(max_epochs=2)
    first = Trainer(quick_config(*overrides), tmp_path / "resumed", **quiet)
    assert first.run(max_epochs=1) is None  # stopped after one epoch, like a killed run
    resumed = Trainer(quick_config(*overrides), tmp_path / "resumed", resume=True, **quiet)
    assert resumed.epoch == 1 and resumed.step == steps
    assert type(resumed.optimizer) is type(first.optimizer)
    assert (
        resumed.optimizer.state_dict()["state"].keys()
        == first.optimizer.state_dict()["state"].keys()
    )
    resumed.run(max_epochs=1)
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["extra"]["trainer"]["step"] == b["extra"]["trainer"]["step"] == 2 * steps

    def widths(out):
        records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [r["widths"] for r in records if r["kind"] == "train"]

    assert widths(tmp_path / "straight") == widths(tmp_path / "resumed")


def test_adamw_run_trains_with_adamw_and_the_vit_decay_groups(tmp_path):
    config = quick_config("epochs=1", "data.limit_train=128", "eval.every_epoch=false",
                          "calib.num_images=128", *ADAMW)  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", progress=False, log=lambda s: None)
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, p in trainer.model.named_parameters():  # conv/linear weights only
        assert (id(p) in decayed) == (name.endswith("weight") and p.dim() > 1), name
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(max_epochs=1)
    assert optimizer.state_dict()["state"]  # AdamW's moments, saved in the checkpoint
    saved = _final_state(tmp_path / "r")["extra"]["trainer"]["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(saved["state"].values())))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ConfigError, match=r"changed config \(betas, optimizer\)"):
        Trainer(quick_config("epochs=1", "data.limit_train=128", "eval.every_epoch=false",
                             "calib.num_images=128", "lr=2e-3", "weight_decay=0.05"),
                tmp_path / "r", resume=True, progress=False, log=lambda s: None)  # fmt: skip


def test_resume_with_changed_config_is_refused(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    config = quick_config("epochs=2", "data.limit_train=256", "eval.every_epoch=false")
    Trainer(config, tmp_path / "r", **quiet).run(max_epochs=1)
    with pytest.raises(ConfigError, match="changed config.*lr"):
        Trainer(quick_config("epochs=2", "data.limit_train=256", "eval.every_epoch=false", "lr=0.2"),
                tmp_path / "r", resume=True, **quiet)  # fmt: skip
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(config, tmp_path / "r", **quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        Trainer(config, tmp_path / "empty", resume=True, **quiet)


def test_resume_of_a_checkpoint_from_before_newer_config_fields(tmp_path):
    """A checkpoint written before a field existed lacks its key: the field takes the value of
    the behaviour before it existed (distill_label_weight: pure distillation, 0.0, not today's
    default 0.5), so that old run resumes as it was and a different value is still refused."""
    base = ("epochs=2", "data.limit_train=256", "eval.every_epoch=false")
    old_run = quick_config(*base, "distill_label_weight=0.0")
    Trainer(old_run, tmp_path / "r", progress=False, log=lambda s: None).run(max_epochs=1)
    path = tmp_path / "r" / CHECKPOINT
    payload = torch.load(path, weights_only=False)
    for key in (
        "distill_label_weight",
        "cudnn_benchmark",
        "sync_bn",
    ):  # added after the first release
        del payload["extra"]["config"][key]
    torch.save(payload, path)
    logged = []
    resumed = Trainer(old_run, tmp_path / "r", resume=True, progress=False, log=logged.append)
    assert resumed.epoch == 1
    assert any(
        "predates config fields cudnn_benchmark, distill_label_weight, sync_bn" in line
        for line in logged
    )
    with pytest.raises(ConfigError, match=r"changed config \(distill_label_weight\)"):
        Trainer(
            quick_config(*base), tmp_path / "r", resume=True, progress=False, log=lambda s: None
        )
    # Without CONFIG (usnet train --resume) the same completed config comes back.
    assert usnet.train.trainer.saved_run_config(tmp_path / "r") == old_run


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    config = quick_config("epochs=2", "data.limit_train=256", "eval.every_epoch=false")
    Trainer(config, tmp_path / "r", **quiet).run(max_epochs=1)
    good = (tmp_path / "r" / CHECKPOINT).read_bytes()
    trainer = Trainer(config, tmp_path / "r", resume=True, **quiet)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e30  # diverge at once
    trainer.scheduler.base_lrs = [1e30] * len(trainer.scheduler.base_lrs)
    with pytest.raises(
        TrainingError, match=r"stopped at epoch 2, step \d+: non-finite loss.*checkpoint.pt"
    ):
        trainer.run()
    assert (tmp_path / "r" / CHECKPOINT).read_bytes() == good


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "inplace_distil=false"], "unknown config key 'inplace_distil'"),
        (["--set", "data.root=/nonexistent/fmnist"], "no Fashion-MNIST IDX files"),
        (["--set", "epochs=zero"], "epochs: expected an integer"),
        (["--set", "model=us_vgg"], "unknown model 'us_vgg'"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    result = run_cli("train", str(FASHION), "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usnet: error: ") and message in lines[0], (
        result.stderr
    )


def test_cli_corrupt_checkpoint(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    result = run_cli("train", "--out", str(out), "--resume")
    assert result.returncode == 2 and "is not a readable checkpoint" in result.stderr
    result = run_cli("eval", str(out / CHECKPOINT))
    assert result.returncode == 2 and "is not a readable checkpoint" in result.stderr
    result = run_cli("eval", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_individual_and_slimmable_baselines(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    common = ("epochs=1", "data.limit_train=256", "eval.every_epoch=false", "calib.num_images=128")
    single = Trainer(quick_config(*common, "mode=individual", "width=0.5"), tmp_path / "i", **quiet)
    assert usnet.channel_plan(single.model).width_range == (0.5, 0.5)
    rows = single.run()
    assert [r["width"] for r in rows] == [0.5]
    exported = usnet.export(usnet.load(tmp_path / "i" / FINAL), 0.5)
    plain = usnet.models.convnet(num_classes=10, in_channels=1, width_mult=0.5)
    plain.load_state_dict(exported.state_dict())  # exactly the plain network of that width

    sn = Trainer(
        quick_config(*common, "mode=slimmable", "widths=[0.25,0.5,1.0]"), tmp_path / "s", **quiet
    )
    private = [n for n, _ in sn.model.named_parameters() if "private_affine" in n]
    assert len(private) == 2 * 2 * 5  # weight+bias, 2 narrower widths, 5 BN layers
    sn.run()
    records = [
        json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
    ]
    assert next(r for r in records if r["kind"] == "train")["widths"] == [1.0, 0.5, 0.25]
    model = usnet.load(tmp_path / "s" / FINAL)  # rebuilds the switchable BN parameters
    x = torch.randn(3, 1, 28, 28)
    for w in (0.25, 0.5, 1.0):
        with usnet.width(model, w), torch.no_grad():
            reference = model.eval()(x)
        assert (usnet.export(model, w)(x) - reference).abs().max() <= 1e-5


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    """A run killed at an arbitrary moment resumes from its last checkpoint and ends exactly
    where an uninterrupted run ends."""
    import os
    import signal
    import time

    args = ["--set", *QUICK, "data.limit_train=1024", "epochs=3", "eval.every_epoch=false"]
    straight = run_cli("train", str(FASHION), "--out", str(tmp_path / "a"), *args)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "usnet", "train", str(FASHION), "--out",
                             str(tmp_path / "b"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (tmp_path / "b" / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the second epoch (or later)
        running_at_kill = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kill landed mid-run: the process was alive, died of SIGKILL, and left no final model
    # and a checkpoint of an epoch before the last one.
    assert running_at_kill and proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / FINAL).exists()
    assert (tmp_path / "b" / CHECKPOINT).exists()
    killed_at = usnet.checkpoint.read_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert killed_at["extra"]["trainer"]["epoch"] < 3  # killed while training, not after
    resumed = run_cli("train", "--out", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = usnet.checkpoint.read_checkpoint(tmp_path / "a" / FINAL)
    b = usnet.checkpoint.read_checkpoint(tmp_path / "b" / FINAL)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["extra"]["spectrum"] == b["extra"]["spectrum"]
    assert os.path.getsize(tmp_path / "b" / "metrics.jsonl") > 0


def test_imagefolder_and_missing_datasets(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            directory = root / split / f"class{label}"
            directory.mkdir(parents=True)
            for i in range(8):
                noise = torch.randint(0, 40, (40, 40, 3), generator=generator, dtype=torch.uint8)
                pixels = (torch.tensor(colour, dtype=torch.uint8) + noise).numpy()
                Image.fromarray(pixels).save(directory / f"{i}.png")
    config = load_config(FASHION, ["data.name=imagefolder", f"data.root={root}", "data.image_size=32",
                                   "epochs=2", "batch_size=4", "lr=0.05", "eval.widths=0.25,1.0",
                                   "calib.num_images=16", "eval.epoch_calib_images=16"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", progress=False, log=lambda s: None)
    assert trainer.info.num_classes == 2 and trainer.info.input_size == (1, 3, 32, 32)
    rows = trainer.run()
    assert rows[-1]["top1"] == 1.0  # two colours: trivially separable

    with pytest.raises(FileNotFoundError, match="has no train/ directory"):
        Trainer(load_config(FASHION, ["data.name=imagefolder", f"data.root={tmp_path}"]),
                tmp_path / "x", progress=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        Trainer(load_config(FASHION, ["data.name=cifar10", f"data.root={tmp_path}"]),
                tmp_path / "y", progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, dtype",
    [(["channels_last=true"], torch.float32), (["amp=bf16"], torch.bfloat16)],
)  # fmt: skip
def test_channels_last_and_autocast_runs(tmp_path, overrides, dtype):
    """A short run in each mode trains (every width far above chance), and the training forward
    computes in the dtype the mode names. (``amp=fp16`` is refused on the CPU,
    tests/test_bad_inputs.py; its step with a GradScaler is tested in test_training.py on the CPU
    and in test_cuda.py on a GPU.)"""
    # a small US-ConvNet: float16 convolutions on the CPU have no fast kernels (~50x float32)
    config = quick_config("epochs=1", "data.limit_train=2048", "batch_size=32", "eval.every_epoch=false",
                          "calib.num_images=128", "model_kwargs={channels: [16, 32], strides: [2, 2]}",
                          *overrides)  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", progress=False, log=lambda s: None)
    seen: list[tuple[torch.dtype, bool]] = []
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(
        lambda m, args, out: seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))
    )  # fmt: skip
    rows = trainer.run()
    steps = 2048 // 32
    training = seen[: steps * config.num_widths]  # the training forwards come first
    assert len(training) == steps * config.num_widths
    assert {d for d, _ in training} == {dtype}, training
    if "channels_last=true" in overrides:
        assert all(cl for _, cl in training)
    # 64 steps on 2048 images reach 0.53-0.59 at every width; chance is 0.10.
    assert len(rows) == 4 and all(r["top1"] > 0.4 for r in rows), [r["top1"] for r in rows]
    model = usnet.load(tmp_path / "r" / FINAL)
    x = torch.randn(2, 1, 28, 28)
    with usnet.width(model, 0.5), torch.no_grad():
        reference = model.eval()(x)
    assert (usnet.export(model, 0.5)(x) - reference).abs().max() <= 1e-4


def test_stale_or_cut_off_metrics_do_not_break_runs(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 5}\n')  # died before a checkpoint
    config = quick_config("epochs=2", "data.limit_train=256", "eval.every_epoch=false")
    Trainer(config, out, **quiet).run(max_epochs=1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "run" and [r["kind"] for r in records].count("run") == 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-write
    Trainer(config, out, resume=True, **quiet).run()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_result_files_honour_the_umask(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = tmp_path / "f.bin"
        usnet.files.atomic_write_bytes(path, b"a")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        usnet.files.atomic_write_bytes(path, b"b")  # replacing keeps the file's mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"b"
    finally:
        os.umask(umask)


def test_validation_split_is_held_out_from_training(tmp_path):
    """data.val_split: N training images, drawn with val_seed alone, are scored instead of the
    test set; training and calibration never see them."""
    quiet = dict(progress=False, log=lambda s: None)
    config = quick_config("data.val_split=512", "seed=3")
    trainer = Trainer(config, tmp_path / "a", **quiet)
    train, calib, val = trainer.train_set, trainer.calib_set, trainer.test_set
    assert (len(train), len(calib), len(val)) == (2048 - 512, 2048 - 512, 512)
    assert train.indices == calib.indices and not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(2048))
    x, y = val[0]
    assert torch.equal(x, calib.dataset[val.indices[0]][0])  # evaluation-time transforms
    # The same images for every run seed (recipes are compared on one split); val_seed moves it.
    other = Trainer(quick_config("data.val_split=512", "seed=4"), tmp_path / "b", **quiet)
    assert other.test_set.indices == val.indices
    moved = Trainer(quick_config("data.val_split=512", "data.val_seed=1"), tmp_path / "c", **quiet)
    assert moved.test_set.indices != val.indices
    # Off by default: the test set.
    assert len(Trainer(quick_config(), tmp_path / "d", **quiet).test_set) == 1000
    with pytest.raises(ConfigError, match=r"data.val_split must be between 1 and 2047 .* got 2048"):
        Trainer(quick_config("data.val_split=2048"), tmp_path / "e", **quiet)
    with pytest.raises(ConfigError, match="data.val_split must not be negative"):
        quick_config("data.val_split=-1")
