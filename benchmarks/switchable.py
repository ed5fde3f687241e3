"""One artifact, every width (issue 27): a switchable ONNX file against standalone exports.

For 8 widths of US-MobileNetV2 (1000 classes, 224 px) and of the main job's US-ConvNet
(Fashion-MNIST, 28 px), side by side in one run:

* file size of the switchable file against the full-width standalone export (target <= 1.05x)
  and against all 8 standalone files;
* onnxruntime latency of every entry against the standalone export of that width, at 1 and 2
  threads, batch 1 and 32 (target <= 1.05x): the file's own graph (``If`` nodes choose the entry,
  as in a runtime without usnet) and usnet's loader (``usnet.load_artifact``: one session per
  entry built from the file). Interleaved rounds, in a rotating order;
  ms are medians over rounds, ratios the median of the per-round ratios (min-max printed);
* the PyTorch runtime (``usnet.Switchable``) per width against ``usnet.export`` of that width
  (target <= 1.05x), its switch time (a lookup, target < 1 ms) and memory;
* outputs of every entry against the standalone export (target <= 1e-5).

Weights are random (BatchNorm calibrated on random images): sizes, times and equality do not
depend on training. Usage (raw output: one JSON file per run, the tables from all runs)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/switchable.py --out benchmarks/results/switchable-DATE/run1.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/switchable.py --report benchmarks/results/switchable-DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import usnet
from usnet.deploy.switchable import load_switchable

MODELS = {
    "us_mobilenet_v2": {"kwargs": {"num_classes": 1000}, "size": (1, 3, 224, 224),
                        "widths": [0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0]},
    "us_convnet": {"kwargs": {"num_classes": 10, "in_channels": 1}, "size": (1, 1, 28, 28),
                   "widths": [0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.875, 1.0]},
}  # fmt: skip
THREADS = (1, 2)
BATCHES = (1, 32)


def build(name: str) -> torch.nn.Module:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = usnet.models.create_model(name, **spec["kwargs"])
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, *spec["size"][1:], generator=g) for _ in range(2)]
    usnet.calibrate(model, data, widths=spec["widths"], num_images=32)
    return model.eval()


def options(threads: int):
    """The same settings for every session. Spinning off: a process holding a dozen sessions
    would otherwise have their idle pool threads spin against the one being timed."""
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(path: str | bytes, threads: int):
    return onnxruntime.InferenceSession(path, options(threads), providers=["CPUExecutionProvider"])


def per_call_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def interleave(fns: dict, calls: int, rounds: int, base: str) -> dict:
    """Median ms of each variant over rounds and the median (min, max) of per-round ratios."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # each order in turn
            times[k].append(per_call_ms(fns[k], calls))
    out = {"ms": {k: statistics.median(v) for k, v in times.items()}}
    for k in fns:
        if k != base:
            ratios = [a / b for a, b in zip(times[k], times[base])]
            out[f"{k}/{base}"] = [statistics.median(ratios), min(ratios), max(ratios)]
    return out


