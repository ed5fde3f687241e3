"""The ``usnet`` command line: ``train``, ``eval``, ``calibrate``, ``profile``, ``export``,
``select``, ``search``, ``serve``.

Every command reports bad input as one line, ``usnet: error: ...``, and exits with status 2:
usnet's own errors (:class:`~usnet.errors.UsnetError`), ``OSError`` (a missing or unwritable
file, a full disk) and argument errors. Anything else is a real failure (a bug, CUDA out of
memory, a lost process group): it keeps its traceback and exits with status 1. Ctrl-C exits with
status 130 (``train`` says how to continue).
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .channels import format_width, parse_widths
from .errors import UsnetError, UsnetValueError
from .files import check_output, check_writable

USER_ERRORS = (UsnetError, OSError, argparse.ArgumentError, argparse.ArgumentTypeError)
"""What the command line reports as one line (exit 2); every other exception is a failure."""


def parse_input_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 4 or min(size) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid input size {text!r}; expected N,C,H,W such as 1,3,224,224"
        )
    return size


def whole_number(least: int):
    """An argparse type: a whole number >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value

    return parse


def widths_arg(text: str) -> list[float]:
    try:
        return parse_widths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_model_arg(spec: str, num_classes: int | None = None, in_channels: int | None = None,
                   small_input: bool = False) -> nn.Module:  # fmt: skip
    """A checkpoint path written by ``usnet.save``, or a zoo model name (an existing file of
    that name wins, as in every command)."""
    from . import checkpoint, models

    if Path(spec).is_file():
        return checkpoint.load(spec)
    if spec in models.list_models():
        kwargs = {"small_input": small_input}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        return models.create_model(spec, **kwargs)
    raise UsnetValueError(
        f"{spec!r} is neither a zoo model ({', '.join(models.list_models())}) nor a checkpoint file"
    )


def default_input_size(model: nn.Module) -> tuple[int, int, int, int]:
    """The input the model was built for (its zoo architecture record)."""
    from .models import model_input_size

    return model_input_size(model)


def cmd_profile(args: argparse.Namespace) -> int:
    from .cost import format_profiles, profile

    if Path(args.model).is_file():  # the run's input size, as eval, select and export use
        model, payload = _load_checkpoint(args.model)
        input_size = args.input_size or _input_size_of(model, payload)
    else:
        model = load_model_arg(args.model, args.num_classes, args.in_channels, args.small_input)
        input_size = args.input_size or default_input_size(model)
    from .reports import progress_bar

    widths = _distinct_widths(model, args.widths, "profiling")
    bar = progress_bar(len(widths), len(widths) > 20 and sys.stderr.isatty(), "profiling", "width")
    rows = []
    for w in widths:
        rows.append(profile(model, w, input_size))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    else:
        print(f"{args.model} at input {'x'.join(map(str, input_size))}")
        print(format_profiles(rows))
    return 0


def _distinct_widths(model: nn.Module, widths: list, doing: str) -> list:
    """One width per distinct channel configuration (the others are the same network), saying
    so when that drops any."""
    from .channels import distinct_widths
    from .state import get_state

    plan = get_state(model).plan
    distinct = distinct_widths(plan, [plan.check_width(w) for w in widths])
    if len(distinct) < len(widths):
        print(f"{len(widths)} widths give {len(distinct)} distinct channel configurations; "
              f"{doing} each once", file=sys.stderr)  # fmt: skip
    return distinct


def check_data_fits(model: nn.Module, info, source: str, dataset: str) -> None:
    """Refuse data whose image channels or classes differ from the model's, naming both (else
    torch fails mid-run with a shape error, or accuracy is computed against the wrong labels)."""
    from .errors import DataError

    channels, classes = model_io(model, info.input_size)
    if channels != info.in_channels:
        raise DataError(
            f"{source} takes {channels}-channel images but the {dataset} data has "
            f"{info.in_channels}-channel images; use the dataset it was trained on (--dataset, --data)"
        )
    if classes != info.num_classes:
        raise DataError(
            f"{source} has {classes} classes but the {dataset} data has {info.num_classes}; use "
            "the dataset it was trained on (--dataset, --data)"
        )


