"""Distributed training on gloo (CPU): 2 processes against 1, resume, calibration, SyncBN, allreduces.

Every test starts its own processes (torch.multiprocessing spawn, or torchrun as a subprocess) on
a free port and always ends them: a deadline per test, and any process still alive afterwards,
also after a failure, is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from usnet_testing import liven, tiny_slimmable

import usnet
from usnet import distributed
from usnet.nn.norm import SlimmableBatchNorm2d
from usnet.train.config import ConfigError, load_config
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.sandwich import sandwich_step
from usnet.train.trainer import (
    _NO_BUFFER_SYNC,
    CHECKPOINT,
    FINAL,
    METRICS,
    Trainer,
    saved_run_config,
)

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "configs" / "fashion_mnist.yaml"
TINY = [
    "model_kwargs={channels: [8, 16, 16], strides: [1, 2, 2]}", "channels_last=false",
    "data.limit_train=128", "data.limit_test=200", "batch_size=32", "epochs=2", "lr=0.002",
    "log_every=1",
    "eval.widths=0.25,0.5,1.0", "eval.epoch_calib_images=96", "calib.num_images=100",
    "calib.batch_size=64", "sync_bn=true",
]  # fmt: skip
"""4 steps per epoch of a 3-layer US-ConvNet. SyncBN, so that the 2-process batch statistics are
those of the 1-process batch (with plain BN each rank normalizes with its half batch's). A small
lr: training amplifies float rounding (a single process with channels_last instead of contiguous
convolutions ends 3e-3 apart after 16 steps at lr 0.1, 3e-6 after these 8 at lr 0.002)."""
DEADLINE = 240  # seconds per multi-process test; they take a few seconds each


# -- process management ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout=timedelta(seconds=60))  # torchrun's code path
    try:
        fn(rank, *args)
    finally:
        distributed.destroy()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes of one gloo group; raise if any
    fails or the deadline passes; never leave a process behind."""
    context = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers still running after {DEADLINE}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


# -- 2 processes train like 1 ------------------------------------------------------------------
def _record_widths(trainer: Trainer) -> list:
    drawn: list = []
    sample = trainer.sampler.sample

    def recording():
        widths = sample()
        drawn.append(widths)
        return widths

    trainer.sampler.sample = recording
    return drawn


def _audit_writes(roots: list[str], log: list) -> None:
    """Record every file opened for writing and every folder made under ``roots``."""

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes and any(path.startswith(r) for r in roots):
                log.append(path)
        elif event in ("os.mkdir", "os.rename", "os.remove") and args:
            path = os.fsdecode(args[0])
            if any(path.startswith(r) for r in roots):
                log.append(f"{event} {path}")

    sys.addaudithook(hook)


def _train_worker(rank: int, tmp: str) -> None:
    root = Path(tmp)
    writes: list = []
    if rank != 0:
        _audit_writes([str(root / "straight"), str(root / "resumed")], writes)
    quiet = dict(progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="global batch and must be divisible by the 2 processes"):
        Trainer(load_config(FASHION, [*TINY, "batch_size=33"]), root / "odd", **quiet)
    config = load_config(FASHION, TINY)
    straight = Trainer(config, root / "straight", **quiet)
    drawn = _record_widths(straight)
    straight.run()
    first = Trainer(config, root / "resumed", **quiet)
    assert first.run(max_epochs=1) is None  # stopped after one epoch, like a killed run
    resumed = Trainer(config, root / "resumed", resume=True, **quiet)
    assert (resumed.epoch, resumed.step) == (1, 4)
    resumed.run()
    torch.save({"widths": drawn, "writes": writes}, root / f"rank{rank}.pt")


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out).parent if "tfevents" in p.name else p.relative_to(out))
                  for p in out.rglob("*") if p.is_file())  # fmt: skip


