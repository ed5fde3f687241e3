"""Does one US-Net match networks trained alone at every width? The paper's claims, measured.

Trains, with the same epochs and recipe (``configs/fashion_mnist.yaml`` plus each row's overrides),
the US-Net, individual networks at 0.25 / 0.5 / 0.75 / 1.0, and the ablations of the recipe and of
the seed paper's other claims, then prints markdown tables of top-1 at each width (mean and spread
over seeds) and the US-Net's whole spectrum::

    python benchmarks/paper_claims.py --rows headline --seeds 0,1,2      # the headline table
    python benchmarks/paper_claims.py --rows all --jobs 2                # every row, 2 runs at once
    python benchmarks/paper_claims.py --quick                            # minutes: a smoke test
    python benchmarks/paper_claims.py --report                           # tables from the raw results
    python benchmarks/paper_claims.py --rows lr_sweep --score-on val     # choose on a validation split
    python benchmarks/paper_claims.py --config configs/fashion_mnist_vit.yaml --rows us_net,individual

Every run is an ordinary ``usnet train`` in its own directory under ``--out``; finished runs are
reused and interrupted ones resumed, so the benchmark can be stopped and continued at any time.
Every finished run also writes its raw result, ``benchmarks/results/<suite>/<run>.json`` (suite:
the ``--out`` directory's name, e.g. ``paper_claims-E4``; format in ``benchmarks/report.py``),
small enough to commit; the tables (``--report``, or ``python benchmarks/report.py <suite>``) are
generated from those files alone. ``--score-on val`` trains on the training images less a
held-out validation split (``data.val_split=5000``, ``data.val_seed=0``) and scores on it: choose
recipes there, then report the chosen one once on the test set.
Claim (d), the calibration sample, needs no training of its own: it recalibrates the seed-0 US-Net
with 128 to 8192 images, drawn with eval-time or train-time (augmenting) transforms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from claims_rows import (  # the rows: plain data, shared with report.py
    CALIBRATION_ROW,
    CONFIG,
    GROUPS,
    RESULTS,
    ROOT,
    ROWS,
    VAL_SPLIT,
    WIDTHS,
)

from usnet.files import atomic_write_bytes
from usnet.train.config import load_config

QUICK = ("data.limit_train=6000", "data.limit_test=2000", "calib.num_images=256",
         "eval.epoch_calib_images=256", "eval.every_epoch=false")  # fmt: skip


def run_dir(out: Path, name: str, index: int, seed: int) -> Path:
    return out / (name if len(ROWS[name].runs) == 1 else f"{name}-{index}") / f"seed{seed}"


def run_name(name: str, index: int, seed: int) -> str:
    """The raw result's file stem: ``us_net-seed0``, ``individual-2-seed1``."""
    return f"{name if len(ROWS[name].runs) == 1 else f'{name}-{index}'}-seed{seed}"


def overrides_for(name: str, index: int, seed: int, args: argparse.Namespace) -> list[str]:
    row = ROWS[name]
    return [*row.runs[index], f"seed={seed}", f"epochs={args.epochs}", f"eval.widths={row.eval_widths}",
            *(QUICK if args.quick else ()), *(VAL_SPLIT if args.score_on == "val" else ()),
            *args.set]  # fmt: skip


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip


def raw_record(suite: str, name: str, index: int, seed: int, overrides: list[str], directory: Path,
               commit: str, wall_s: float | None, resumed: bool, threads: int,
               config_path: Path = CONFIG) -> dict:  # fmt: skip
    """The raw result of one finished run (format ``usnet-run/1``, see benchmarks/report.py)."""
    from datetime import datetime, timezone

    from usnet.train.data import datasets_for

    config = load_config(config_path, overrides)
    spectrum = json.loads((directory / "spectrum.json").read_text())
    points = spectrum["rows"] if isinstance(spectrum, dict) else spectrum
    scored = datasets_for(config)[2]
    finished = datetime.fromtimestamp((directory / "spectrum.json").stat().st_mtime, timezone.utc)
    return {
        "format": "usnet-run/1", "suite": suite, "run": run_name(name, index, seed), "row": name,
        "index": index, "seed": seed, "epochs": config.epochs, "overrides": overrides,
        "config": config.to_dict(), "commit": commit,
        "scored_on": "val" if config.data.val_split else "test", "scored_images": len(scored),
        "spectrum": points, "machine": machine(), "threads": threads,
        "wall_s": None if wall_s is None else round(wall_s, 1), "resumed": resumed,
        "finished": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }  # fmt: skip


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), recorded with every run;
    ``$USNET_COMMIT`` when set (a lent GPU machine's copy of the tree, whose git metadata, if
    any, is not this checkout's)."""
    if os.environ.get("USNET_COMMIT"):  # the copy's own git metadata may be stale
        return os.environ["USNET_COMMIT"]
    found = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return found or "?"


def run_usnet_train(
    config: Path, directory: Path, overrides: list[str], threads: int
) -> tuple[float, bool]:
    """Run ``usnet train config --out directory --set overrides`` in a subprocess (``--resume`` when
    the directory holds a checkpoint of an interrupted run), its output appended to
    ``directory/train.log``. Returns (wall seconds, whether it resumed); raises if it fails."""
    command = [sys.executable, "-m", "usnet", "train", str(config), "--out", str(directory),
               "--set", *overrides]  # fmt: skip
    resumed = (directory / "checkpoint.pt").exists()
    if resumed:
        command.append("--resume")
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(directory / "train.log", "a") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {done.returncode}); see {directory / 'train.log'}"
        )
    return time.perf_counter() - start, resumed


