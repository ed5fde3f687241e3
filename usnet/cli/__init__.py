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
import sys
from collections.abc import Sequence

from ..channels import parse_widths
from ..errors import UsnetError
from .args import count_arg, parse_input_size, whole_number, width_spec, widths_arg
from .commands import (
    cmd_calibrate,
    cmd_eval,
    cmd_export,
    cmd_profile,
    cmd_search,
    cmd_select,
    cmd_train,
)
from .serve import add_serve_parser

USER_ERRORS = (UsnetError, OSError, argparse.ArgumentError, argparse.ArgumentTypeError)
"""What the command line reports as one line (exit 2); every other exception is a failure."""


def build_parser() -> argparse.ArgumentParser:
    from . import switchable as switchable_cli

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
    switchable_cli.add_profile_arguments(p)
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
    switchable_cli.add_export_arguments(p)
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

    add_serve_parser(sub)
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