def test_two_processes_train_resume_and_validate_like_one(tmp_path):
    spawn(_train_worker, str(tmp_path))
    single = tmp_path / "single"
    trainer = Trainer(load_config(FASHION, TINY), single, progress=False, log=lambda s: None)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    two, resumed = tmp_path / "straight", tmp_path / "resumed"

    # Same global batch and seed: the same weights after 8 steps (float rounding apart), weights
    # that moved far more than that from the initial ones.
    a = usnet.checkpoint.read_checkpoint(single / CHECKPOINT)["state_dict"]
    b = usnet.checkpoint.read_checkpoint(two / CHECKPOINT)["state_dict"]
    assert a.keys() == b.keys()
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    assert max(diffs.values()) <= 1e-5, diffs
    moved = [(a[k] - initial[k]).abs().max().item() for k in a if k.endswith("weight")]
    assert min(moved) > 20 * 1e-5, moved

    # The same widths on both ranks, and those of the single process.
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["widths"]) == 8
    assert ranks[0]["widths"] == ranks[1]["widths"]
    assert [r["widths"] for r in _records(single, "train")] == ranks[0]["widths"]

    # Per-epoch validation (sharded calibration and evaluation) and the final spectrum.
    for kind in ("val", "spectrum"):
        assert _records(two, kind) == _records(single, kind), kind
    assert len(_records(two, "val")) == 2

    # Only rank 0 wrote: rank 1 opened nothing for writing, the files are one run's.
    assert ranks[1]["writes"] == []
    assert _files(two) == _files(single)
    assert _files(two).count("tensorboard") == 1
    assert len(_records(two, "train")) == len(_records(single, "train")) == 8

    # A 2-process resume continues exactly: bit-identical to the uninterrupted 2-process run
    # (checkpoint.pt's BN statistics are the previous validation's leftovers: not compared).
    for name in (CHECKPOINT, FINAL):
        x = usnet.checkpoint.read_checkpoint(two / name)
        y = usnet.checkpoint.read_checkpoint(resumed / name)
        for key, value in x["state_dict"].items():
            if name == FINAL or not key.endswith(
                ("running_mean", "running_var", "num_batches_tracked")
            ):
                assert torch.equal(value, y["state_dict"][key]), (name, key)
    x, y = (usnet.checkpoint.read_checkpoint(out / FINAL)["bn_stats"] for out in (two, resumed))
    assert x.keys() == y.keys() and len(x) == 3
    for layer in x:
        for key, (mean, var) in x[layer].items():
            assert torch.equal(mean, y[layer][key][0]) and torch.equal(var, y[layer][key][1])
    assert _records(resumed, "spectrum") == _records(two, "spectrum")
    train = lambda out: [(r["step"], r["widths"], r["loss_widest"]) for r in _records(out, "train")]  # noqa: E731
    assert train(resumed) == train(two)


def _saved_config_worker(rank: int, tmp: str) -> None:
    # Only rank 0 is given the run's folder: the others must get its config from rank 0.
    out = Path(tmp) / ("run" if rank == 0 else f"not-on-rank{rank}")
    torch.save(saved_run_config(out).to_dict(), Path(tmp) / f"config{rank}.pt")


def test_resume_without_config_reads_the_saved_config_on_rank_0_only(tmp_path):
    """``usnet train --resume`` without CONFIG: other machines need no shared file system."""
    config = load_config(FASHION, [*TINY, "sync_bn=false", "eval.every_epoch=false", "seed=7"])
    Trainer(config, tmp_path / "run", progress=False, log=lambda s: None).run(max_epochs=1)
    spawn(_saved_config_worker, str(tmp_path))
    for r in (0, 1):
        assert torch.load(tmp_path / f"config{r}.pt") == config.to_dict()


# -- distributed calibration -------------------------------------------------------------------
def _calib_model() -> nn.Module:
    torch.manual_seed(0)
    return liven(usnet.models.create_model("us_convnet", channels=[32, 64], strides=[1, 2]))


def _calib_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(300, 1, 12, 12, generator=gen) * 2 + 0.5, torch.zeros(300))


CALIB = dict(widths=[0.25, 0.6, 1.0], num_images=257, seed=3, batch_size=64)
"""5 batches: 4 x 64 images and a last one of 1, so rank 1's last share is empty."""


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SlimmableBatchNorm2d):
            out[f"{name}.mean"], out[f"{name}.var"] = m.running_mean, m.running_var
            for key, (mean, var) in m.width_stats.items():
                out[f"{name}.{key}.mean"], out[f"{name}.{key}.var"] = mean, var
    return {k: v.clone() for k, v in out.items()}


def _calibrate_worker(rank: int, tmp: str) -> None:
    model = _calib_model()
    widths = CALIB["widths"]
    kwargs = {k: v for k, v in CALIB.items() if k != "widths"}
    usnet.calibrate(model, _calib_data(), widths, distributed=True, **kwargs)
    torch.save(_stats(model), Path(tmp) / f"stats{rank}.pt")