def run_model(name: str, rounds: int, tmp: Path) -> dict:
    spec = MODELS[name]
    size, widths = spec["size"], spec["widths"]
    model = build(name)
    plan = usnet.channel_plan(model)
    assert len({plan.config(w) for w in widths}) == len(widths), "8 distinct networks"
    start = time.perf_counter()
    result = usnet.export_switchable(model, widths, tmp / f"{name}.onnx", input_size=size)
    export_s = time.perf_counter() - start
    files = {}
    for w in widths:
        files[w] = tmp / f"{name}-{w}.onnx"
        usnet.export_artifact(model, w, files[w], "onnx", input_size=size)
    sizes = {str(w): files[w].stat().st_size for w in widths}
    out = {"model": name, "input_size": list(size), "widths": widths, "export_s": export_s,
           "switchable_bytes": result.file_bytes, "standalone_bytes": sizes,
           "size_ratio_full": result.file_bytes / sizes[str(max(widths))],
           "size_ratio_all": result.file_bytes / sum(sizes.values()),
           "shared_bytes": result.shared_bytes, "entry_bytes": result.entry_bytes}  # fmt: skip
    # outputs: every entry against the standalone export, on a batch the export did not check
    images = np.random.default_rng(1).standard_normal((2, *size[1:])).astype(np.float32)
    graph = session(str(tmp / f"{name}.onnx"), 1)
    diffs = []
    for w in widths:
        got = graph.run(["logits"], {"input": images, "width": np.array(w, np.float32)})[0]
        ref = session(str(files[w]), 1).run(None, {"input": images})[0]
        diffs.append(float(np.abs(got - ref).max()))
    out["max_abs_diff"] = diffs
    out["onnxruntime"] = []
    for threads in THREADS:
        loader = load_switchable(tmp / f"{name}.onnx", options=options(threads))
        graph = session(str(tmp / f"{name}.onnx"), threads)
        standalone = {w: session(str(files[w]), threads) for w in widths}
        for batch in BATCHES:
            x = np.random.default_rng(2).standard_normal((batch, *size[1:])).astype(np.float32)
            for w in widths:
                feed = {"input": x, "width": np.array(w, np.float32)}
                fns = {
                    "graph": lambda: graph.run(None, feed),  # noqa: B023 (used in this iteration)
                    "loader": lambda: loader(x, width=w),  # noqa: B023
                    "standalone": lambda: standalone[w].run(None, {"input": x}),  # noqa: B023
                }
                ms_one = per_call_ms(fns["standalone"], 1)
                calls = max(1, min(50, int(150 / max(ms_one, 1e-3))))  # ~150 ms per variant
                row = interleave(fns, calls, rounds, "standalone")
                out["onnxruntime"].append({"threads": threads, "batch": batch, "width": w,
                                           "calls": calls, **row})  # fmt: skip
                print(f"  {name} ort t{threads} b{batch} w{w}: "
                      f"graph/standalone {row['graph/standalone'][0]:.3f} "
                      f"loader/standalone {row['loader/standalone'][0]:.3f}", flush=True)  # fmt: skip
    out["pytorch"] = run_pytorch(model, widths, size, rounds)
    return out


def run_pytorch(model, widths, size, rounds) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    sw = usnet.Switchable(model, widths)
    prepare_s = time.perf_counter() - start
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *size[1:])
        for w in widths:
            plain = usnet.export(model, w)

            def standalone():
                with torch.inference_mode():  # as Switchable.__call__ runs
                    return plain(x)  # noqa: B023

            assert torch.equal(sw(x, width=w), standalone())
            ms_one = per_call_ms(standalone, 1)
            calls = max(1, min(50, int(150 / max(ms_one, 1e-3))))
            row = interleave({"switchable": lambda: sw(x, width=w),  # noqa: B023
                              "standalone": standalone}, calls, rounds, "standalone")  # fmt: skip
            rows.append({"threads": 1, "batch": batch, "width": w, "calls": calls, **row})
            print(f"  torch b{batch} w{w}: switchable/standalone "
                  f"{row['switchable/standalone'][0]:.3f}", flush=True)  # fmt: skip
    # switching: choosing the module of a width (validation, rule, list lookup)
    lookups = []
    for _ in range(2000):
        start = time.perf_counter()
        for w in widths:
            sw.module(w)
        lookups.append((time.perf_counter() - start) / len(widths) * 1e3)
    memory = sw.memory()
    full = usnet.export(model, max(widths))
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    return {"prepare_s": prepare_s, "rows": rows, "switch_ms": statistics.median(lookups),
            "switch_ms_max": max(lookups), "memory_bytes": memory["total_bytes"],
            "full_width_bytes": full_bytes, "shared_tensors": memory["shared_tensors"],
            "memory_ratio": memory["total_bytes"] / full_bytes}  # fmt: skip


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + ("-dirty" if dirty else "")


