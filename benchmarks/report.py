"""The paper-claims tables of docs/benchmarks.md, generated from the raw per-run results.

Every run of ``benchmarks/paper_claims.py`` writes one small JSON file,
``benchmarks/results/<suite>/<run>.json`` (format ``usnet-run/1``, below), and this script turns a
suite's files into the tables: nothing is typed in by hand, merged by hand or left out. ::

    python benchmarks/report.py paper_claims-E4            # suite under benchmarks/results/
    python benchmarks/report.py path/to/suite --plot spectrum.png

What the tables say:

* each cell is the mean over the seeds that have that width, with the seed-to-seed standard
  deviation and, in brackets, how many seeds it holds (``91.19 ± 0.13 [3]``);
* a row without any result is listed as ``missing``, not dropped;
* each comparison is a **paired difference over seeds** (same seed = same initialization and data
  order), with the standard error of its mean over seeds, next to the scoring set's binomial
  standard error of one accuracy (``sqrt(p (1 - p) / N)``, about 0.29 points at 91% on 10k
  images), and a word chosen by the numbers: with ``u`` the larger of the two standard errors
  (the binomial one alone for a single seed), ``ahead`` / ``behind`` when the difference exceeds
  ``2 u``, else ``level within noise``.

Raw result format (``usnet-run/1``), one file per ``usnet train`` run::

    {"format": "usnet-run/1", "suite": "paper_claims-E4", "run": "us_net-seed0",
     "row": "us_net", "index": 0, "seed": 0, "epochs": 4, "overrides": ["seed=0", ...],
     "config": {... the full run config ...}, "commit": "a8a3062", "scored_on": "test",
     "scored_images": 10000, "spectrum": [{"width": 0.25, "config_id": "...", "params": 17890,
     "macs": 1411520, "top1": 0.9006, "top5": 0.9978}, ...],
     "machine": {"platform": "...", "processor": "...", "cpus": 2, "torch": "2.14.1",
                 "device": "cpu"}, "threads": 1, "wall_s": 1437.2, "resumed": false,
     "finished": "2026-12-04T15:40:00Z"}

``top1`` is a fraction in the files and a percentage in the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

FORMAT = "usnet-run/1"
RESULTS = Path(__file__).resolve().parent / "results"
NOISE_FACTOR = 2.0  # "ahead" needs a difference above 2 standard errors


class ReportError(Exception):
    """Raw results that cannot make a table (conflicting or malformed files)."""


# -- reading -------------------------------------------------------------------------------------
def load_runs(directory: Path) -> list[dict]:
    """Every ``usnet-run/1`` file of a suite directory (other JSON files, e.g. calibration.json,
    are skipped), sorted by run name."""
    runs = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: not a readable JSON file ({err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            continue
        for key in ("row", "seed", "spectrum", "scored_on", "scored_images"):
            if key not in record:
                raise ReportError(f"{path}: a {FORMAT} record without {key!r}")
        runs.append(record)
    return runs


def width_key(width: float) -> str:
    return f"{float(width):g}"


def by_row(runs: Iterable[Mapping]) -> dict[str, dict[int, dict[str, float]]]:
    """row -> seed -> {width: top-1 %}. Several runs of one row and seed (the individual
    networks, one per width) merge by width; one width measured twice is an error."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        cells = table.setdefault(run["row"], {}).setdefault(int(run["seed"]), {})
        for point in run["spectrum"]:
            key = width_key(point["width"])
            if key in cells:
                raise ReportError(f"row {run['row']!r}, seed {run['seed']}: width {key} measured "
                                  f"twice (run {run.get('run')!r} and an earlier one)")  # fmt: skip
            cells[key] = 100.0 * float(point["top1"])
    return table


def scoring(runs: Iterable[Mapping]) -> tuple[str, int]:
    """The one split and size every run of a suite was scored on (mixing them is an error)."""
    seen = {(r["scored_on"], int(r["scored_images"])) for r in runs}
    if len(seen) > 1:
        raise ReportError(f"the runs were scored on different sets: {sorted(seen)}")
    return seen.pop() if seen else ("test", 10000)


# -- numbers -------------------------------------------------------------------------------------
def cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} [1]"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} [{len(values)}]"


def binomial_se(percent: float, images: int) -> float:
    """Standard error (points) of an accuracy of ``percent`` % measured on ``images`` images."""
    p = percent / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / images)