def test_distributed_calibration_equals_single_process(tmp_path):
    spawn(_calibrate_worker, str(tmp_path))
    model = _calib_model()
    usnet.calibrate(model, _calib_data(), **CALIB)
    expected = _stats(model)
    assert len(expected) == 2 * 2 * 3  # 2 BN layers x 3 widths x (mean, var)
    for r in (0, 1):
        got = torch.load(tmp_path / f"stats{r}.pt")
        assert got.keys() == expected.keys()
        for key in expected:
            assert (got[key] - expected[key]).abs().max().item() <= 1e-5, (r, key)


def test_sample_shards_make_up_the_single_process_batches():
    data = _calib_data()
    iterable = [x[None] for x, _ in data]
    # 66 = 32 + 32 + 2 images: rank 2's share of the last batch is empty.
    for source, seed in ((data, 2), (iterable, 0)):  # random access, and a plain iterable
        whole = usnet.sample_images(source, 66, seed=seed, batch_size=32)
        shares = [usnet.sample_images(source, 66, seed=seed, batch_size=32, shard=(r, 3))
                  for r in range(3)]  # fmt: skip
        assert [b.shape[0] for b in whole] == [32, 32, 2]
        assert [len(s) for s in shares] == [3, 3, 3]
        for i, batch in enumerate(whole):
            for r in range(3):
                assert torch.equal(shares[r][i], batch[r::3]), (i, r)
        assert shares[2][2].shape == (0, 1, 12, 12)
    with pytest.raises(ValueError, match="shard"):
        usnet.sample_images(data, 8, shard=(2, 2))
    # Too few images, or batches smaller than the world: EVERY rank refuses (one alone would
    # leave the others waiting in the BN statistics' collective).
    for rank in range(3):
        for count, batch_size in ((2, 32), (66, 2)):
            with pytest.raises(ValueError, match="needs batches of at least 3 images"):
                usnet.sample_images(data, count, batch_size=batch_size, shard=(rank, 3))
            with pytest.raises(ValueError, match="needs batches of at least 3 images"):
                usnet.sample_images(iterable, count, batch_size=batch_size, shard=(rank, 3))


# -- SyncBN and the sandwich step's allreduces -------------------------------------------------
WIDTHS = [1.0, 0.25, 0.5, 0.75]
"""One fixed sandwich step (widest first, as the sampler draws it)."""


def _step_model() -> nn.Module:
    torch.manual_seed(0)
    return liven(tiny_slimmable(channels=16))


def _step_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 8, 8, generator=gen) * 1.5 + 0.3, torch.randint(
        0, 10, (8,), generator=gen
    )


def _one_step(model: nn.Module, images, labels, steps: int = 2) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    criterion = InplaceDistillationLoss()
    for _ in range(steps):
        sandwich_step(model, images, labels, optimizer, WIDTHS, criterion)
    inner = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in inner.named_parameters()}


class _AlwaysSync(DistributedDataParallel):
    """DDP without ``no_sync``: sandwich_step then all-reduces after every width."""

    def no_sync(self):
        return contextlib.nullcontext()


def _count_allreduces(ddp: DistributedDataParallel) -> list[int]:
    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return calls


def _step_worker(rank: int, tmp: str) -> None:
    images, labels = _step_batch()
    shard = slice(4 * rank, 4 * rank + 4)  # 2 ranks x 4 images = the 8-image batch
    results = {}
    for name, cls, sync_bn in (("once", DistributedDataParallel, True),
                               ("every_width", _AlwaysSync, True),
                               ("plain_bn", DistributedDataParallel, False)):  # fmt: skip
        model = _step_model()
        if sync_bn:
            distributed.convert_sync_batchnorm(model)
        ddp = cls(model, **_NO_BUFFER_SYNC)
        calls = _count_allreduces(ddp)
        weights = _one_step(ddp, images[shard], labels[shard])
        results[name] = (weights, calls[0])
    torch.save(results, Path(tmp) / f"step{rank}.pt")


