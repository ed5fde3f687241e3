"""The ``usnet`` command line: ``usnet profile``, ``usnet demo``.

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

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ConversionError, UncalibratedWidthError)


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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out), data_root=args.data_root, num_images=args.num_images,
             steps=args.steps, seed=args.seed)  # fmt: skip
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

    p = sub.add_parser("demo", help="the API on Fashion-MNIST: convert, train briefly, "
                       "calibrate, export, profile")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX directory")
    p.add_argument("--num-images", type=int, default=1024, help="calibration images")
    p.add_argument("--steps", type=int, default=300, help="sandwich-rule training steps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"usnet: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