def model_io(model: nn.Module, input_size) -> tuple[int, int]:
    """(input channels, classes) of a slimmable classifier: from its zoo architecture record and
    build arguments, else from one forward pass of its plain export on a zero image."""
    import torch

    from .models import model_input_size
    from .plain import export
    from .state import get_state

    state = get_state(model)
    channels = model_input_size(model)[1]
    classes = (state.arch or {}).get("kwargs", {}).get("num_classes")
    if classes is None:
        plain = export(model, state.width_range[1], require_stats=False)
        ref = next(plain.parameters())
        with torch.no_grad():
            out = plain.eval()(
                torch.zeros((1, channels, *input_size[2:]), dtype=ref.dtype, device=ref.device)
            )
        classes = out.shape[-1]
    return int(channels), int(classes)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import destroy, init_from_env, join_group_for_any_device
    from .trainer import Trainer, saved_run_config

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


def _data_for(model_path: str, payload: dict, data_root: str | None, dataset: str | None):
    from .config import TrainConfig, load_run_config
    from .data import datasets_for

    config = load_run_config(payload)
    if config is None:
        if dataset is None:
            raise UsnetValueError(
                f"{model_path!r} records no training config: pass --dataset and --data"
            )
        config = TrainConfig()
    if dataset is not None:
        config.data.name = dataset
    if data_root is not None:
        config.data.root = data_root
    # The commands score on the test set, also for a run that held out a validation split.
    config.data.val_split = 0
    return config, datasets_for(config)


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from . import checkpoint
    from .calibration import calibrate, is_calibrated
    from .evaluation import evaluate
    from .reports import format_spectrum, spectrum_rows

    payload = checkpoint.read_checkpoint(args.checkpoint)
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, test_set, info) = _data_for(
        args.checkpoint, payload, args.data, args.dataset
    )
    check_data_fits(model, info, args.checkpoint, config.data.name)
    widths = _distinct_widths(model, args.widths or _spectrum_widths(payload, model), "evaluating")
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


def _spectrum_widths(payload: dict, model: nn.Module) -> list[float]:
    from .state import get_state

    spectrum = payload.get("extra", {}).get("spectrum")
    if spectrum:
        return [float(r["width"]) for r in spectrum]
    lo, hi = get_state(model).width_range
    return sorted({lo, hi})


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .calibration import calibrate, needs_calibration
    from .state import get_state

    payload = checkpoint.read_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint
    replacing = None
    elsewhere = args.out is not None and not _same_file(args.out, args.checkpoint)
    if elsewhere:
        replacing = check_output(args.out, force=args.force, own=_calibration_of(payload))
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
    config, (_, calib_set, _, info) = _data_for(args.checkpoint, payload, args.data, args.dataset)
    check_data_fits(model, info, args.checkpoint, config.data.name)
    keys = calibrate(model, calib_set, args.widths, num_images=args.images, seed=args.seed,
                     batch_size=config.calib.batch_size)  # fmt: skip
    checkpoint.save(model, out, extra=payload.get("extra"))
    used = min(args.images, len(calib_set))
    print(f"calibrated {len(keys)} channel configurations ({len(args.widths)} widths) on "
          f"{used} images; wrote {out}{f' (replacing {replacing})' if replacing else ''}")  # fmt: skip
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(a).samefile(b)
    except OSError:
        return False


def _calibration_of(payload: dict):
    """Recognizes a checkpoint holding exactly ``payload``'s weights (an earlier calibration or
    search of the same model: only its BN statistics differ)."""

    def own(path: Path) -> str | None:
        import torch

        from . import checkpoint

        try:
            other = checkpoint.read_checkpoint(path)
        except (UsnetError, OSError):
            return None
        mine, theirs = payload["state_dict"], other["state_dict"]
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
            return None
        return "an earlier checkpoint of the same weights"

    return own


