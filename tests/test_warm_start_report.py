"""benchmarks/warm_start.py's tables and plot, from synthetic result files: every row listed
(missing ones say so), cells with their seed counts, paired differences over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from usnet_testing import load_benchmark

warm_start = load_benchmark("warm_start")


def write(directory: Path, name: str, seed: int, top1: dict[str, float], **extra) -> None:
    record = {"name": name, "seed": seed, "overrides": [f"seed={seed}"], "commit": "abc1234",
              "wall_s": 10.0 + seed, "top1": top1, **extra}  # fmt: skip
    (directory / f"{name}-seed{seed}.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path) -> Path:
    """The trained order and bn on seeds 0-2 (bn 5 points ahead at 0.25 on each, with spread),
    one fine-tune and scratch on seeds 0-1; every other importance missing."""
    for seed in range(3):
        write(tmp_path, "plain", seed, {"1": 91.0})
        write(tmp_path, "zero_shot-none", seed, {"0.25": 10.0, "0.5": 40.0 + seed, "0.75": 80.0,
                                                 "1": 91.0}, test_images=10000)  # fmt: skip
        write(tmp_path, "zero_shot-bn", seed, {"0.25": 15.0 + seed * 0.1, "0.5": 40.0 + seed,
                                               "0.75": 80.5, "1": 91.0}, test_images=10000)  # fmt: skip
    for seed in range(2):
        top1 = {"0.25": 88.0, "0.5": 90.0, "0.75": 91.0, "1": 91.5}
        write(tmp_path, "finetune-bn-none", seed, top1)
        write(tmp_path, "scratch", seed, {**top1, "0.25": 90.0 + seed})
    return tmp_path


def test_report_rows_cells_and_missing(results):
    text = warm_start.report(results)
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert (
        "| zero_shot-bn | 3 (0,1,2) | 15.10 ± 0.10 [3] | 41.00 ± 1.00 [3] | 80.50 ± 0.00 [3]"
        in rows["zero_shot-bn"]
    )
    assert rows["zero_shot-l1"].startswith("| zero_shot-l1 | missing |")
    assert rows["plain"].startswith(
        "| plain | 3 (0,1,2) | - | - | - | 91.00 ± 0.00 [3] | 11.00 ± 1.00 [3]"
    )


def test_report_paired_differences(results):
    text = warm_start.report(results)
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    bn = next(line for line in lines if "`zero_shot-bn` - `zero_shot-none` | 0.25" in line)
    # +5.0 / +5.1 / +5.2: mean +5.10, SE 0.1 / sqrt(3) = 0.06, binomial SE at 12.55 % on 10k: 0.33
    assert "| 3 | +5.00 / +5.10 / +5.20 | +5.10 | 0.06 | 0.33 | ahead |" in bn
    level = next(line for line in lines if "`zero_shot-bn` - `zero_shot-none` | 0.75" in line)
    assert level.endswith("| level within noise |")  # +0.5 is under 2 x the binomial 0.40
    assert not any("| 1.00 |" in line for line in lines if "zero_shot" in line)  # 1.0 identical
    scratch = next(line for line in lines if "`finetune-bn-none` - `scratch` | 0.25" in line)
    assert "| 2 | -2.00 / -3.00 | -2.50 | 0.50 |" in scratch and scratch.endswith("| behind |")


def test_plot_writes_a_png(results, tmp_path):
    path = tmp_path / "plot" / "warm_start.png"
    path.parent.mkdir()
    warm_start.plot(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_test_images_from_the_overrides():
    assert warm_start._test_images({"overrides": ["data.limit_test=2000"]}) == 2000
    assert warm_start._test_images({"overrides": []}) == 10000
    assert warm_start._test_images({"test_images": 500}) == 500