def test_sync_bn_ddp_step_equals_one_process_and_allreduces_once(tmp_path):
    spawn(_step_worker, str(tmp_path))
    reference = _one_step(_step_model(), *_step_batch())  # one process, the whole batch
    for rank in (0, 1):
        results = torch.load(tmp_path / f"step{rank}.pt")
        # Gradients all-reduced once per step (one bucket for this tiny model), not per width.
        assert results["once"][1] == 2 * 1
        assert results["every_width"][1] == 2 * len(WIDTHS)
        for name in ("once", "every_width"):
            weights = results[name][0]
            for key, value in reference.items():
                assert (weights[key] - value).abs().max().item() <= 1e-5, (rank, name, key)
        # Without SyncBN each rank normalizes with its half batch: a different step.
        plain = results["plain_bn"][0]
        assert max((plain[k] - v).abs().max().item() for k, v in reference.items()) > 1e-3


class _PerShardBN(nn.Module):
    """The default DDP setting's reference in one process: each shard of the batch runs through
    the model on its own (its BatchNorm normalizes with that shard's statistics), and the losses'
    mean over the whole batch averages the shards' gradients as DDP's allreduce does."""

    def __init__(self, module: nn.Module, shards: int):
        super().__init__()
        self.module, self.shards = module, shards

    def forward(self, x):
        return torch.cat([self.module(part) for part in x.chunk(self.shards)])


def test_default_ddp_step_equals_each_rank_normalizing_its_own_shard(tmp_path):
    """``sync_bn: false`` (the default): the 2-process step equals one process in which each
    rank's BatchNorm sees only its own shard, and differs from whole-batch statistics."""
    spawn(_step_worker, str(tmp_path))
    images, labels = _step_batch()
    reference = _one_step(_PerShardBN(_step_model(), shards=2), images, labels)
    whole_batch = _one_step(_step_model(), images, labels)
    for rank in (0, 1):
        plain = torch.load(tmp_path / f"step{rank}.pt")["plain_bn"]
        assert plain[1] == 2 * 1  # one allreduce per step here too
        for key, value in reference.items():
            assert (plain[0][key] - value).abs().max().item() <= 1e-5, (rank, key)
    assert max((whole_batch[k] - v).abs().max().item() for k, v in reference.items()) > 1e-3


def _nan_worker(rank: int, tmp: str) -> None:
    images, labels = _step_batch()
    if rank == 1:
        images = images.clone()
        images[4, 0, 0, 0] = float("nan")  # in rank 1's shard (images 4-7) only
    ddp = DistributedDataParallel(_step_model(), **_NO_BUFFER_SYNC)
    before = {k: v.detach().clone() for k, v in ddp.module.named_parameters()}
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    try:
        sandwich_step(ddp, images[4 * rank:4 * rank + 4], labels[4 * rank:4 * rank + 4], optimizer,
                      WIDTHS, InplaceDistillationLoss())  # fmt: skip
        outcome = "stepped"
    except FloatingPointError as err:
        outcome = str(err)
    unchanged = all(torch.equal(v, before[k]) for k, v in ddp.module.named_parameters())
    torch.save((outcome, unchanged), Path(tmp) / f"nan{rank}.pt")


def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_step(tmp_path):
    spawn(_nan_worker, str(tmp_path))
    for rank in (0, 1):
        outcome, unchanged = torch.load(tmp_path / f"nan{rank}.pt")
        assert outcome.startswith("non-finite loss") and "did not step" in outcome, (rank, outcome)
        assert unchanged, rank


# -- torchrun -m usnet train -------------------------------------------------------------------
def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m usnet ARGS`` in its own process group,
    killed as a whole (torchrun and its workers) at the deadline or on any failure here."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "usnet", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=DEADLINE)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left by a timeout or a failure here
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_torchrun_cli_trains_and_reports_errors_once(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(FASHION), "--out", str(out), "--set", *TINY, "epochs=1"]
    result = torchrun(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (CHECKPOINT, FINAL, METRICS, "spectrum.csv", "spectrum.json", "spectrum.png"):
        assert (out / name).is_file(), name
    assert "x 2 processes" in result.stdout  # logged once, by rank 0
    assert result.stdout.count("epoch 1/1:") == 1
    assert [r["width"] for r in _records(out, "spectrum")[0]["rows"]] == [0.25, 0.5, 1.0]
    # The same command again: rank 0 finds the run, every rank stops, one error line.
    again = torchrun(*args)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("usnet: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]
    # --resume without CONFIG: rank 0 reads the saved config; the finished run is evaluated again.
    first_spectrum = _records(out, "spectrum")
    resumed = torchrun("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1 and "x 2 processes" in resumed.stdout
    assert _records(out, "spectrum")[-1] == first_spectrum[0]