def measure(args) -> None:
    started = datetime.now(timezone.utc)
    raw = {"format": "usnet-switchable-bench/1", "commit": commit(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "started_utc": started.isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "processor": usnet.device.device_name(torch.device("cpu"))},
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "load_average_start": os.getloadavg()[0], "rounds": args.rounds, "models": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            raw["models"].append(run_model(name, args.rounds, Path(tmp)))
    raw["load_average_end"] = os.getloadavg()[0]
    raw["wall_s"] = (datetime.now(timezone.utc) - started).total_seconds()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(raw, indent=1) + "\n")
    print(report([raw]))


def report(runs: list[dict]) -> str:
    """The markdown tables of docs/benchmarks.md: every figure the median over runs."""

    def med(values):
        return statistics.median(values)

    lines = [f"{len(runs)} runs; commits {', '.join(sorted({r['commit'] for r in runs}))}; "
             f"load average {min(r['load_average_start'] for r in runs):.1f}-"
             f"{max(r['load_average_end'] for r in runs):.1f}; "
             f"onnxruntime {runs[0]['onnxruntime']}, torch {runs[0]['torch']}"]  # fmt: skip
    for m, name in enumerate(r["model"] for r in runs[0]["models"]):
        models = [r["models"][m] for r in runs]
        first = models[0]
        lines += ["", f"**{name}** at {'x'.join(map(str, first['input_size']))}, widths "
                  f"{', '.join(map(str, first['widths']))}: switchable file "
                  f"{first['switchable_bytes'] / 1e6:.2f} MB = **{med([x['size_ratio_full'] for x in models]):.3f}x** "
                  f"the full-width standalone file ({first['standalone_bytes'][str(max(first['widths']))] / 1e6:.2f} MB; "
                  f"{med([x['size_ratio_all'] for x in models]):.3f}x all 8 standalone files); "
                  f"max |logits difference| against the standalone exports "
                  f"{max(max(x['max_abs_diff']) for x in models):.1e}; export took "
                  f"{med([x['export_s'] for x in models]):.0f} s.", ""]  # fmt: skip
        lines += ["| threads | batch | width | standalone ms | graph / standalone | loader / standalone | graph, min-max over runs |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for i, row in enumerate(first["onnxruntime"]):
            rows = [x["onnxruntime"][i] for x in models]
            g = [r["graph/standalone"][0] for r in rows]
            lo = [r["loader/standalone"][0] for r in rows]
            lines.append(f"| {row['threads']} | {row['batch']} | {row['width']} | "
                         f"{med([r['ms']['standalone'] for r in rows]):.3f} | **{med(g):.3f}** | "
                         f"{med(lo):.3f} | {min(g):.3f}-{max(g):.3f} |")  # fmt: skip
        pts = [x["pytorch"] for x in models]
        lines += ["", f"PyTorch runtime (`usnet.Switchable`, 1 thread): switch "
                  f"{med([p['switch_ms'] for p in pts]) * 1e3:.1f} us (median lookup; max "
                  f"{max(p['switch_ms_max'] for p in pts) * 1e3:.0f} us), memory "
                  f"{pts[0]['memory_bytes'] / 1e6:.2f} MB = {pts[0]['memory_ratio']:.2f}x one "
                  f"full-width model ({pts[0]['shared_tensors']} tensors are views of a wider "
                  f"entry's), prepared in {med([p['prepare_s'] for p in pts]):.1f} s.", "",
                  "| batch | width | standalone ms | switchable / standalone | min-max over runs |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for i, row in enumerate(pts[0]["rows"]):
            rows = [p["rows"][i] for p in pts]
            s = [r["switchable/standalone"][0] for r in rows]
            lines.append(f"| {row['batch']} | {row['width']} | "
                         f"{med([r['ms']['standalone'] for r in rows]):.3f} | **{med(s):.3f}** | "
                         f"{min(s):.3f}-{max(s):.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="raw JSON output")
    parser.add_argument("--report", default=None, help="print the tables of the runs in DIR")
    args = parser.parse_args()
    if args.report:
        runs = [json.loads(p.read_text()) for p in sorted(Path(args.report).glob("run*.json"))]
        print(report(runs))
        return
    measure(args)


if __name__ == "__main__":
    main()