def train(out: Path, name: str, index: int, seed: int, args: argparse.Namespace) -> dict:
    """One `usnet train` run (reused when finished, resumed when interrupted); its results.
    Writes the raw result under ``args.results`` (also for a reused run that lacks one)."""
    directory = run_dir(out, name, index, seed)
    result_file = directory / "benchmark.json"
    raw_file = args.results / f"{run_name(name, index, seed)}.json"
    overrides = overrides_for(name, index, seed, args)
    if result_file.exists():
        check_trained_as(directory, load_config(args.config, overrides).to_dict(), name)
        result = json.loads(result_file.read_text())
        if not raw_file.exists():
            record = raw_record(out.name, name, index, seed, overrides, directory, result.get("commit", "?"),
                                result.get("wall_s"), bool(result.get("resumed")), args.threads,
                                args.config)  # fmt: skip
            write_json(raw_file, record)
        return result
    commit = git_commit()
    wall_s, resumed = run_usnet_train(args.config, directory, overrides, args.threads)
    record = raw_record(out.name, name, index, seed, overrides, directory, commit, wall_s,
                        resumed, args.threads, args.config)  # fmt: skip
    write_json(raw_file, record)
    result = {"name": name, "index": index, "seed": seed, "overrides": overrides, "commit": commit,
              "wall_s": wall_s, "resumed": resumed,
              "top1": {f"{r['width']:g}": 100 * r["top1"] for r in record["spectrum"]},
              "macs": {f"{r['width']:g}": r["macs"] for r in record["spectrum"]}}  # fmt: skip
    write_json(result_file, result)
    return result


def write_json(path: Path, record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())


# Settings of the sandwich step: an individual network (one width per step) does not use them.
SANDWICH_ONLY = ("num_widths", "sandwich_ends", "inplace_distill", "distill_temperature",
                 "distill_label_weight", "distill_warmup_epochs")  # fmt: skip


def check_trained_as(directory: Path, expected: dict, name: str) -> None:
    """Refuse a finished run trained otherwise than its row now says (a row or the shipped config
    changed since), going by the config saved in the run's own checkpoint. What is evaluated
    (``eval``) and logged may differ, as may the sandwich settings of an individual network:
    they do not change the trained network."""
    from usnet.checkpoint import read_checkpoint
    from usnet.train.config import config_diff, load_run_config
    from usnet.train.rundir import FINAL

    trained = load_run_config(read_checkpoint(directory / FINAL)).to_dict()
    ignored = ("eval", "log_every", *(SANDWICH_ONLY if expected["mode"] == "individual" else ()))
    kept = lambda config: {k: v for k, v in config.items() if k not in ignored}  # noqa: E731
    changed = config_diff(kept(trained), kept(expected))
    if changed:
        raise RuntimeError(
            f"{directory} was trained with other settings than row {name!r} now has "
            f"({', '.join(changed)}); move it away to train the row again, or use another --out"
        )


