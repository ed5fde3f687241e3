"""Bad inputs and faults a new user runs into: each is one clear line (or a refusal before any
work), and nothing a user has is lost or half-written."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import usnet
from usnet.cli import main
from usnet.errors import DataError, RunDirectoryError, UsnetError
from usnet.train.config import ConfigError, load_config
from usnet.train.rundir import LOCK, RunLock
from usnet.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "configs" / "fashion_mnist.yaml"
FASHION_DATA = Path("/usr/share/datasets/fashion-mnist")
QUIET = dict(progress=False, log=lambda s: None)


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("usnet: error: "), err
    return err[0]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def calibrated_checkpoint(tmp_path: Path, name: str = "m.pt", **kwargs) -> Path:
    """A small Fashion-MNIST-shaped checkpoint, calibrated at 0.25/0.5/1.0, recording its run config."""
    kwargs = {"num_classes": 10, "in_channels": 1, "small_input": True, **kwargs}
    model = usnet.models.us_convnet(**kwargs)
    images = torch.randn(16, kwargs["in_channels"], 28, 28)
    usnet.calibrate(model, [images], [0.25, 0.5, 1.0], num_images=16, progress=False)
    config = load_config(
        FASHION, ["data.limit_train=64", "data.limit_test=64", "calib.num_images=32"]
    )
    return usnet.save(model, tmp_path / name, extra={"config": config.to_dict()})


# --- the run directory is owned by one process ----------------------------------------------
def test_a_second_run_into_the_same_out_is_refused_naming_the_owner(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / LOCK).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(),
                                            "started": "earlier"}))  # fmt: skip
        with pytest.raises(
            RunDirectoryError, match=rf"in use by another usnet run \(pid {owner.pid}"
        ):
            Trainer(load_config(FASHION), out, **QUIET)
        assert json.loads((out / LOCK).read_text())["pid"] == owner.pid  # left to its owner
    finally:
        owner.kill()
        owner.wait()


def test_a_stale_lock_and_temporary_files_of_a_killed_run_are_cleaned_up(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    lock = RunLock(out)
    notes = lock.acquire()
    assert any("stale lock" in n for n in notes) and any("temporary files" in n for n in notes)
    assert not (out / ".checkpoint.pt.abc123.tmp").exists()
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK).exists()


def test_the_lock_is_exclusive_and_released_after_the_run(tmp_path):
    code = (
        "import sys, time; from usnet.train.rundir import RunLock\n"
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the holder was killed: its lock is stale now
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


# --- outputs are never overwritten by surprise ------------------------------------------------
def test_calibrate_out_refuses_an_unrelated_file_unless_forced(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    precious = tmp_path / "notes.pt"
    precious.write_bytes(b"my notes")
    args = ["calibrate", str(ckpt), "--widths", "0.75", "--images", "16", "--out", str(precious)]
    assert "already exists and is not this command's earlier output" in one_error_line(
        capsys, main(args)
    )
    assert precious.read_bytes() == b"my notes"
    assert main([*args, "--force"]) == 0
    assert usnet.is_calibrated(usnet.load(precious), 0.75)
    # Its own earlier output (a checkpoint of the same weights) is replaced, and said so.
    assert main([*args[:3], "0.3", *args[4:]]) == 0
    assert "replacing an earlier checkpoint of the same weights" in capsys.readouterr().out


def test_export_out_refuses_an_unrelated_file_and_replaces_its_own(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    target = tmp_path / "model.pt2"
    target.write_text("not an export")
    args = ["export", str(ckpt), "--width", "0.5", "--format", "pt", "--out", str(target)]
    assert "pass --force" in one_error_line(capsys, main(args))
    assert target.read_text() == "not an export"
    assert main([*args, "--force"]) == 0
    assert main(args) == 0
    assert "replacing an earlier pt export" in capsys.readouterr().out


def test_export_widths_into_an_earlier_export_merges_its_index(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    out = tmp_path / "exports"
    base = ["export", str(ckpt), "--format", "torchscript", "--out", str(out)]
    assert main([*base, "--widths", "0.25,1.0"]) == 0
    assert main([*base, "--widths", "0.5,1.0"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert sorted(r["width"] for r in index["models"]) == [0.25, 0.5, 1.0]
    assert all((out / r["file"]).is_file() for r in index["models"])
    capsys.readouterr()
    message = one_error_line(capsys, main([*base, "--widths", "0.5", "--fuse-bn"]))
    assert (
        "already holds an export with other settings" in message
        and "fused_bn False there" in message
    )
    assert json.loads((out / "index.json").read_text()) == index


def test_search_refuses_an_existing_out_before_searching(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    taken = tmp_path / "result.json"
    taken.write_text("{}")
    message = one_error_line(
        capsys, main(["search", str(ckpt), "--max-macs", "1M", "--out", str(taken)])
    )
    assert "--out" in message and "already exists" in message and taken.read_text() == "{}"


def test_outputs_that_cannot_be_written_are_reported_before_any_work(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = one_error_line(capsys, main(["search", str(ckpt), "--max-macs", "1M", "--out",
                                           str(blocker / "r.json")]))  # fmt: skip
    assert "is a file, not a directory" in message
    message = one_error_line(capsys, main(["export", str(ckpt), "--width", "0.5", "--format", "pt",
                                           "--out", str(tmp_path)]))  # fmt: skip
    assert "is a directory" in message


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    usnet.files.atomic_write_bytes(path, b"the good checkpoint")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(usnet.files.os, "fsync", full)
    with pytest.raises(OSError):
        usnet.save(usnet.models.us_convnet(), path)
    assert path.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# --- data -------------------------------------------------------------------------------------
def test_corrupt_gzip_idx_file_is_named(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        data = (FASHION_DATA / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 3])  # a download cut short
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.gz' is a truncated or corrupt gzip"
    ):
        usnet.train.data.FashionMNIST(tmp_path, train=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        usnet.train.data.FashionMNIST(tmp_path, train=True)


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    root = image_folder(tmp_path, classes=("only",))
    with pytest.raises(
        DataError, match=r"holds 1 class subdirectories \[only\]; a classifier needs at least 2"
    ):
        usnet.train.data.build_datasets("imagefolder", str(root), image_size=8)


def test_a_corrupt_image_is_named(tmp_path):
    root = image_folder(tmp_path)
    (root / "train" / "b" / "1.png").write_bytes(b"\x89PNG truncated")
    train, _, _, _ = usnet.train.data.build_datasets("imagefolder", str(root), image_size=8)
    train[0]
    with pytest.raises(DataError, match=r"image '.*train/b/1.png' cannot be read.*does not skip"):
        train[3]


def test_model_and_data_class_or_channel_mismatch_names_both(tmp_path, capsys):
    three = calibrated_checkpoint(tmp_path, "three.pt", num_classes=3)
    message = one_error_line(capsys, main(["eval", str(three)]))
    assert "has 3 classes but the fashion_mnist data has 10" in message
    rgb = calibrated_checkpoint(tmp_path, "rgb.pt", in_channels=3)
    message = one_error_line(capsys, main(["calibrate", str(rgb), "--widths", "0.5"]))
    assert "takes 3-channel images but the fashion_mnist data has 1-channel images" in message


# --- config -----------------------------------------------------------------------------------
def test_amp_fp16_on_the_cpu_is_refused_pointing_to_bf16(tmp_path):
    with pytest.raises(ConfigError, match="amp=fp16 on the CPU.*use amp=bf16"):
        Trainer(load_config(FASHION, ["amp=fp16", "device=cpu"]), tmp_path / "r", **QUIET)
    assert not (tmp_path / "r" / LOCK).exists()  # a refused run leaves no lock behind


def test_a_width_range_with_nothing_to_slim_is_refused():
    with pytest.raises(
        ConfigError, match=r"width_range \[1.0, 1.0\] leaves nothing to slim.*mode=individual"
    ):
        load_config(FASHION, ["width_range=[1.0, 1.0]"])
    load_config(
        FASHION, ["mode=individual", "width=1.0", "width_range=[1.0, 1.0]"]
    )  # one width: fine


def test_a_directory_given_as_config_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        load_config(tmp_path)


def test_eval_widths_outside_the_range_are_reported_before_training(tmp_path):
    logged = []
    config = load_config(FASHION, ["width_range=[0.5, 1.0]", "eval.widths=0.25,0.3,0.5,1.0",
                                   "data.limit_train=256", "data.limit_test=64"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", progress=False, log=logged.append)
    assert trainer.evaluated_widths == [0.5, 1.0]
    assert any("2 outside it are skipped (0.25, 0.3)" in line for line in logged), logged
    trainer.lock.release()


# --- widths -----------------------------------------------------------------------------------
def test_a_width_spec_is_bounded_and_each_configuration_is_evaluated_once(capsys):
    with pytest.raises(SystemExit) as exit_info:  # an argument error: usage and exit 2
        main(["profile", "us_convnet", "--widths", "0.25:1.0:0.0000001"])
    assert (
        exit_info.value.code == 2 and "7500001 widths, more than 100000" in capsys.readouterr().err
    )
    assert main(["profile", "us_convnet", "--widths", "0.25:1.0:0.0001", "--input-size", "1,1,28,28",
                 "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    plan = usnet.channel_plan(usnet.models.us_convnet())
    assert len(rows) == len(plan.distinct_configs(step=0.0001)) < 7501
    assert len({r["config_id"] for r in rows}) == len(rows)
    assert f"7501 widths give {len(rows)} distinct channel configurations" in captured.err


def test_profile_of_a_checkpoint_uses_the_runs_input_size(tmp_path, capsys):
    ckpt = calibrated_checkpoint(tmp_path)
    assert main(["profile", str(ckpt), "--widths", "1.0"]) == 0
    assert "at input 1x1x28x28" in capsys.readouterr().out  # as eval, select and export


def test_latency_cache_pointing_at_a_file(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("")
    args = ["select", "us_convnet", "--max-latency-ms", "5", "--input-size", "1,1,28,28",
            "--latency-cache", str(cache)]  # fmt: skip
    message = one_error_line(capsys, main(args))
    assert "is a file, not a directory" in message and "--latency-cache" in message
    with pytest.raises(UsnetError, match="is a file, not a directory"):
        usnet.deploy.select.check_cache_dir(cache)


def test_a_wrongly_guessed_input_shape_says_to_pass_input_size():
    from torch import nn

    class HeadFirst(nn.Module):  # registers a 16-channel conv first, runs a 3-channel one first
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(16, 4, 1)
            self.stem = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return self.head(self.stem(x))

    with pytest.raises(usnet.ConversionError, match=r"\(1, 16, 224, 224\) \(guessed from its first "
                       r"registered Conv2d.*pass input_size=\(1, C, H, W\)"):  # fmt: skip
        usnet.slimmable(HeadFirst())
    usnet.slimmable(HeadFirst(), input_size=(1, 3, 8, 8))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "us_convnet", "--in-channels", "-1"], "--in-channels: expected a whole number >= 1, got '-1'"),
        (["profile", "us_convnet", "--num-classes", "0"], "--num-classes: expected a whole number >= 1, got '0'"),
        (["select", "us_convnet", "--max-latency-ms", "1", "--repeats", "0"], "--repeats: expected a whole number >= 1"),
        (["select", "us_convnet", "--max-latency-ms", "1", "--warmup", "-2"], "--warmup: expected a whole number >= 0"),
    ],
)  # fmt: skip
def test_counts_in_the_cli_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message in err[-1]


def test_select_refuses_a_bad_device_before_profiling(capsys, monkeypatch):
    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled before the device was checked")

    monkeypatch.setattr("usnet.deploy.select.profile", no_profiling, raising=False)
    monkeypatch.setattr("usnet.cli.commands.load_checkpoint_arg", no_profiling)
    code = main(["select", "us_convnet", "--max-latency-ms", "1", "--device", "tpu"])
    assert "device: invalid value 'tpu'" in one_error_line(capsys, code)


def test_a_converted_custom_model_is_profiled_at_its_own_input(tmp_path, capsys):
    """No zoo record and no conv to guess from: the example input it was converted with is kept."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 4))  # fmt: skip
    model = usnet.slimmable(net, input_size=(2, 3, 2, 2))
    assert usnet.state.get_state(model).input_size == (1, 3, 2, 2)
    path = usnet.save(model, tmp_path / "lin.pt")
    assert usnet.state.get_state(usnet.load(path)).input_size == (1, 3, 2, 2)
    assert main(["profile", str(path), "--widths", "0.5,1.0"]) == 0
    assert "1x3x2x2" in capsys.readouterr().out


def test_eval_scores_on_the_test_set_also_for_a_run_with_a_validation_split(tmp_path):
    from usnet.cli.common import data_for

    config = load_config(
        FASHION, ["data.val_split=100", "data.limit_train=1000", "data.limit_test=300"]
    )
    payload = {"extra": {"config": config.to_dict()}}
    _, (train, _, test, _) = data_for("m.pt", payload, None, None)
    assert len(test) == 300 and len(train) == 1000  # the test set, and no images held out


def test_a_run_continued_in_steps_holds_the_lock_again(tmp_path):
    config = load_config(FASHION, ["epochs=2", "data.limit_train=128", "data.limit_test=128",
                                   "batch_size=64", "eval.every_epoch=false", "eval.widths=0.25,1.0",
                                   "calib.num_images=64"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "r", **QUIET)
    assert trainer.run(max_epochs=1) is None and not trainer.lock.held
    held = []
    epoch = trainer._train_epoch
    trainer._train_epoch = lambda: (held.append((tmp_path / "r" / LOCK).exists()), epoch())
    trainer.run()
    assert held == [True] and not (tmp_path / "r" / LOCK).exists()
