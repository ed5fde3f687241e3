"""Warm start: what does turning an already trained network into a US-Net cost, against training
the US-Net from scratch? (issue 15; README "From a trained model")

Steps, on Fashion-MNIST with the main job's network (``--model us_resnet18`` for a second one):

* (a) ``plain``: the network trained alone at width 1.0 (``mode=individual``), 4 epochs: the
  "trained model" a user already has;
* (b) ``zero_shot``: that model converted, reordered by each importance (``none`` = as trained),
  BN-calibrated and evaluated at 0.25 / 0.5 / 0.75 / 1.0 **without any training**;
* (c) ``finetune``: 1 epoch of US-Net training from it (``configs/fashion_mnist_finetune.yaml``)
  from no reordering and from the best importance of (b), with and without ``teacher: init``;
* (d) ``scratch``: the US-Net trained from scratch for 4 epochs (the main job,
  ``configs/fashion_mnist.yaml``).

::

    python benchmarks/warm_start.py --seeds 0,1,2              # everything (hours on 2 cores)
    python benchmarks/warm_start.py --steps a,b                # the trained model + zero-shot table
    python benchmarks/warm_start.py --quick                    # minutes: a smoke test, 1 epoch each
    python benchmarks/warm_start.py --report                   # tables from finished results

Every training is an ordinary ``usnet train`` in its own directory under ``--out`` (finished runs
reused, interrupted ones resumed), and every result is a small JSON file under
``benchmarks/results/warm_start/<tag>/`` written atomically: the benchmark can be stopped and
continued at any time, and ``--report`` rebuilds the tables from those files alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from paper_claims import git_commit, run_usnet_train
from report import cell, comparison_table, width_key  # the tables' rules, as in paper_claims

from usnet.files import atomic_write_bytes
from usnet.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SCRATCH_CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "fashion_mnist_finetune.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "warm_start"
WIDTHS = (0.25, 0.5, 0.75, 1.0)
IMPORTANCES = ("none", "l1", "bn", "taylor", "activation", "reconstruction")
EVAL = "eval.widths=0.25,0.5,0.75,1.0"
QUICK = ("data.limit_train=2048", "data.limit_test=1000", "calib.num_images=256",
         "eval.epoch_calib_images=256", "eval.every_epoch=false")  # fmt: skip


# --- runs -------------------------------------------------------------------------------------------
def train(name: str, seed: int, config: Path, overrides: list[str], directory: Path,
          result_file: Path, args: argparse.Namespace) -> dict:  # fmt: skip
    """One ``usnet train`` run (its result reused when written, resumed when interrupted)."""
    if result_file.exists():
        return json.loads(result_file.read_text())
    wall_s, resumed = run_usnet_train(config, directory, overrides, args.threads)
    rows = json.loads((directory / "spectrum.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    teacher_s = [
        r["teacher_s"] for r in records if "teacher_s" in r
    ]  # the teacher's forward passes
    run = next((r for r in records if r.get("kind") == "run"), {})
    result = {"name": name, "seed": seed, "overrides": overrides, "commit": git_commit(),
              "wall_s": wall_s, "resumed": resumed,
              "distillation": run.get("distillation"),
              "teacher_s": max(teacher_s) if teacher_s else None,
              "top1": {f"{r['width']:g}": 100 * r["top1"] for r in rows}}  # fmt: skip
    atomic_write_bytes(result_file, json.dumps(result, indent=1).encode())
    return result


def common(args: argparse.Namespace, seed: int) -> list[str]:
    limit = [f"data.limit_train={args.limit_train}"] if args.limit_train else []
    limit += [f"data.limit_test={args.limit_test}"] if args.limit_test else []
    return [f"model={args.model}", f"seed={seed}", EVAL, *(QUICK if args.quick else ()), *limit]


def plain(args: argparse.Namespace, seed: int) -> dict:
    """(a) The network alone at width 1.0."""
    overrides = [*common(args, seed), "mode=individual", "width=1.0", "width_range=[1.0,1.0]",
                 f"epochs={args.epochs}"]  # fmt: skip
    result_file = args.results / f"plain-seed{seed}.json"
    recorded = _load(result_file)
    if recorded and not plain_model(args, seed).exists():
        # (b) and (c) need the model itself: train it again (a seeded CPU run is deterministic)
        # and say whether it is the model the recorded rows came from.
        result_file = result_file.with_suffix(".retrain.json")
    result = train("plain", seed, SCRATCH_CONFIG, overrides, args.out / "plain" / f"seed{seed}",
                   result_file, args)  # fmt: skip
    if recorded and result_file.name.endswith(".retrain.json"):
        same = result["top1"] == recorded["top1"]
        print(f"plain seed {seed} trained again: top-1 {result['top1']} "
              f"{'equals' if same else 'DIFFERS from'} the recorded {recorded['top1']}", flush=True)  # fmt: skip
        result_file.unlink()
        if not same:
            raise SystemExit(f"plain seed {seed}: the retrained model is not the recorded one; "
                             f"remove {args.results} rows of seed {seed} and run again")  # fmt: skip
        return recorded
    return result


def plain_model(args: argparse.Namespace, seed: int) -> Path:
    return args.out / "plain" / f"seed{seed}" / "model.pt"


def zero_shot(args: argparse.Namespace, seed: int, importance: str) -> dict:
    """(b) Convert, reorder, calibrate and evaluate the trained plain model: no training."""
    result_file = args.results / f"zero_shot-{importance}-seed{seed}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    import torch

    import usnet
    from usnet.evaluation import evaluate
    from usnet.train.data import datasets_for
    from usnet.train.warm_start import load_init, reorder_batches

    torch.set_num_threads(args.threads)
    config = load_config(
        FINETUNE_CONFIG, [*common(args, seed), f"init.checkpoint={plain_model(args, seed)}"]
    )
    train_set, calib_set, test_set, info = datasets_for(config)
    model = usnet.models.create_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                                      small_input=info.small_input, width_range=tuple(config.width_range))  # fmt: skip
    load_init(model, config.init.checkpoint, config.model, info.num_classes)
    start = time.perf_counter()
    if importance != "none":
        data = reorder_batches(train_set, config.init.num_images, config.calib.batch_size, seed)
        usnet.reorder_channels(
            model, importance, data=data, num_images=config.init.num_images, log=print
        )
    reorder_s = time.perf_counter() - start
    usnet.calibrate(model, calib_set, list(WIDTHS), num_images=config.calib.num_images, seed=seed,
                    batch_size=config.calib.batch_size, progress=False)  # fmt: skip
    loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
    top1 = [100 * r[0] for r in evaluate(model, loader, list(WIDTHS), torch.device("cpu"))]
    result = {"name": f"zero_shot-{importance}", "importance": importance, "seed": seed, "commit": git_commit(),
              "plain_model": str(plain_model(args, seed)), "reorder_s": reorder_s,
              "wall_s": time.perf_counter() - start, "calib_images": config.calib.num_images,
              "test_images": len(test_set), "top1": dict(zip(map("{:g}".format, WIDTHS), top1))}  # fmt: skip
    atomic_write_bytes(result_file, json.dumps(result, indent=1).encode())
    return result


def best_importance(args: argparse.Namespace, seeds: list[int]) -> str:
    """The importance of (b) with the best mean top-1 over the widths below 1.0."""

    def score(imp: str) -> float:
        found = [_load(args.results / f"zero_shot-{imp}-seed{s}.json") for s in seeds]
        values = [r["top1"][f"{w:g}"] for r in found if r for w in WIDTHS if w < 1.0]
        return statistics.mean(values) if values else float("-inf")

    return max(IMPORTANCES[1:], key=score)


def finetune(args: argparse.Namespace, seed: int, reorder: str, teacher: str) -> dict:
    """(c) 1 epoch of US-Net training from the trained plain model."""
    name = f"finetune-{reorder}-{teacher}"
    overrides = [*common(args, seed), f"init.checkpoint={plain_model(args, seed)}", f"init.reorder={reorder}",
                 f"teacher={teacher}", f"epochs={args.finetune_epochs}"]  # fmt: skip
    return train(name, seed, FINETUNE_CONFIG, overrides, args.out / name / f"seed{seed}",
                 args.results / f"{name}-seed{seed}.json", args)  # fmt: skip


def scratch(args: argparse.Namespace, seed: int) -> dict:
    """(d) The main job: the US-Net from scratch."""
    overrides = [*common(args, seed), f"epochs={args.epochs}"]
    return train("scratch", seed, SCRATCH_CONFIG, overrides, args.out / "scratch" / f"seed{seed}",
                 args.results / f"scratch-seed{seed}.json", args)  # fmt: skip


# --- report -----------------------------------------------------------------------------------------
def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _by_name(results: Path) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*-seed*.json")):
        data = json.loads(path.read_text())
        by_name.setdefault(data["name"], []).append(data)
    return by_name


def _test_images(result: dict) -> int:
    if "test_images" in result:
        return int(result["test_images"])
    limits = [
        o.split("=", 1)[1] for o in result.get("overrides", []) if o.startswith("data.limit_test=")
    ]
    return int(limits[-1]) if limits else 10000


def comparisons(by_name: dict[str, list[dict]]) -> list[tuple[str, str, tuple[float, ...]]]:
    """(row, reference, widths): each importance against the trained order before training;
    each fine-tune against the from-scratch US-Net and against no reordering / no teacher."""
    below = tuple(w for w in WIDTHS if w < 1.0)  # width 1.0 is the same network in (b)
    pairs = [(f"zero_shot-{i}", "zero_shot-none", below) for i in IMPORTANCES[1:]]
    finetunes = sorted(n for n in by_name if n.startswith("finetune-"))
    pairs += [(n, "scratch", WIDTHS) for n in finetunes]
    for name in finetunes:
        _, reorder, teacher = name.split("-")
        if reorder != "none":
            pairs.append((name, f"finetune-none-{teacher}", WIDTHS))
        if teacher != "none":
            pairs.append((name, f"finetune-{reorder}-none", WIDTHS))
    return [(a, b, w) for a, b, w in pairs if a in by_name and b in by_name]


def report(results: Path) -> str:
    """The table of every row (mean ± sd [seeds in the cell]) and the paired differences over
    seeds with their standard errors and verdicts (``benchmarks/report.py``'s rule)."""
    by_name = _by_name(results)
    order = (["plain"] + [f"zero_shot-{i}" for i in IMPORTANCES]
             + sorted(n for n in by_name if n.startswith("finetune-")) + ["scratch"])  # fmt: skip
    head = "| row | seeds | " + " | ".join(f"{w:.2f}" for w in WIDTHS) + " | wall s | teacher s |"
    lines = [f"results: {results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}", "",
             head, "|---|---|" + "---|" * (len(WIDTHS) + 2)]  # fmt: skip
    for name in order:
        rows = by_name.get(name)
        if not rows:
            lines.append(f"| {name} | missing | " + " | ".join("-" for _ in WIDTHS) + " | - | - |")
            continue
        cells = [cell([r["top1"][f"{w:g}"] for r in rows if f"{w:g}" in r["top1"]]) for w in WIDTHS]
        wall = cell([r["wall_s"] for r in rows])
        teacher = cell([r["teacher_s"] for r in rows if r.get("teacher_s")])
        seeds = f"{len(rows)} ({','.join(str(r['seed']) for r in sorted(rows, key=lambda r: r['seed']))})"
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {wall} | {teacher} |")
    pairs = comparisons(by_name)
    if pairs:
        data = {
            name: {int(r["seed"]): dict(r["top1"]) for r in rows} for name, rows in by_name.items()
        }
        images = min(_test_images(r) for rows in by_name.values() for r in rows)
        lines += [
            "",
            f"Paired differences over seeds (top-1 points; binomial SE on {images} test images):",
            "",
        ]
        tables = [
            comparison_table(data, [(a, b)], [width_key(w) for w in widths], images)
            for a, b, widths in pairs
        ]
        lines.append(tables[0])
        lines += [t.split("\n", 2)[2] for t in tables[1:]]  # one table: drop repeated headers
    return "\n".join(lines)


def plot(results: Path, path: Path) -> None:
    """Top-1 against width: (b) every importance before training; (c) the fine-tunes against
    (d) the from-scratch US-Net. Mean over seeds, bars = seed-to-seed sd."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    by_name = _by_name(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((left, [f"zero_shot-{i}" for i in IMPORTANCES], "(b) converted, no training"),
              (right, sorted(n for n in by_name if n.startswith("finetune-")) + ["scratch"],
               "(c) 1-epoch fine-tune vs (d) 4-epoch scratch"))  # fmt: skip
    for axis, names, title in panels:
        for name in names:
            rows = by_name.get(name)
            if not rows:
                continue
            xs, means, sds = [], [], []
            for w in WIDTHS:
                values = [r["top1"][f"{w:g}"] for r in rows if f"{w:g}" in r["top1"]]
                if values:
                    xs.append(w)
                    means.append(statistics.mean(values))
                    sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            label = f"{name.removeprefix('zero_shot-')} [{len(rows)} seeds]"
            axis.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=label)
        axis.set(title=title, xlabel="width", ylabel="top-1 %", xticks=list(WIDTHS))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"warm start: {results.name}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="a,b,c,d", help="comma-separated steps of a, b, c, d")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument(
        "--model", default="us_convnet", help="zoo model (us_resnet18: the second architecture)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="plain and scratch epochs (default 4; --quick 1)"
    )
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument(
        "--importances", default=",".join(IMPORTANCES), help="step (b)'s importances"
    )
    parser.add_argument("--finetune-reorder", default=None,
                        help="step (c)'s importance (default: the best of (b) over --seeds)")  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="2048 training images, 1 epoch: a smoke test"
    )
    parser.add_argument(
        "--limit-train",
        type=int,
        default=None,
        help="train on the first N images only (a short run; the tag says so)",
    )
    parser.add_argument("--limit-test", type=int, default=None,
                        help="evaluate on the first N test images only (the tag says so)")  # fmt: skip
    parser.add_argument("--teachers", default="none,init",
                        help="step (c)'s teacher settings (comma-separated of none, init)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per run (default: all cores)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run directories (default: runs/warm_start-<tag>)"
    )
    parser.add_argument("--results", type=Path, default=None,
                        help="result JSON folder (default: benchmarks/results/warm_start/<tag>)")  # fmt: skip
    parser.add_argument(
        "--report", action="store_true", help="only print the tables of finished results"
    )
    parser.add_argument("--plot", type=Path, default=None, help="also draw the spectra here (PNG)")
    args = parser.parse_args(argv)
    args.threads = args.threads or max(1, os.cpu_count() or 1)
    args.epochs = args.epochs or (1 if args.quick else 4)
    tag = (f"{args.model}{'-quick' if args.quick else ''}"
           f"{f'-N{args.limit_train}' if args.limit_train else ''}"
           f"{f'-T{args.limit_test}' if args.limit_test else ''}-E{args.epochs}")  # fmt: skip
    args.out = (args.out or ROOT / "runs" / f"warm_start-{tag}").resolve()
    args.results = (args.results or RESULTS / tag).resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = {s.strip() for s in args.steps.split(",")}
    if not steps <= {"a", "b", "c", "d"}:
        parser.error(f"--steps takes a, b, c, d; got {args.steps!r}")
    importances = [i.strip() for i in args.importances.split(",")]
    teachers = [t.strip() for t in args.teachers.split(",")]
    if not set(teachers) <= {"none", "init"}:
        parser.error(f"--teachers takes none, init; got {args.teachers!r}")
    if args.finetune_reorder not in (None, *IMPORTANCES[1:]):
        parser.error(f"--finetune-reorder takes {', '.join(IMPORTANCES[1:])}")
    if not set(importances) <= set(IMPORTANCES):
        parser.error(f"--importances takes {', '.join(IMPORTANCES)}")

    def show(result: dict) -> None:
        print(f"{result['name']} seed {result.get('seed', '')}: "
              + " / ".join(f"{result['top1'].get(f'{w:g}', float('nan')):.2f}" for w in WIDTHS)
              + f" ({result['wall_s']:.0f} s)", flush=True)  # fmt: skip

    if not args.report:
        for seed in seeds:
            if steps & {"a", "b", "c"}:
                show(plain(args, seed))  # (b) and (c) start from it
            if "b" in steps:
                for importance in importances:
                    show(zero_shot(args, seed, importance))
        if "c" in steps:
            best = args.finetune_reorder or best_importance(args, seeds)
            print(f"(c) reorders by: {best}", flush=True)
            for seed in seeds:
                for reorder in ("none", best):
                    for teacher in teachers:
                        show(finetune(args, seed, reorder, teacher))
        if "d" in steps:
            for seed in seeds:
                show(scratch(args, seed))
    text = report(args.results)
    atomic_write_bytes(args.results / "report.md", (text + "\n").encode())
    print(text)
    if args.plot is not None:
        plot(args.results, args.plot)
        print(f"\nPlot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