# --- deployment: export, select, search -------------------------------------------------------
def width_spec(text: str):
    """A width: a number, a JSON object {group: multiplier}, or a JSON file holding ``"width"``
    (what ``usnet search --out`` writes)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
    except (OSError, ValueError):
        value = None
    if isinstance(value, dict) and "width" in value:
        value = value["width"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and value:
        return value
    raise argparse.ArgumentTypeError(
        f"invalid width {text!r}; expected a number (0.5), a JSON object "
        '({"group": 0.5, ...}) or a JSON file with a "width" entry (usnet search --out)'
    )


def count_arg(text: str) -> int:
    from .select import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _load_checkpoint(spec: str) -> tuple[nn.Module, dict]:
    """A checkpoint (with its payload: spectrum, run config) or a zoo model name (empty payload),
    resolved as :func:`load_model_arg` does."""
    from . import checkpoint

    if Path(spec).is_file():
        payload = checkpoint.read_checkpoint(spec)
        return checkpoint.model_from_checkpoint(payload, spec), payload
    return load_model_arg(spec), {}


def _input_size_of(model: nn.Module, payload: dict) -> tuple[int, ...]:
    """The run's dataset input size if the checkpoint records its config, else the model's default.

    Only ``data.name``/``data.image_size`` are read (not the whole config, validated), so a
    checkpoint whose config has keys this version does not know still exports."""
    from .data import dataset_input_size

    data = ((payload.get("extra") or {}).get("config") or {}).get("data") or {}
    if isinstance(data, dict) and data.get("name"):
        return dataset_input_size(str(data["name"]), int(data.get("image_size", 224)))
    return default_input_size(model)


def cmd_export(args: argparse.Namespace) -> int:
    from .calibration import calibrate, is_calibrated
    from .cost import format_count
    from .deploy import check_format, earlier_export_rows, export_artifact, export_widths
    from .state import get_state

    check_format(args.format)
    if (args.width is None) == (args.widths is None):
        raise UsnetValueError(
            "give one of --width W (one file) or --widths SPEC (a directory with index.json)"
        )
    replacing = None
    if args.width is not None:
        replacing = check_output(args.out, force=args.force, own=_export_in(args.format))
    model, payload = _load_checkpoint(args.checkpoint)
    plan = get_state(model).plan
    widths = [args.width] if args.width is not None else args.widths
    widths = [plan.check_width(w) for w in widths]
    input_size = args.input_size or _input_size_of(model, payload)
    options = {"fuse_bn": args.fuse_bn, "input_size": input_size, "tolerance": args.tolerance}
    if args.widths is not None:  # an earlier export there: its settings must match (merged)
        earlier_export_rows(Path(args.out), args.format, options)
    missing = [w for w in widths if not is_calibrated(model, w)]
    if missing:
        if args.data is None and args.dataset is None:
            w = missing[0]
            raise UsnetValueError(f"width {format_width(w)} is not calibrated in "
                             f"{args.checkpoint}; pass --data ROOT to calibrate it first (or run usnet calibrate)")  # fmt: skip
        config, (_, calib_set, _, info) = _data_for(
            args.checkpoint, payload, args.data, args.dataset
        )
        check_data_fits(model, info, args.checkpoint, config.data.name)
        print(f"calibrating {len(missing)} widths on {args.calib_images} training images")
        calibrate(model, calib_set, missing, num_images=args.calib_images, seed=config.seed,
                  batch_size=config.calib.batch_size)  # fmt: skip
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


def _export_in(format: str):
    """Recognizes an artifact of ``format`` (an earlier ``usnet export``): its runtime loads it."""

    def own(path: Path) -> str | None:
        import zipfile

        from .deploy import load_artifact

        if format in ("pt", "torchscript") and not zipfile.is_zipfile(path):
            return None  # both are zip archives (and torch logs a warning loading anything else)
        try:
            load_artifact(path, format)
        except Exception:  # noqa: BLE001 (any failure to load: not such an artifact)
            return None
        return f"an earlier {format} export"

    return own


def cmd_select(args: argparse.Namespace) -> int:
    from .files import atomic_write_bytes
    from .reports import plot_selection
    from .select import check_cache_dir, format_selection, select_width

    if args.plot:
        check_writable(args.plot, "--plot")
    if args.latency_cache and args.max_latency_ms is not None:
        check_cache_dir(args.latency_cache)
    if args.max_latency_ms is not None:  # before any profiling: a bad device fails at once
        from .device import resolve_device

        resolve_device(args.device)
    model, payload = _load_checkpoint(args.checkpoint)
    selection = select_width(
        model, max_macs=args.max_macs, max_params=args.max_params, max_latency_ms=args.max_latency_ms,
        input_size=args.input_size or _input_size_of(model, payload), widths=args.widths,
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

    from . import checkpoint
    from .evaluation import evaluate
    from .files import atomic_write_bytes
    from .search import format_search, search_data, search_width

    payload = checkpoint.read_checkpoint(args.checkpoint)
    replacing = {}  # checked before the search, which may take long
    if args.out:
        replacing[args.out] = check_output(args.out, force=args.force, own=_search_result)
    if args.save:
        replacing[args.save] = check_output(args.save, force=args.force, option="--save",
                                            own=_calibration_of(payload))  # fmt: skip
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, test_set, info) = _data_for(
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


def _search_result(path: Path) -> str | None:
    """Recognizes a result file of ``usnet search --out``."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and "width" in report and "test_top1" in report:
        return "an earlier usnet search result"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsnetValueError(f"usnet serve needs the serve extra ({err.name} is missing): "
                              "pip install 'usnet[serve]'") from None  # fmt: skip
    import torch

    from .serve.app import ModelServer, bind, describe, serve
    from .serve.runners import open_runner

    if args.max_body_mb <= 0:
        raise UsnetValueError(f"--max-body-mb must be positive, got {args.max_body_mb:g}")
    bind(args.host, args.port).close()  # a taken port or a bad host fails before the model loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runner = open_runner(args.artifact, args.runtime, args.device, args.threads, args.widths)
    name = args.name or Path(args.artifact.rstrip("/")).name.split(".")[0]
    server = ModelServer(runner, name=name, slo_ms=args.slo_ms, max_batch=args.max_batch,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20))  # fmt: skip
    return serve(server, args.host, args.port, max_connections=args.max_connections,
                 announce=lambda url: print(describe(server, url), flush=True))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usnet", description="Universally slimmable networks: train once, run at any width."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="params, MACs and FLOPs of a model across widths")
    p.add_argument("model", help="zoo model name (e.g. us_mobilenet_v2) or checkpoint path")
    p.add_argument(
        "--widths",
        type=widths_arg,
        default=parse_widths("0.25:1.0:0.25"),
        help="start:stop:step or a comma-separated list (default 0.25:1.0:0.25)",
    )
    p.add_argument(
        "--input-size",
        type=parse_input_size,
        default=None,
        help="N,C,H,W (default 1,C,224,224; 32 px for small-input models)",
    )
    p.add_argument("--num-classes", type=whole_number(1), default=None, help="zoo models only")
    p.add_argument("--in-channels", type=whole_number(1), default=None, help="zoo models only")
    p.add_argument("--small-input", action="store_true", help="zoo models only: 28-32 px stem")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train a US-Net from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume: the saved one)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, spectrum)")
    p.add_argument(
        "--set",
        nargs="+",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set epochs=1 data.limit_train=3000",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("eval", "test accuracy of a checkpoint across widths"),
                           ("calibrate", "calibrate BN of a checkpoint at widths")):  # fmt: skip
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="checkpoint written by usnet train / usnet.save")
        p.add_argument(
            "--widths",
            type=widths_arg,
            required=name == "calibrate",
            help="start:stop:step or a comma-separated list",
        )
        p.add_argument("--data", default=None, help="dataset root (default: the run's data.root)")
        p.add_argument(
            "--dataset", default=None, help="dataset name (default: the run's data.name)"
        )
        if name == "eval":
            p.add_argument("--json", action="store_true", help="print one JSON list")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--images", type=int, default=1024, help="calibration images")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default=None, help="write here instead of in place")
            p.add_argument(
                "--force",
                action="store_true",
                help="overwrite an existing --out that is not a checkpoint of the same weights",
            )
            p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "export", help="write one width (or several) as a verified pt/torchscript/onnx file"
    )
    p.add_argument("checkpoint", help="checkpoint written by usnet train / usnet.save")
    p.add_argument(
        "--width",
        type=width_spec,
        default=None,
        help="width: 0.5, a JSON {group: multiplier} or a usnet search --out file",
    )
    p.add_argument(
        "--widths",
        type=widths_arg,
        default=None,
        help="several widths (start:stop:step or a list); --out is then a directory",
    )
    p.add_argument("--format", required=True, help="pt (torch.export), torchscript or onnx")
    p.add_argument("--out", required=True, help="output file (a directory with --widths)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing --out file that is not an earlier export",
    )
    p.add_argument("--fuse-bn", action="store_true", help="fold BatchNorm into the preceding conv")
    p.add_argument(
        "--input-size",
        type=parse_input_size,
        default=None,
        help="N,C,H,W (default: the run's dataset size, else 1,C,224,224 / 32 px); N sets "
        "the verification batch, MACs are per image",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |logits difference| allowed (default 1e-4; 1e-3 with --fuse-bn)",
    )
    p.add_argument("--data", default=None, help="dataset root: calibrate uncalibrated widths first")
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's data.name)")
    p.add_argument("--calib-images", type=int, default=1024, help="calibration images")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("select", help="the widest width within a MACs, params or latency budget")
    p.add_argument("checkpoint", help="checkpoint (or zoo model name)")
    p.add_argument("--max-macs", type=count_arg, default=None, help="e.g. 150M")
    p.add_argument("--max-params", type=count_arg, default=None, help="e.g. 2M")
    p.add_argument(
        "--max-latency-ms",
        type=float,
        default=None,
        help="median latency of the exported model on this machine",
    )
    p.add_argument(
        "--input-size",
        type=parse_input_size,
        default=None,
        help="N,C,H,W (default: the run's dataset size, else 1,C,224,224 / 32 px); MACs and "
        "params are per image (N ignored), latency is of a batch of N",
    )
    p.add_argument(
        "--widths",
        type=widths_arg,
        default=None,
        help="sweep only these widths (default: every channel configuration)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (latency)")
    p.add_argument("--threads", type=whole_number(1), default=None, help="CPU threads while timing")
    p.add_argument("--warmup", type=whole_number(0), default=5, help="untimed runs per width")
    p.add_argument(
        "--repeats", type=whole_number(1), default=20, help="timed runs per width (median)"
    )
    p.add_argument(
        "--latency-cache",
        default=None,
        help="latency cache directory (default $USNET_CACHE_DIR or ~/.cache/usnet)",
    )
    p.add_argument("--plot", default=None, help="PNG of cost and top-1 against width")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("search", help="greedy non-uniform width for a MACs budget (AutoSlim-style)")
    p.add_argument("checkpoint", help="checkpoint written by usnet train / usnet.save")
    p.add_argument("--max-macs", type=count_arg, required=True, help="e.g. 10M")
    p.add_argument("--data", default=None, help="dataset root (default: the run's data.root)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the run's data.name)")
    p.add_argument("--step", type=float, default=0.1, help="multiplier decrement per narrowing")
    p.add_argument("--calib-images", type=int, default=256, help="training images calibrating BN")
    p.add_argument(
        "--heldout-images", type=int, default=256, help="training images scoring candidates"
    )
    p.add_argument(
        "--test-images", type=int, default=10000, help="test images for the final comparison"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="write the result (JSON; usnet export --width takes it)"
    )
    p.add_argument(
        "--save", default=None, help="write a checkpoint holding the result's BN statistics"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing --out/--save files that are not earlier search outputs",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve a model over HTTP (Open Inference Protocol) under a "
                       "latency SLO, choosing the width per batch from the load")  # fmt: skip
    p.add_argument("artifact", help="checkpoint, usnet export --widths directory, or switchable "
                   "ONNX file")  # fmt: skip
    p.add_argument("--slo-ms", type=float, default=50.0, help="latency objective (default 50)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=whole_number(0), default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=whole_number(1), default=32, help="images per batch")
    p.add_argument("--max-queue", type=whole_number(1), default=None,
                   help="images waiting at most (default 64 batches, <= 256 MiB); beyond: 503")  # fmt: skip
    p.add_argument("--runtime", choices=["onnx", "torch"], default=None,
                   help="default: torch for checkpoints, the artifact's own otherwise")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--name", default=None, help="model name in the URLs (default: file stem)")
    p.add_argument("--widths", type=widths_arg, default=None,
                   help="serve only these widths (default: every width of the spectrum/artifact)")  # fmt: skip
    p.add_argument("--threads", type=whole_number(1), default=None, help="CPU threads of the model")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request size limit (413)")
    p.add_argument("--max-connections", type=whole_number(1), default=256,
                   help="open connections at most; beyond: 503 (bounds memory)")  # fmt: skip
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if not getattr(err, "usnet_from_main", False):  # torchrun: rank 0 already said it
            print(f"usnet: error: {error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            f"; continue with: usnet train --resume --out {args.out}"
            if args.command == "train"
            else ""
        )
        print(f"usnet: interrupted{hint}", file=sys.stderr)
        return 130


def error_message(err: BaseException) -> str:
    """One line naming the problem; for an ``OSError`` its cause and file, not errno text."""
    if isinstance(err, OSError) and not isinstance(err, UsnetError) and err.strerror:
        # str(err) of the built-in errors is "[Errno 28] No space left on device: 'path'".
        where = f" ({err.filename})" if err.filename is not None else ""
        hint = {errno.ENOSPC: "; free some space: no existing file was changed",
                errno.EACCES: "; choose a location you can write to",
                errno.EROFS: "; choose a location you can write to"}.get(err.errno, "")  # fmt: skip
        return f"{err.strerror.lower()}{where}{hint}"
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its own message
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
