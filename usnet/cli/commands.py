"""The commands: ``profile``, ``train``, ``eval``, ``calibrate``, ``export``, ``select``,
``search``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..channels import format_width
from ..errors import UsnetValueError
from ..files import check_output, check_writable
from ..models import model_input_size
from ..train.data import checkpoint_input_size
from .common import (
    calibrate_missing,
    calibration_of,
    check_data_fits,
    data_for,
    distinct_widths_for,
    export_in,
    load_checkpoint_arg,
    load_model_arg,
    same_file,
    search_result,
    spectrum_widths,
)


def cmd_profile(args: argparse.Namespace) -> int:
    from ..deploy.cost import format_profiles, profile

    if args.latency:  # a switchable artifact: latency per entry, written into the file
        from . import switchable as switchable_cli

        return switchable_cli.profile(args)
    if Path(args.model).is_file():  # the run's input size, as eval, select and export use
        model, payload = load_checkpoint_arg(args.model)
        input_size = args.input_size or checkpoint_input_size(model, payload)
    else:
        model = load_model_arg(args.model, args.num_classes, args.in_channels, args.small_input)
        input_size = args.input_size or model_input_size(model)
    from ..progress import progress_bar

    widths = distinct_widths_for(model, args.widths, "profiling")
    bar = progress_bar(len(widths), len(widths) > 20 and sys.stderr.isatty(), "profiling", "width")
    rows = []
    for w in widths:
        rows.append(profile(model, w, input_size))
        bar.update(1)
    bar.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    else:
        print(f"{args.model} at input {'x'.join(map(str, input_size))}")
        print(format_profiles(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..distributed import destroy, init_from_env, join_group_for_any_device
    from ..train.config import load_config
    from ..train.trainer import Trainer, saved_run_config

    overrides = [item for group in args.set for item in group]
    if args.config is None:
        if not args.resume:
            raise UsnetValueError(
                "usnet train needs a CONFIG file (e.g. configs/fashion_mnist.yaml)"
            )
        if overrides:
            raise UsnetValueError(
                "--set needs the CONFIG file it modifies; --resume alone reuses the saved config"
            )
    try:
        if args.config is None:
            # Rank 0 reads the saved config and broadcasts it, so the group comes first.
            join_group_for_any_device()
            config = saved_run_config(args.out)
        else:
            config = load_config(args.config, overrides)
        # Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs) or keep the one
        # joined above, and pick this rank's device; else a no-op.
        init_from_env(config.device)
        Trainer(config, args.out, resume=args.resume).run()
    finally:
        destroy()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .. import checkpoint
    from ..calibration import calibrate, is_calibrated
    from ..deploy.spectrum import format_spectrum, spectrum_rows
    from ..evaluation import evaluate

    payload = checkpoint.read_checkpoint(args.checkpoint)
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, test_set, info) = data_for(
        args.checkpoint, payload, args.data, args.dataset
    )
    check_data_fits(model, info, args.checkpoint, config.data.name)
    widths = distinct_widths_for(
        model, args.widths or spectrum_widths(payload, model), "evaluating"
    )
    missing = [w for w in widths if not is_calibrated(model, w)]
    if missing:
        print(
            f"calibrating {len(missing)} uncalibrated widths on {config.calib.num_images} training images"
        )
        calibrate(model, calib_set, missing, num_images=config.calib.num_images, seed=config.seed,
                  batch_size=config.calib.batch_size)  # fmt: skip
    results = evaluate(model, DataLoader(test_set, batch_size=config.eval.batch_size), widths,
                       progress=sys.stderr.isatty() and not args.json)  # fmt: skip
    rows = spectrum_rows(model, widths, results, info.input_size)
    print(json.dumps(rows) if args.json else format_spectrum(rows))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .. import checkpoint
    from ..calibration import calibrate, needs_calibration
    from ..state import get_state

    payload = checkpoint.read_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint
    replacing = None
    elsewhere = args.out is not None and not same_file(args.out, args.checkpoint)
    if elsewhere:
        replacing = check_output(args.out, force=args.force, own=calibration_of(payload))
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    if not needs_calibration(model):  # LayerNorm/GroupNorm: every width is ready as trained
        for w in args.widths:
            get_state(model).plan.check_width(w)
        wrote = ""
        if elsewhere:  # the copy asked for, so a script's next step finds it
            checkpoint.save(model, out, extra=payload.get("extra"))
            wrote = f"; wrote {out} unchanged{f' (replacing {replacing})' if replacing else ''}"
        print(f"nothing to calibrate: {args.checkpoint} has no BatchNorm layers (every width is "
              f"ready without calibration){wrote}")  # fmt: skip
        return 0
    config, (_, calib_set, _, info) = data_for(args.checkpoint, payload, args.data, args.dataset)
    check_data_fits(model, info, args.checkpoint, config.data.name)
    keys = calibrate(model, calib_set, args.widths, num_images=args.images, seed=args.seed,
                     batch_size=config.calib.batch_size)  # fmt: skip
    checkpoint.save(model, out, extra=payload.get("extra"))
    used = min(args.images, len(calib_set))
    print(f"calibrated {len(keys)} channel configurations ({len(args.widths)} widths) on "
          f"{used} images; wrote {out}{f' (replacing {replacing})' if replacing else ''}")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.artifact import check_format, earlier_export_rows, export_artifact, export_widths
    from ..deploy.cost import format_count
    from ..state import get_state

    if args.switchable or args.entry:  # one file, every width
        from . import switchable as switchable_cli

        return switchable_cli.export(args)
    check_format(args.format)
    if (args.width is None) == (args.widths is None):
        raise UsnetValueError(
            "give one of --width W (one file) or --widths SPEC (a directory with index.json)"
        )
    replacing = None
    if args.width is not None:
        replacing = check_output(args.out, force=args.force, own=export_in(args.format))
    model, payload = load_checkpoint_arg(args.checkpoint)
    plan = get_state(model).plan
    widths = [args.width] if args.width is not None else args.widths
    widths = [plan.check_width(w) for w in widths]
    input_size = args.input_size or checkpoint_input_size(model, payload)
    options = {"fuse_bn": args.fuse_bn, "input_size": input_size, "tolerance": args.tolerance}
    if args.widths is not None:  # an earlier export there: its settings must match (merged)
        earlier_export_rows(Path(args.out), args.format, options)
    calibrate_missing(model, payload, widths, args)
    runtime = {"pt": "torch.export.load", "torchscript": "torch.jit.load", "onnx": "onnxruntime"}[
        args.format
    ]
    if args.width is not None:
        result = export_artifact(model, widths[0], args.out, args.format, **options)
        if args.json:
            print(json.dumps(result.to_dict()))
            return 0
        print(f"wrote {result.path}: {args.format}, width {result.width}, params "
              f"{format_count(result.params)}, MACs {format_count(result.macs)} at input "
              f"{'x'.join(map(str, result.input_size))}{', BN folded into conv' if args.fuse_bn else ''}"
              f"{f' (replacing {replacing})' if replacing else ''}")  # fmt: skip
        print(f"verified with {runtime}: max |logits difference| {result.max_abs_diff:.3g} "
              f"<= tolerance {result.tolerance:g}")  # fmt: skip
        return 0
    spectrum = payload.get("extra", {}).get("spectrum")
    rows = export_widths(model, widths, args.out, args.format, spectrum=spectrum, **options)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'width':>7} {'params':>9} {'MACs':>9} {'top-1':>7} {'max diff':>9}  file")
    for r in rows:
        top1 = f"{100 * r['top1']:.2f}%" if "top1" in r else "-"
        width = format_width(r["width"], ".3f")
        print(f"{width!s:>7} {format_count(r['params']):>9} {format_count(r['macs']):>9} {top1:>7} "
              f"{r['max_abs_diff']:>9.2g}  {r['file']}")  # fmt: skip
    print(f"wrote {len({r['file'] for r in rows})} {args.format} files and {Path(args.out) / 'index.json'}; "
          f"all verified with {runtime}")  # fmt: skip
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from ..deploy.select import check_cache_dir, format_selection, plot_selection, select_width
    from ..files import atomic_write_bytes

    if str(args.checkpoint).endswith(".onnx"):  # a switchable artifact and its latency table
        from . import switchable as switchable_cli

        return switchable_cli.select(args)
    if args.plot:
        check_writable(args.plot, "--plot")
    if args.latency_cache and args.max_latency_ms is not None:
        check_cache_dir(args.latency_cache)
    if args.max_latency_ms is not None:  # before any profiling: a bad device fails at once
        from ..device import resolve_device

        resolve_device(args.device)
    model, payload = load_checkpoint_arg(args.checkpoint)
    selection = select_width(
        model, max_macs=args.max_macs, max_params=args.max_params, max_latency_ms=args.max_latency_ms,
        input_size=args.input_size or checkpoint_input_size(model, payload), widths=args.widths,
        spectrum=payload.get("extra", {}).get("spectrum"), device=args.device, threads=args.threads,
        warmup=args.warmup, repeats=args.repeats, cache_dir=args.latency_cache,
        progress=sys.stderr.isatty() and not args.json,
    )  # fmt: skip
    if args.plot:
        atomic_write_bytes(args.plot, plot_selection(selection, title=Path(args.checkpoint).name))
    if args.json:
        print(json.dumps(selection.to_dict()))
    else:
        print(format_selection(selection))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset

    from .. import checkpoint
    from ..deploy.search import format_search, search_data, search_width
    from ..evaluation import evaluate
    from ..files import atomic_write_bytes

    payload = checkpoint.read_checkpoint(args.checkpoint)
    replacing = {}  # checked before the search, which may take long
    if args.out:
        replacing[args.out] = check_output(args.out, force=args.force, own=search_result)
    if args.save:
        replacing[args.save] = check_output(args.save, force=args.force, option="--save",
                                            own=calibration_of(payload))  # fmt: skip
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, test_set, info) = data_for(
        args.checkpoint, payload, args.data, args.dataset
    )
    check_data_fits(model, info, args.checkpoint, config.data.name)
    if args.test_images < 1:
        raise UsnetValueError("--test-images must be a positive number of images")
    calib, heldout = search_data(calib_set, args.calib_images, args.heldout_images, args.seed,
                                 config.calib.batch_size)  # fmt: skip
    log = (lambda message: None) if args.json else print
    result = search_width(model, calib, heldout, max_macs=args.max_macs, input_size=info.input_size,
                          step=args.step, log=log)  # fmt: skip
    test = Subset(test_set, range(min(args.test_images, len(test_set))))
    (searched, _), (uniform, _) = evaluate(model, DataLoader(test, batch_size=config.eval.batch_size),
                                           [result.result.width, result.uniform.width])  # fmt: skip
    report = {**result.to_dict(), "test_top1": {"searched": searched, "uniform": uniform},
              "test_images": len(test), "input_size": list(info.input_size)}  # fmt: skip
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    if args.save:
        checkpoint.save(model, args.save, extra=payload.get("extra"))
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_search(result, {"searched": searched, "uniform": uniform}))
    print(f"test top-1 on {len(test)} images; searched width: {json.dumps(result.width)}")
    for path, what in ((args.out, "result"), (args.save, "checkpoint with its BN statistics")):
        if path:
            print(
                f"wrote {what} to {path}"
                + (f" (replacing {replacing[path]})" if replacing.get(path) else "")
            )
    return 0
