"""The ``usnet`` command line: ``train``, ``eval``, ``calibrate``, ``profile``.

Every command reports bad input as one line, ``usnet: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .channels import parse_widths
from .convert import ConversionError
from .layers import UncalibratedWidthError

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ConversionError,
               UncalibratedWidthError, RuntimeError)


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


def widths_arg(text: str) -> list[float]:
    try:
        return parse_widths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_model_arg(spec: str, num_classes: int | None = None, in_channels: int | None = None,
                   small_input: bool = False) -> nn.Module:  # fmt: skip
    """A zoo model name, or a checkpoint path written by ``usnet.save``."""
    from . import checkpoint, models

    if spec in models.list_models():
        kwargs = {"small_input": small_input}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        return models.create_model(spec, **kwargs)
    if Path(spec).exists():
        return checkpoint.load(spec)
    raise ValueError(
        f"{spec!r} is neither a zoo model ({', '.join(models.list_models())}) nor a checkpoint file"
    )


def default_input_size(model: nn.Module) -> tuple[int, int, int, int]:
    from .state import get_state

    state = get_state(model)
    kwargs = (state.arch or {}).get("kwargs", {})
    channels = next(g.size for g in state.plan.groups.values() if g.name.startswith("input:"))
    side = 32 if kwargs.get("small_input") else 224
    return (1, channels, side, side)


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import format_profiles, profile

    model = load_model_arg(args.model, args.num_classes, args.in_channels, args.small_input)
    input_size = args.input_size or default_input_size(model)
    rows = [profile(model, w, input_size) for w in args.widths]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    else:
        print(f"{args.model} at input {'x'.join(map(str, input_size))}")
        print(format_profiles(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .config import config_from_dict, load_config
    from .distributed import destroy, init_from_env
    from .trainer import CHECKPOINT, Trainer

    overrides = [item for group in args.set for item in group]
    if args.config is None:
        if not args.resume:
            raise ValueError("usnet train needs a CONFIG file (e.g. configs/fashion_mnist.yaml)")
        if overrides:
            raise ValueError("--set needs the CONFIG file it modifies; --resume alone reuses the saved config")
        payload = checkpoint.read_checkpoint(Path(args.out) / CHECKPOINT)
        config = config_from_dict(payload.get("extra", {}).get("config") or {})
    else:
        config = load_config(args.config, overrides)
    # Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs); else a no-op.
    init_from_env(config.device)
    try:
        Trainer(config, args.out, resume=args.resume).run()
    finally:
        destroy()
    return 0


def _data_for(model_path: str, payload: dict, data_root: str | None, dataset: str | None):
    from .config import TrainConfig
    from .trainer import datasets_for, load_run_config

    config = load_run_config(payload)
    if config is None:
        if dataset is None:
            raise ValueError(f"{model_path!r} records no training config: pass --dataset and --data")
        config = TrainConfig()
    if dataset is not None:
        config.data.name = dataset
    if data_root is not None:
        config.data.root = data_root
    return config, datasets_for(config)


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from . import checkpoint
    from .calibrate import calibrate, is_calibrated
    from .trainer import evaluate, format_spectrum, spectrum_rows

    payload = checkpoint.read_checkpoint(args.checkpoint)
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, test_set, info) = _data_for(args.checkpoint, payload, args.data, args.dataset)
    widths = args.widths or _spectrum_widths(payload, model)
    missing = [w for w in widths if not is_calibrated(model, w)]
    if missing:
        print(f"calibrating {len(missing)} uncalibrated widths on {config.calib.num_images} training images")
        calibrate(model, calib_set, missing, num_images=config.calib.num_images, seed=config.seed,
                  batch_size=config.calib.batch_size)  # fmt: skip
    results = evaluate(model, DataLoader(test_set, batch_size=config.eval.batch_size), widths)
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
    from .calibrate import calibrate

    payload = checkpoint.read_checkpoint(args.checkpoint)
    model = checkpoint.model_from_checkpoint(payload, args.checkpoint)
    config, (_, calib_set, _, _) = _data_for(args.checkpoint, payload, args.data, args.dataset)
    keys = calibrate(model, calib_set, args.widths, num_images=args.images, seed=args.seed,
                     batch_size=config.calib.batch_size)  # fmt: skip
    out = args.out or args.checkpoint
    checkpoint.save(model, out, extra=payload.get("extra"))
    used = min(args.images, len(calib_set))
    print(f"calibrated {len(keys)} channel configurations ({len(args.widths)} widths) on "
          f"{used} images; wrote {out}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usnet", description="Universally slimmable networks: train once, run at any width."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="params, MACs and FLOPs of a model across widths")
    p.add_argument("model", help="zoo model name (e.g. us_mobilenet_v2) or checkpoint path")
    p.add_argument("--widths", type=widths_arg, default=parse_widths("0.25:1.0:0.25"),
                   help="start:stop:step or a comma-separated list (default 0.25:1.0:0.25)")
    p.add_argument("--input-size", type=parse_input_size, default=None,
                   help="N,C,H,W (default 1,C,224,224; 32 px for small-input models)")
    p.add_argument("--num-classes", type=int, default=None, help="zoo models only")
    p.add_argument("--in-channels", type=int, default=None, help="zoo models only")
    p.add_argument("--small-input", action="store_true", help="zoo models only: 28-32 px stem")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train a US-Net from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume: the saved one)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, spectrum)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set epochs=1 data.limit_train=3000")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("eval", "test accuracy of a checkpoint across widths"),
                           ("calibrate", "calibrate BN of a checkpoint at widths")):  # fmt: skip
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="checkpoint written by usnet train / usnet.save")
        p.add_argument("--widths", type=widths_arg, required=name == "calibrate",
                       help="start:stop:step or a comma-separated list")
        p.add_argument("--data", default=None, help="dataset root (default: the run's data.root)")
        p.add_argument("--dataset", default=None,
                       help="dataset name (default: the run's data.name)")
        if name == "eval":
            p.add_argument("--json", action="store_true", help="print one JSON list")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--images", type=int, default=1024, help="calibration images")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default=None, help="write here instead of in place")
            p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not getattr(err, "usnet_from_main", False):  # torchrun: rank 0 already said it
            print(f"usnet: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
