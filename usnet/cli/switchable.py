"""The command line of switchable artifacts: ``usnet export --switchable``, ``usnet profile
--latency ARTIFACT`` and ``usnet select ARTIFACT`` (wired into :mod:`usnet.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsnetValueError


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--switchable", action="store_true",
                   help="one ONNX file running any of --widths (and --entry) at run time")  # fmt: skip
    p.add_argument("--entry", action="append", default=[], metavar="NAME=WIDTH",
                   help="with --switchable: a named entry, e.g. searched=searched.json "
                   "(a usnet search result) or half=0.5; repeatable")  # fmt: skip


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency", action="store_true",
                   help="MODEL is a switchable artifact: measure each entry's latency in "
                   "onnxruntime and write it into the file's metadata")  # fmt: skip
    p.add_argument("--threads", default="1", help="with --latency: thread counts, e.g. 1,2")
    p.add_argument("--batch-sizes", default="1", help="with --latency: batch sizes, e.g. 1,32")
    p.add_argument("--warmup", type=int, default=5, help="with --latency: untimed runs")
    p.add_argument("--repeats", type=int, default=20, help="with --latency: timed runs (median)")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsnetValueError(f"{option} takes positive whole numbers like 1,2; got {text!r}")
    return values


def export(args: argparse.Namespace) -> int:
    """``usnet export CHECKPOINT --widths SPEC [--entry NAME=WIDTH] --switchable --out F``."""
    from ..deploy.cost import format_count
    from ..deploy.switchable import export_switchable
    from ..files import check_output
    from ..state import get_state
    from ..train.data import checkpoint_input_size
    from .args import width_spec
    from .common import calibrate_missing, load_checkpoint_arg

    if args.format != "onnx":
        raise UsnetValueError(f"--switchable writes onnx, got --format {args.format!r}")
    if args.width is not None:
        raise UsnetValueError(
            "--switchable takes --widths SPEC and --entry NAME=WIDTH, not --width"
        )
    if args.widths is None and not args.entry:
        raise UsnetValueError("--switchable needs --widths SPEC (and/or --entry NAME=WIDTH)")
    check_output(args.out, force=args.force)  # never replaced without --force
    named = {}
    for item in args.entry:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise UsnetValueError(f"--entry takes NAME=WIDTH, got {item!r}")
        try:
            named[name] = width_spec(spec)
        except argparse.ArgumentTypeError as err:
            raise UsnetValueError(f"--entry {name}: {err}") from None
    model, payload = load_checkpoint_arg(args.checkpoint)
    plan = get_state(model).plan
    widths: dict = {}
    if args.widths is not None:
        from ..channels import config_id
        from ..deploy.switchable import entry_name

        for w in args.widths:
            w = plan.check_width(w)
            widths[entry_name(w, config_id(plan.config(w)))] = w
    for name, w in named.items():
        if name in widths:
            raise UsnetValueError(f"--entry {name}: the name is taken by a --widths entry")
        widths[name] = plan.check_width(w)
    calibrate_missing(model, payload, list(widths.values()), args)
    result = export_switchable(
        model, _dedupe_names(model, widths), args.out, "onnx", fuse_bn=args.fuse_bn,
        input_size=args.input_size or checkpoint_input_size(model, payload), tolerance=args.tolerance,
        spectrum=payload.get("extra", {}).get("spectrum"),
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(
        f"{'#':>2} {'name':<14} {'width':>7} {'params':>9} {'MACs':>9} {'top-1':>7} {'max diff':>9}"
    )
    for e in result.entries:
        width = f"{e['width']:.3f}" if isinstance(e["width"], float) else "non-unif."
        top1 = f"{100 * e['top1']:.2f}%" if "top1" in e else "-"
        print(f"{e['index']:>2} {e['name']:<14} {width:>7} {format_count(e['params']):>9} "
              f"{format_count(e['macs']):>9} {top1:>7} {e['max_abs_diff']:>9.2g}")  # fmt: skip
    print(f"wrote {result.path}: {len(result.entries)} entries in one onnx file of "
          f"{result.file_bytes / 1e6:.2f} MB{', BN folded into conv' if args.fuse_bn else ''}; "
          "each entry verified against its standalone export in onnxruntime (<= 1e-05)")  # fmt: skip
    return 0


def _dedupe_names(model, widths: dict) -> dict:
    """--widths entries that round to one configuration are one entry (the first name)."""
    from ..channels import config_id
    from ..state import get_state

    plan = get_state(model).plan
    seen, out = set(), {}
    for name, w in widths.items():
        cid = config_id(plan.config(w))
        if cid not in seen:
            seen.add(cid)
            out[name] = w
    return out


def profile(args: argparse.Namespace) -> int:
    """``usnet profile --latency ARTIFACT``: measure, write into the file, print."""
    from ..deploy.latency import profile_latency

    if not Path(args.model).is_file():
        raise UsnetValueError(f"--latency takes a switchable artifact file, got {args.model!r}")
    tables = profile_latency(args.model, threads=_int_list(args.threads, "--threads"),
                             batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"),
                             warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    if args.json:
        print(json.dumps(tables))
        return 0
    t0 = tables[0]
    print(f"{args.model}: {t0['runtime']} {t0['runtime_version']} on {t0['device']}, median of "
          f"{t0['repeats']} runs (ms)")  # fmt: skip
    header = "".join(f"  t{t['threads']} b{t['batch_size']:<4}" for t in tables)
    print(f"{'entry':<14}{header}")
    for i, name in enumerate(t0["entries"]):
        print(f"{name:<14}" + "".join(f"  {t['median_ms'][i]:>8.3f}" for t in tables))
    print(f"wrote the latency table into {args.model}")
    return 0


def select(args: argparse.Namespace) -> int:
    """``usnet select ARTIFACT --max-latency-ms X``: from the stored table if it matches."""
    from ..deploy.cost import format_count
    from ..deploy.latency import select_entry

    if args.device != "cpu":
        raise UsnetValueError(
            "a switchable artifact is timed in onnxruntime on the cpu; --device cpu"
        )
    batch = args.input_size[0] if args.input_size else 1
    result = select_entry(args.checkpoint, max_macs=args.max_macs, max_params=args.max_params,
                          max_latency_ms=args.max_latency_ms, threads=args.threads or 1,
                          batch_size=batch, warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["chosen"]
    lat = f", latency {c['latency_ms']:.3f} ms" if "latency_ms" in c else ""
    print(f"entry {c['index']} {c['name']!r} (width {c['width']}): MACs {format_count(c['macs'])}, "
          f"params {format_count(c['params'])}{lat}")  # fmt: skip
    if result["latency"]:
        info = result["latency"]
        how = "the table stored in the file" if info["source"] == "stored" else "measured now"
        print(f"latency: {how} ({info['runtime']} {info['runtime_version']}, {info['threads']} "
              f"threads, batch {info['batch_size']})")  # fmt: skip
    return 0