def calibration_claim(out: Path, args: argparse.Namespace) -> list[dict]:
    """Claim (d): top-1 of the seed-0 ``CALIBRATION_ROW`` US-Net recalibrated from samples of 128
    to 8192 images. Each record names the run it recalibrated."""
    import torch

    import usnet
    from usnet.evaluation import evaluate
    from usnet.train.data import build_datasets

    result_file = args.results / "calibration.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    torch.set_num_threads(args.threads)
    model_file = run_dir(out, CALIBRATION_ROW, 0, 0) / "model.pt"
    if not model_file.exists():
        raise FileNotFoundError(f"claim (d) recalibrates {model_file}: train it first "
                                f"(--rows {CALIBRATION_ROW} --seeds 0)")  # fmt: skip
    model, commit = usnet.load(model_file), git_commit()
    config = load_config(args.config, QUICK if args.quick else ())
    d = config.data
    augmented, calib_set, test_set, _ = build_datasets(d.name, d.root, limit_train=d.limit_train,
                                                       limit_test=d.limit_test, augment=True)  # fmt: skip
    loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
    sizes = (128, 256, 512, 1024, 2048) if args.quick else (128, 256, 512, 1024, 2048, 4096, 8192)
    results = []
    for source, dataset in (("eval transforms", calib_set), ("train transforms", augmented)):
        for size in sizes:
            for sample_seed in range(args.calib_seeds):
                usnet.calibrate(model, dataset, WIDTHS, num_images=size, seed=100 + sample_seed,
                                batch_size=128, progress=False)  # fmt: skip
                top1 = [100 * t1 for t1, _ in evaluate(model, loader, WIDTHS, torch.device("cpu"))]
                results.append({"row": CALIBRATION_ROW, "model_seed": 0, "commit": commit,
                                "source": source, "images": size, "seed": sample_seed,
                                "top1": dict(zip(map("{:g}".format, WIDTHS), top1))})  # fmt: skip
                print(f"calibration {source}, {size} images, seed {sample_seed}: "
                      + " / ".join(f"{t:.2f}" for t in top1), flush=True)  # fmt: skip
    write_json(result_file, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="headline",
                        help=f"comma-separated rows or groups ({', '.join(GROUPS)}, all); rows: {', '.join(ROWS)}")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="the run config every row starts from (default: the main job's; "
        "configs/fashion_mnist_vit.yaml: the US-ViT against ViTs trained alone)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every run, after the row's (e.g. device=cuda)",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="6000 training images (a smoke test)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per run (default: cores / jobs)"
    )
    parser.add_argument("--calibration", action="store_true", help="also run claim (d)")
    parser.add_argument("--calib-seeds", type=int, default=3)
    parser.add_argument("--score-on", choices=("test", "val"), default="test",
                        help="val: hold out 5000 training images and score on them (choose recipes "
                             "there); test (default): the test set")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="run directories; default: runs/paper_claims[-quick]-E<epochs>[-val]")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None,
                        help="raw results; default: benchmarks/results/<the --out directory's name>")  # fmt: skip
    parser.add_argument(
        "--report", action="store_true", help="only print the tables of the raw results"
    )
    args = parser.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.config = args.config.resolve()
    suffix = (f"{'' if args.config == CONFIG else '-' + args.config.stem}"
              f"{'-quick' if args.quick else ''}-E{args.epochs}"
              f"{'-val' if args.score_on == 'val' else ''}")  # fmt: skip
    out = (args.out or ROOT / "runs" / f"paper_claims{suffix}").resolve()
    args.results = (args.results or RESULTS / out.name).resolve()
    if not args.report:
        names: list[str] = []
        for item in args.rows.split(","):
            item = item.strip()
            if item == "all":
                names += list(ROWS)
            elif item in GROUPS:
                names += GROUPS[item]
            elif item in ROWS:
                names.append(item)
            else:
                parser.error(f"unknown row {item!r}; valid: {', '.join([*GROUPS, 'all', *ROWS])}")
        seeds = [int(s) for s in args.seeds.split(",")]
        jobs = [(name, index, seed) for seed in seeds for name in dict.fromkeys(names)
                for index in range(len(ROWS[name].runs))]  # fmt: skip
        start, failed = time.perf_counter(), []

        def run(job: tuple[str, int, int]) -> None:
            try:
                result = train(out, *job, args)
            except Exception as err:  # report it, keep the other runs going
                failed.append(job)
                print(f"FAILED: {err}", flush=True)
                return
            print(f"{result['name']}[{result['index']}] seed {result['seed']}: "
                  + ", ".join(f"{w}: {result['top1'][f'{w:g}']:.2f}" for w in WIDTHS if f"{w:g}" in result["top1"])
                  + f" ({result['wall_s']:.0f} s)", flush=True)  # fmt: skip

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, jobs))
        if args.calibration:
            calibration_claim(out, args)
        print(f"wall time {time.perf_counter() - start:.0f} s for {len(jobs)} runs", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/report.py
    import report

    if not args.results.is_dir():
        print(f"no raw results under {args.results} yet", file=sys.stderr)
        return 0 if args.report else 1
    import claims_rows

    text = report.render(args.results, claims_rows)
    plot = out / "spectrum_vs_individual.png"
    out.mkdir(parents=True, exist_ok=True)
    if report.plot(args.results, plot, args.epochs):
        text += f"\n\nPlot: {plot}"
    atomic_write_bytes(out / "report.md", (text + "\n").encode())
    print(text)
    if not args.report and failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