def paired(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]], width: str
           ) -> dict | None:  # fmt: skip
    """The paired difference a - b at one width over the seeds both have, or None."""
    seeds = sorted(s for s in a if s in b and width in a[s] and width in b[s])
    if not seeds:
        return None
    diffs = [a[s][width] - b[s][width] for s in seeds]
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    level = statistics.mean([a[s][width] for s in seeds] + [b[s][width] for s in seeds])
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "se": se, "level": level}


def verdict(mean: float, se_seeds: float | None, se_binomial: float) -> str:
    u = max(se_seeds or 0.0, se_binomial)
    if mean > NOISE_FACTOR * u:
        return "ahead"
    if mean < -NOISE_FACTOR * u:
        return "behind"
    return "level within noise"


# -- tables --------------------------------------------------------------------------------------
def results_table(data: Mapping[str, Mapping[int, Mapping[str, float]]], names: Sequence[str],
                  titles: Mapping[str, str], widths: Sequence[str]) -> str:  # fmt: skip
    lines = ["| row | seeds | " + " | ".join(f"{float(w):.2f}" for w in widths) + " |",
             "|---|---|" + "---|" * len(widths)]  # fmt: skip
    for name in dict.fromkeys(names):
        by_seed = data.get(name, {})
        label = f"{titles.get(name, name)} (`{name}`)"
        if not by_seed:
            lines.append(f"| {label} | missing | " + " | ".join("-" for _ in widths) + " |")
            continue
        cells = [cell([s[w] for s in by_seed.values() if w in s]) for w in widths]
        seeds = f"{len(by_seed)} ({','.join(str(s) for s in sorted(by_seed))})"
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(data: Mapping[str, Mapping[int, Mapping[str, float]]],
                     pairs: Sequence[tuple[str, str]], widths: Sequence[str], images: int) -> str:  # fmt: skip
    lines = ["| comparison | width | seeds | per seed | mean difference | SE over seeds | "
             "binomial SE | verdict |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        label = f"`{a}` - `{b}`"
        if not data.get(a) or not data.get(b):
            absent = " and ".join(f"`{n}`" for n in (a, b) if not data.get(n))
            lines.append(f"| {label} | - | - | - | - | - | - | missing ({absent} not run) |")
            continue
        for w in widths:
            d = paired(data[a], data[b], w)
            if d is None:
                continue
            se_b = binomial_se(d["level"], images)
            se = f"{d['se']:.2f}" if d["se"] is not None else "n/a (1 seed)"
            word = verdict(d["mean"], d["se"], se_b) + (" (1 seed)" if d["se"] is None else "")
            per_seed = " / ".join(f"{x:+.2f}" for x in d["diffs"])
            lines.append(f"| {label} | {float(w):.2f} | {len(d['seeds'])} | {per_seed} | "
                         f"{d['mean']:+.2f} | {se} | {se_b:.2f} | {word} |")  # fmt: skip
    return "\n".join(lines)


def spectrum_lines(runs: Iterable[Mapping], names: Sequence[str]) -> list[str]:
    """Per run of the named rows with a spectrum of more than 4 widths: its range and its
    largest dip between neighbouring widths."""
    lines = []
    for run in runs:
        if run["row"] not in names or len(run["spectrum"]) <= 4:
            continue
        points = sorted((float(p["width"]), 100.0 * float(p["top1"])) for p in run["spectrum"])
        dips = [(b[0], a[1] - b[1]) for a, b in zip(points, points[1:]) if b[1] < a[1]]
        worst = max(dips, key=lambda d: d[1], default=(None, 0.0))
        lines.append(f"`{run['row']}` spectrum, seed {run['seed']}: {len(points)} widths, top-1 "
                     f"{points[0][1]:.2f} at {points[0][0]:g} to {points[-1][1]:.2f} at "
                     f"{points[-1][0]:g}; largest dip between neighbours {worst[1]:.2f} points"
                     + (f" (at {worst[0]:g})" if worst[0] is not None else ""))  # fmt: skip
    return lines


def calibration_table(results: Sequence[Mapping], widths: Sequence[str], row: str) -> str:
    """Claim (d)'s table. ``row`` names the recalibrated run where the records do not (files
    written before they named it)."""
    row = ", ".join(f"`{r}`" for r in dict.fromkeys(r.get("row", row) for r in results))
    lines = [f"### (d) Calibration sample (seed-0 {row} US-Net, top-1 %, mean ± sd over samples [samples])",
             "| source | images | " + " | ".join(f"{float(w):.2f}" for w in widths) + " |",
             "|---|---|" + "---|" * len(widths)]  # fmt: skip
    for source, size in dict.fromkeys((r["source"], r["images"]) for r in results):
        rows = [r for r in results if (r["source"], r["images"]) == (source, size)]
        lines.append(f"| {source} | {size} | "
                     + " | ".join(cell([r["top1"][w] for r in rows if w in r["top1"]]) for w in widths) + " |")  # fmt: skip
    return "\n".join(lines)


def render(directory: Path, spec) -> str:
    """Markdown for one suite. ``spec`` supplies ``ROWS`` (name -> object with ``title``),
    ``GROUPS`` (group -> row names), ``GROUP_TITLES``, ``COMPARISONS`` (group -> (a, b) pairs),
    ``WIDTHS``, ``CLAIM_WIDTHS``, ``SPECTRUM_ROWS`` and ``CALIBRATION_ROW`` (claims_rows.py)."""
    directory = Path(directory)
    runs = load_runs(directory)
    data = by_row(runs)
    split, images = scoring(runs)
    titles = {name: row.title for name, row in spec.ROWS.items()}
    known = set(titles)
    unknown = sorted(set(data) - known)
    widths = [width_key(w) for w in spec.WIDTHS]
    commits = sorted({r.get("commit", "?") for r in runs})
    parts = [f"Suite `{directory.name}`: {len(runs)} runs, scored on the {split} set "
             f"({images} images; binomial SE of one accuracy about "
             f"{binomial_se(91.0, images):.2f} points at 91%), commits {', '.join(commits) or '-'}. "
             f"Generated by `python benchmarks/report.py {directory.name}`."]  # fmt: skip
    if unknown:
        parts.append("Rows in the results that paper_claims.py no longer defines: "
                     + ", ".join(f"`{n}`" for n in unknown))  # fmt: skip
    empty = [g for g, names in spec.GROUPS.items() if not any(n in data for n in names)]
    if empty:
        parts.append("Groups without results in this suite: " + ", ".join(f"`{g}`" for g in empty))
    for group, names in spec.GROUPS.items():
        if group in empty:
            continue
        group_widths = [width_key(w) for w in spec.CLAIM_WIDTHS] if group == "claims" else widths
        parts.append(f"### {spec.GROUP_TITLES.get(group, group)}")
        parts.append(results_table(data, names, titles, group_widths))
        if spec.COMPARISONS.get(group):
            parts.append(comparison_table(data, spec.COMPARISONS[group], group_widths, images))
    parts += spectrum_lines(runs, spec.SPECTRUM_ROWS)
    calib = directory / "calibration.json"
    if calib.exists():
        parts.append(calibration_table(json.loads(calib.read_text()), widths, spec.CALIBRATION_ROW))
    return "\n\n".join(parts)


def plot(directory: Path, path: Path, epochs: int | None = None) -> bool:
    """The US-Net's spectrum of its lowest seed against the individual networks (and n=4, n=2), as
    the README shows it. False when the suite has no ``us_net`` spectrum."""
    from usnet.deploy.spectrum import plot_spectrum
    from usnet.files import atomic_write_bytes

    runs = load_runs(directory)
    seeds = sorted(r["seed"] for r in runs if r["row"] == "us_net")
    if not seeds:
        return False
    seed = seeds[0]

    def points(row: str) -> list[dict]:
        merged = {float(p["width"]): p for r in runs if r["row"] == row and r["seed"] == seed
                  for p in r["spectrum"]}  # fmt: skip
        return [
            {"width": w, "macs": p["macs"], "top1": p["top1"]} for w, p in sorted(merged.items())
        ]

    others = {"trained alone at one width": points("individual")}
    if points("n4"):
        others["US-Net with n=4 (the paper's)"] = points("n4")
    if points("n2"):
        others["US-Net with n=2 (the two ends only)"] = points("n2")
    epochs = epochs or next(r["epochs"] for r in runs if r["row"] == "us_net")
    model = next(r["config"]["model"] for r in runs if r["row"] == "us_net")
    title = f"{model} on Fashion-MNIST, {epochs} epochs, seed {seed}"
    atomic_write_bytes(path, plot_spectrum(points("us_net"), title, others))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", help="a suite name under benchmarks/results/, or its directory")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the spectrum plot here")
    args = parser.parse_args(argv)
    directory = Path(args.suite)
    if not directory.is_dir():
        directory = RESULTS / args.suite
    if not directory.is_dir():
        parser.error(f"no results directory {args.suite!r} (nor {RESULTS / args.suite})")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import claims_rows

    try:
        if not load_runs(directory):
            raise ReportError(
                f"{str(directory)!r} holds no {FORMAT} result files: nothing to report"
            )
        print(render(directory, claims_rows))
        if args.plot is not None and plot(directory, args.plot):
            print(f"\nPlot: {args.plot}")
    except ReportError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
