"""``usnet train``: the training run from config to calibrated checkpoint and spectrum.

Data flow: config -> datasets -> zoo model -> sandwich-rule steps (``usnet.train.sandwich``) ->
per-epoch atomic checkpoint (+ validation at the narrowest and widest widths, calibrated on a
small sample) -> final BN calibration of every evaluated width (skipped for models without
BatchNorm statistics, e.g. LayerNorm transformers) -> test accuracy across the width
range -> ``spectrum.csv``/``.json``/``.png`` and the final checkpoint (``usnet.save`` format).

Reproducibility: the widths come from the sampler's own seeded generator, the data order and
augmentation of epoch ``e`` from generators seeded with ``(seed, e)``; checkpoints hold the
optimizer, scheduler and sampler states, so ``--resume`` continues exactly where the last
checkpoint left off.

Distributed (``torchrun ... -m usnet train``, see :mod:`usnet.distributed`): ``batch_size`` is the
*global* batch, split evenly over the ranks, and the data order is the single-process one, dealt
out by ``DistributedSampler``: step ``k`` of every rank together sees exactly the images of the
single-process step ``k``. Every rank draws the same widths (same seeded sampler), the model is
wrapped in ``DistributedDataParallel`` (gradients all-reduced once per sandwich step), per-epoch
validation and the final calibration are sharded over the ranks with all-reduced statistics and
counts, and only rank 0 writes files. ``--resume`` reads the checkpoint on rank 0 and broadcasts it.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..calibration import calibrate, needs_calibration
from ..channels import parse_widths
from ..convert import ConversionError
from ..deploy.spectrum import format_spectrum, spectrum_rows, write_spectrum
from ..device import rank_device
from ..errors import ConfigError, DataError, TrainingError
from ..evaluation import evaluate
from ..files import check_writable
from ..models.sources import ConvertOptions, build_model, parse_model
from ..progress import step_bar
from ..state import enable_switchable_bn, get_state, set_width
from .config import TrainConfig, config_diff, config_from_saved, load_run_config
from .data import DataInfo, TensorBatches, as_tensors, datasets_for
from .distill import InplaceDistillationLoss
from .recipe import make_optimizer, make_scheduler
from .rundir import (
    CHECKPOINT,
    FINAL,
    METRICS,
    RunLock,
    append_metric,
    holds_run,
    resumable_checkpoint,
    truncate_metrics,
)
from .samplers import FixedWidths, WidthSampler
from .sandwich import SandwichRule, warm_up_widths
from .warm_start import teacher_probs


class Trainer:
    def __init__(self, config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
                 log: Callable[[str], None] = print, progress: bool | None = None):  # fmt: skip
        self.config = config
        self.out = Path(out_dir)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else _silent
        self.progress = progress if self.is_main else False
        self.device = rank_device(config.device)
        if config.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {config.batch_size} is the global batch and must be divisible by the "
                f"{self.world_size} processes"
            )
        self.rank_batch_size = config.batch_size // self.world_size
        self.lock = RunLock(self.out)  # held by rank 0 from here to the end of run()
        saved = dist.run_on_main(lambda: self._check_out_dir(resume))
        try:
            self._setup(config, saved)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, config: TrainConfig, saved: dict | None) -> None:
        if config.amp == "fp16" and self.device.type == "cpu":
            raise ConfigError(
                "amp=fp16 on the CPU runs about 150x slower than fp32 (no fast float16 CPU "
                "kernels); use amp=bf16 (or none) on the CPU, fp16 on CUDA"
            )
        self.train_set, self.calib_set, self.test_set, self.info = datasets_for(config)
        self._train_tensors: tuple[Tensor, Tensor] | bool | None = None  # see train_loader
        if self.info.num_classes < 2:
            raise DataError(
                f"{config.data.name} data holds {self.info.num_classes} class; a classifier needs "
                "at least 2 (an image folder: one subdirectory per class)"
            )
        torch.manual_seed(config.seed)  # the initial weights are part of the run's identity
        self.model = self._build_model(self.info).to(self.device)
        self.teacher = self._apply_init(fresh=saved is None)  # warm start: init / teacher
        self.teacher_seconds = 0.0
        if config.mode == "slimmable":  # the earlier scheme: switchable BN at fixed widths
            enable_switchable_bn(self.model, config.widths)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.sync_bn:
            dist.convert_sync_batchnorm(self.model)  # a no-op in a single process
        self.evaluated_widths = (
            self.eval_widths()
        )  # a bad eval.widths fails now, not after training
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} exceeds the {len(self.train_set)} training images"
            )
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.model, lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay, nesterov=config.nesterov,
                                        kind=config.optimizer, betas=tuple(config.betas))  # fmt: skip
        # LayerNorm/GroupNorm models (transformers) keep no BN statistics: nothing to calibrate.
        self.calibrates = needs_calibration(self.model)
        self.scheduler = make_scheduler(
            self.optimizer, total_steps=self.total_steps,
            warmup_steps=int(round(config.warmup_epochs * self.steps_per_epoch)),
            schedule=config.lr_schedule,
        )  # fmt: skip
        self.sampler = self._build_sampler()
        self.criterion = InplaceDistillationLoss(
            label_smoothing=config.label_smoothing,
            temperature=config.distill_temperature,
            enabled=config.inplace_distill,
            label_weight=config.distill_label_weight,
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            config.amp
        ]
        self.epoch = 0
        self.step = 0
        self.tb = None
        if saved is not None:
            self._restore(saved)
        # What the step runs: DDP in a process group (its construction broadcasts rank 0's
        # weights, so every rank starts equal), else the model itself. Buffers are not
        # broadcast: BN keeps no running statistics in training (calibrated per width instead).
        # Switchable BN's private parameters of the other widths are unused in the last
        # (synchronizing) backward pass of a step.
        self.train_model: nn.Module = self.model
        if dist.is_distributed():
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.mode == "slimmable", **_NO_BUFFER_SYNC,
            )  # fmt: skip
        # The step itself: the public training API (usnet.SandwichRule), one implementation.
        self.rule = SandwichRule(self.train_model, sampler=self.sampler, criterion=self.criterion,
                                 scaler=self.scaler, autocast_dtype=self.autocast_dtype)  # fmt: skip

    # -- setup ---------------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> dict | None:
        """On rank 0: take the run directory's lock, then check what it holds."""
        check_writable(self.out / METRICS, "--out")
        for note in self.lock.acquire():
            self.log(note)
        try:
            return self._check_run(resume)
        except BaseException:
            self.lock.release()
            raise

    def _check_run(self, resume: bool) -> dict | None:
        if not resume:
            if holds_run(self.out):
                raise FileExistsError(
                    f"{str(self.out)!r} already holds a run; pass --resume to continue it or choose "
                    "another --out (nothing was overwritten)"
                )
            return None
        payload = resumable_checkpoint(self.out)
        saved = payload["extra"]["config"]
        completed = config_from_saved(saved).to_dict()  # fields added since: as before they existed
        changed = sorted(config_diff(completed, self.config.to_dict()))
        if changed:
            raise ConfigError(
                f"--resume with a changed config ({', '.join(changed)}); resume with the saved "
                "config or start a new run in another --out"
            )
        added = sorted(config_diff(saved, completed))
        if added:
            self.log(f"the checkpoint predates config fields {', '.join(added)}: "
                     "resuming as before they existed")  # fmt: skip
        return payload

    def _build_model(self, info: DataInfo) -> nn.Module:
        c = self.config
        width_range = (c.width, c.width) if c.mode == "individual" else tuple(c.width_range)
        spec = parse_model(c.model, c.model_kwargs)
        try:
            return build_model(spec, num_classes=info.num_classes, in_channels=info.in_channels,
                               input_size=info.input_size, width_range=width_range,
                               convert=ConvertOptions.from_dict(dataclasses.asdict(c.convert)),
                               small_input=info.small_input)  # fmt: skip
        except TypeError as err:  # a zoo builder's keyword arguments
            raise ConfigError(f"model_kwargs for {c.model!r}: {err}") from None
        except ConversionError as err:
            raise ConfigError(f"model {c.model!r} cannot be made slimmable: {err}") from None

    def _apply_init(self, fresh: bool) -> nn.Module | None:
        """``init``: load the trained weights (and reorder their channels) into a new run's model;
        ``teacher: init``: a frozen copy of the trained model (rebuilt from the file on resume)."""
        from .reorder import reorder_channels
        from .warm_start import load_init, make_teacher, reorder_batches

        c = self.config
        if c.init.checkpoint is None:
            return None
        target = self.model if fresh else self._build_model(self.info).to(self.device)
        source = load_init(target, c.init.checkpoint, c.model, self.info.num_classes)
        teacher = make_teacher(target, c.channels_last) if c.teacher == "init" else None
        if fresh:
            self.log(f"initialized from {source}")
            if c.init.reorder != "none":
                data = reorder_batches(
                    self.train_set, c.init.num_images, c.calib.batch_size, c.seed
                )
                reorder_channels(self.model, c.init.reorder, data=data, num_images=c.init.num_images,
                                 log=self.log)  # fmt: skip
        return teacher

    def _build_sampler(self):
        c = self.config
        if c.mode == "individual":
            return FixedWidths([c.width])
        if c.mode == "slimmable":
            return FixedWidths(c.widths)
        return WidthSampler(get_state(self.model).width_range, num_widths=c.num_widths, seed=c.seed,
                            ends=c.sandwich_ends)  # fmt: skip

    def _restore(self, payload: dict) -> None:
        ckpt.load_into(self.model, payload, str(self.out / CHECKPOINT))
        state = payload["extra"]["trainer"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._truncate_metrics(self.step)
        self.log(f"resumed from {self.out / CHECKPOINT} at epoch {self.epoch}, step {self.step}")

    # -- logging -------------------------------------------------------------------------------
    def _metric(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_metric(self.out, record)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(
                        f"{record['kind']}/{key}", value, record.get("step", self.step)
                    )

    def _truncate_metrics(self, step: int) -> None:
        if self.is_main:
            truncate_metrics(self.out, step)

    def distillation(self) -> str:
        """Which distillation the run uses: ``teacher`` (from the init model, instead of
        in-place), ``teacher+inplace`` (alongside it), ``inplace`` or ``none``."""
        c = self.config
        inplace = c.inplace_distill and c.mode != "individual"
        if self.teacher is not None:
            return "teacher+inplace" if inplace else "teacher"
        return "inplace" if inplace else "none"

    def describe_losses(self) -> str:
        c = self.config
        smoothing = f", label smoothing {c.label_smoothing}" if c.label_smoothing else ""
        if self.teacher is not None:
            mix = (f", mixed with {c.distill_label_weight:g} x cross-entropy with labels{smoothing}"
                   if c.distill_label_weight else "")  # fmt: skip
            teacher = f"the frozen init model {c.init.checkpoint} (T={c.distill_temperature})"
            if self.distillation() == "teacher":
                return f"every width, the widest included: distillation from {teacher}{mix} (instead of in-place distillation)"
            return (f"widest width: distillation from {teacher}{mix}; every narrower width: distillation "
                    f"from the mean of its and the widest's softmax{mix} (alongside in-place distillation)")  # fmt: skip
        if c.mode == "individual":
            return f"width {c.width}: cross-entropy with labels{smoothing}"
        if not c.inplace_distill:
            return f"every width: cross-entropy with labels{smoothing} (in-place distillation off)"
        mix = (f", mixed with {c.distill_label_weight:g} x cross-entropy with labels"
               if c.distill_label_weight else "")  # fmt: skip
        if c.distill_warmup_epochs:
            mix += (f" (label weight falling linearly from 1 over the first "
                    f"{c.distill_warmup_epochs:g} epochs)")  # fmt: skip
        return (f"widest width: cross-entropy with labels{smoothing}; every narrower width: "
                f"in-place distillation from the widest's detached softmax (T={c.distill_temperature}){mix}")  # fmt: skip

    # -- the run -------------------------------------------------------------------------------
    def train_loader(self, epoch: int) -> DataLoader | TensorBatches:
        """This rank's batches of ``epoch``: a permutation seeded with ``(seed, epoch)``, dealt
        out round-robin (``DistributedSampler``), ``batch_size / world_size`` images per step.
        The ranks' step-``k`` batches together are images ``k*B .. k*B+B-1`` of the permutation,
        the single-process step ``k``; the remainder of the epoch is dropped. A dataset held in
        memory without augmentation (Fashion-MNIST) is moved to the device once and batches are
        sliced from it (:class:`~usnet.data.TensorBatches`, the same batches)."""
        sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=_epoch_seed(self.config.seed, 0),
                                     drop_last=True)  # fmt: skip
        sampler.set_epoch(epoch)  # the permutation's seed is seed + epoch
        if self._train_tensors is None:
            tensors = as_tensors(self.train_set)
            self._train_tensors = (
                False if tensors is None else tuple(t.to(self.device) for t in tensors)
            )
        if self._train_tensors:  # in memory, no augmentation: batches sliced on the device
            return TensorBatches(*self._train_tensors, list(sampler), self.rank_batch_size)
        return DataLoader(self.train_set, batch_size=self.rank_batch_size, sampler=sampler,
                          drop_last=True, num_workers=self.config.data.num_workers,
                          pin_memory=self.device.type == "cuda")  # fmt: skip

    def run(self, max_epochs: int | None = None) -> list[dict] | None:
        """Train to ``config.epochs`` (or stop after ``max_epochs`` more), then calibrate and
        evaluate the spectrum. Returns the spectrum rows, or None if stopped early."""
        from torch.utils.tensorboard import SummaryWriter

        c = self.config
        if self.is_main and not self.lock.held:  # a run continued in steps takes it again
            for note in self.lock.acquire():
                self.log(note)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                # A run that died before its first checkpoint left only logs: start them afresh.
                self._truncate_metrics(-1)
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step)
        try:
            if self.step == 0:
                self._metric({"kind": "run", "step": 0, "config": c.to_dict(),
                              "losses": self.describe_losses(), "distillation": self.distillation(),
                              "device": str(self.device)})  # fmt: skip
            ranks = f" x {self.world_size} processes" if dist.is_distributed() else ""
            self.log(f"training {c.model} ({c.trained_widths_description()}) on {c.data.name}: "
                     f"{len(self.train_set)} images, {c.epochs} epochs x {self.steps_per_epoch} steps, "
                     f"device {self.device}{ranks}")  # fmt: skip
            self.log(f"losses: {self.describe_losses()}")
            stop = c.epochs if max_epochs is None else min(c.epochs, self.epoch + max_epochs)
            if c.cudnn_benchmark and self.epoch < stop:
                self._warm_up()
            while self.epoch < stop:
                self._train_epoch()
                self.epoch += 1
                self._save_checkpoint()  # first: a failing validation must not cost the epoch
                if c.eval.every_epoch:
                    self._validate_ends()
            if self.epoch < c.epochs:
                return None
            return self._finish()
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None
            self.lock.release()

    def _warm_up(self) -> None:
        """Turn on cuDNN autotuning and run every channel configuration the run can train once
        (``warm_up_widths``: weights, optimizer, random state untouched), so all tuning happens
        here instead of whenever the sampler first draws a configuration."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # PyTorch's process-wide switch, by request
        images, _ = next(iter(self.train_loader(self.epoch)))
        images = images.to(self.device)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        plan = get_state(self.model).plan
        widths = [self.config.width] if self.config.mode == "individual" else (
            self.config.widths if self.config.mode == "slimmable" else plan.distinct_widths())  # fmt: skip
        start = time.perf_counter()
        self.model.train()
        count = warm_up_widths(self.train_model, images, widths, autocast_dtype=self.autocast_dtype)
        self.log(f"warmed up {count} channel configurations in {time.perf_counter() - start:.1f}s"
                 + (" (cuDNN autotuning on)" if self.device.type == "cuda" else ""))  # fmt: skip

    def _train_epoch(self) -> None:
        c = self.config
        # Dropout/augmentation in this process; other ranks see other images, so other draws.
        torch.manual_seed(_epoch_seed(c.seed, self.epoch) + 1_000_003 * self.rank)
        self.model.train()
        bar = step_bar(self.steps_per_epoch, f"epoch {self.epoch + 1}/{c.epochs}", self.progress)
        seen, start = 0, time.perf_counter()
        for images, labels in self.train_loader(self.epoch):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if c.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self.criterion.label_weight = self.distill_label_weight(self.step)
            extra = {}
            if self.teacher is not None:  # once per batch, no_grad, in the training precision
                tick = time.perf_counter()
                extra["teacher_probs"] = teacher_probs(self.teacher, images, c.distill_temperature,
                                                       self.autocast_dtype)  # fmt: skip
                if images.is_cuda:  # the time of the work, not of queueing it
                    torch.cuda.synchronize(images.device)
                self.teacher_seconds += time.perf_counter() - tick
            try:
                result = self.rule.step(images, labels, self.optimizer, **extra)
            except FloatingPointError as err:
                raise TrainingError(
                    f"stopped at epoch {self.epoch + 1}, step {self.step + 1}: {err}; the last good "
                    f"checkpoint is {self.out / CHECKPOINT if (self.out / CHECKPOINT).exists() else 'none (first epoch)'}"
                ) from None
            self.scheduler.step()
            self.step += 1
            seen += images.shape[0] * self.world_size
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{result.widest_loss:.3f}", img_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == 1:
                record = {"kind": "train", "step": self.step, "epoch": self.epoch + 1,
                          "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": rate,
                          "loss_widest": result.widest_loss,
                          "loss_narrowest": result.narrowest_loss,
                          "widths": result.widths, "width_losses": result.losses,
                          "loss_kinds": result.loss_kinds}  # fmt: skip
                if self.teacher is not None:
                    record["teacher_s"] = self.teacher_seconds
                self._metric(record)
        bar.close()
        if self.teacher is not None:  # the teacher's cost, for benchmarks/warm_start.py
            self._metric({"kind": "teacher", "step": self.step, "epoch": self.epoch + 1,
                          "teacher_s": self.teacher_seconds})  # fmt: skip
        teacher = (
            f", teacher forward {self.teacher_seconds:.1f}s so far"
            if self.teacher is not None
            else ""
        )
        self.log(f"epoch {self.epoch + 1}/{c.epochs}: {seen} images in "
                 f"{time.perf_counter() - start:.0f}s ({seen / max(time.perf_counter() - start, 1e-9):.0f} img/s){teacher}")  # fmt: skip

    def distill_label_weight(self, step: int) -> float:
        """Weight of the labels in the narrower widths' loss at ``step``: with a distillation
        warm-up it falls linearly from 1 (labels only, while the widest is a poor teacher) to
        ``distill_label_weight``."""
        c = self.config
        warmup = c.distill_warmup_epochs * self.steps_per_epoch
        if step >= warmup:
            return c.distill_label_weight
        return 1.0 - (1.0 - c.distill_label_weight) * step / warmup

    def _end_widths(self) -> list[float]:
        lo, hi = get_state(self.model).width_range
        return [lo] if lo == hi else [lo, hi]

    def _validate_ends(self) -> None:
        c = self.config
        widths = self._end_widths()
        if self.calibrates:
            calibrate(self.model, self.calib_set, widths, num_images=c.eval.epoch_calib_images,
                      seed=c.seed + self.epoch, batch_size=c.calib.batch_size, progress=False,
                      distributed=True)  # fmt: skip
        results = evaluate(self.model, self.test_loader(), widths, self.device, distributed=True)
        record = {"kind": "val", "step": self.step, "epoch": self.epoch}
        for w, (top1, top5) in zip(widths, results):
            record[f"top1@{w:g}"] = top1
            record[f"top5@{w:g}"] = top5
        self._metric(record)
        how = (f"BN calibrated on {c.eval.epoch_calib_images} images" if self.calibrates
               else "no BatchNorm: not calibrated")  # fmt: skip
        self.log(f"  validation ({how}): "
                 + ", ".join(f"width {w:g} top-1 {100 * r[0]:.2f}%" for w, r in zip(widths, results)))  # fmt: skip

    def test_loader(self) -> DataLoader:
        """This rank's share of the test set (every ``world_size``-th image from ``rank``)."""
        data = self.test_set
        if self.world_size > 1:
            data = Subset(data, range(self.rank, len(data), self.world_size))
        return DataLoader(data, batch_size=self.config.eval.batch_size,
                          num_workers=self.config.data.num_workers)  # fmt: skip

    def trainer_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def _save_checkpoint(self) -> None:
        if not self.is_main:
            return
        ckpt.save(self.model, self.out / CHECKPOINT,
                  extra={"config": self.config.to_dict(), "trainer": self.trainer_state()})  # fmt: skip

    def _finish(self) -> list[dict]:
        c = self.config
        widths = self.eval_widths()
        if self.calibrates:
            self.log(
                f"calibrating BN at {len(widths)} widths on {c.calib.num_images} training images"
            )
            calibrate(self.model, self.calib_set, widths, num_images=c.calib.num_images, seed=c.seed,
                      batch_size=c.calib.batch_size, progress=self.progress, distributed=True)  # fmt: skip
        else:
            self.log(NO_CALIBRATION)
        results = evaluate(self.model, self.test_loader(), widths, self.device, distributed=True)
        rows = spectrum_rows(self.model, widths, results, self.info.input_size)
        set_width(self.model, get_state(self.model).width_range[1])
        if self.is_main:
            write_spectrum(self.out, rows, title=f"{c.model} on {c.data.name}")
            ckpt.save(self.model, self.out / FINAL,
                      extra={"config": c.to_dict(), "spectrum": rows, "trainer": self.trainer_state()})  # fmt: skip
        self._metric({"kind": "spectrum", "step": self.step, "rows": rows})
        self.log(format_spectrum(rows))
        self.log(
            f"wrote {self.out / FINAL}, {self.out / 'spectrum.csv'}, spectrum.json, spectrum.png"
        )
        return rows

    def eval_widths(self) -> list[float]:
        lo, hi = get_state(self.model).width_range
        if lo == hi:
            return [lo]
        given = parse_widths(self.config.eval.widths)
        widths = [w for w in given if lo - 1e-9 <= w <= hi + 1e-9]
        if not widths:
            raise ConfigError(
                f"eval.widths {self.config.eval.widths!r} has no width in [{lo}, {hi}]"
            )
        outside = [w for w in given if w not in widths]
        if outside and not hasattr(self, "evaluated_widths"):  # said once, before training
            listed = ", ".join(f"{w:g}" for w in outside[:4]) + (
                ", ..." if len(outside) > 4 else ""
            )
            self.log(f"eval.widths: evaluating the {len(widths)} widths inside the width range "
                     f"[{lo}, {hi}]; {len(outside)} outside it are skipped ({listed})")  # fmt: skip
        return widths


NO_CALIBRATION = "no BatchNorm layers: calibration not needed"
"""The log line of a run whose model keeps no BatchNorm statistics (LayerNorm, GroupNorm)."""

# PyTorch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (2.11 knows only the former).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def saved_run_config(out_dir: str | Path) -> TrainConfig:
    """The config of the run in ``out_dir`` that ``--resume`` continues (``usnet train --resume``
    without a CONFIG file). Read on rank 0 only and handed to the other ranks, like the checkpoint
    itself, so other machines need no shared file system; call it inside the process group."""
    return dist.run_on_main(lambda: load_run_config(resumable_checkpoint(out_dir)))
