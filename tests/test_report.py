"""benchmarks/report.py: the paper-claims tables generated from raw per-run result files
(synthetic ones here), and paper_claims.py writing those files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from usnet_testing import load_benchmark

report = load_benchmark("report")
paper_claims = load_benchmark("paper_claims")
claims_rows = load_benchmark("claims_rows")


def write_run(directory: Path, row: str, seed: int, top1: dict[float, float], *, index: int = 0,
              scored_on: str = "test", images: int = 10000, config: dict | None = None) -> None:  # fmt: skip
    """One synthetic raw result: top-1 in percent per width."""
    name = f"{row}-{index}-seed{seed}" if len(top1) == 1 else f"{row}-seed{seed}"
    record = {"format": report.FORMAT, "suite": directory.name, "run": name, "row": row,
              "index": index, "seed": seed, "epochs": 4, "overrides": [f"seed={seed}"],
              "config": config or {"model": "us_convnet"}, "commit": "abc1234", "scored_on": scored_on, "scored_images": images,
              "spectrum": [{"width": w, "config_id": "x", "params": 1, "macs": int(1e6 * w),
                            "top1": t / 100, "top5": 1.0} for w, t in top1.items()],
              "machine": {"cpus": 2}, "threads": 1, "wall_s": 1.0, "resumed": False,
              "finished": "2026-12-04T00:00:00Z"}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(record))


WIDTHS = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture
def suite(tmp_path) -> Path:
    """us_net on seeds 0-2; individual networks (one run per width) on seeds 0-2 except width
    0.25 of seed 2; n4 on seed 0 only; every other row missing."""
    d = tmp_path / "paper_claims-E4"
    us = {0: [90.0, 91.0, 91.5, 92.0], 1: [90.2, 91.2, 91.7, 92.1], 2: [90.4, 91.4, 91.6, 91.9]}
    alone = {0: [89.0, 91.05, 91.5, 90.0], 1: [89.1, 91.1, 91.6, 90.3], 2: [None, 91.3, 91.7, 90.1]}
    for seed in range(3):
        write_run(d, "us_net", seed, dict(zip(WIDTHS, us[seed])))
        for i, (w, t) in enumerate(zip(WIDTHS, alone[seed])):
            if t is not None:
                write_run(d, "individual", seed, {w: t}, index=i)
    write_run(d, "n4", 0, {w: t - 0.1 for w, t in zip(WIDTHS, us[0])})
    (d / "calibration.json").write_text(json.dumps([
        {"source": "eval transforms", "images": 128, "seed": s, "top1": {"0.25": 90 + s, "0.5": 91,
                                                                          "0.75": 91, "1": 92}}
        for s in range(2)]))  # fmt: skip
    return d


def rows_of(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_cells_count_their_seeds_and_missing_rows_are_listed(suite):
    text = report.render(suite, claims_rows)
    [us_row] = [r for r in rows_of(text, "| US-Net, default recipe (n=5) (`us_net`)")][:1]
    assert us_row.split(" | ")[1] == "3 (0,1,2)"
    assert "90.20 ± 0.20 [3]" in us_row  # 0.25: mean and sd of 90.0, 90.2, 90.4
    alone = rows_of(text, "| individual networks, one trained per width (`individual`)")[0]
    cells = [c.strip() for c in alone.strip("|").split("|")][2:]
    assert cells[0] == "89.05 ± 0.07 [2]"  # seed 2 has no 0.25: this cell holds 2 seeds
    assert cells[1].endswith("[3]")
    n4 = rows_of(text, "| US-Net with the paper's n=4 (`n4`)")[0]
    assert "89.90 [1]" in n4
    missing = rows_of(text, "| US-Net with only max + min (n=2) (`n2`)")[0]
    assert missing.split(" | ")[1] == "missing"
    # every row of every group is listed, run or not
    for group, names in claims_rows.GROUPS.items():
        for name in dict.fromkeys(names):
            assert f"(`{name}`) |" in text, (group, name)
    assert (
        "### (d) Calibration sample (seed-0 `us_net` US-Net" in text
        and "| eval transforms | 128 | 90.50 ± 0.71 [2]" in text
    )
    assert "10000 images" in text and "commits abc1234" in text


def test_plot_draws_the_lowest_seed_against_the_networks_trained_alone(
    suite, tmp_path, monkeypatch
):
    import usnet.deploy.spectrum

    drawn = {}

    def fake_plot(points, title, others):
        drawn.update(points=points, title=title, others=others)
        return b"png"

    monkeypatch.setattr(usnet.deploy.spectrum, "plot_spectrum", fake_plot)
    assert report.plot(suite, tmp_path / "p.png") and (tmp_path / "p.png").read_bytes() == b"png"
    assert drawn["title"] == "us_convnet on Fashion-MNIST, 4 epochs, seed 0"
    assert [p["top1"] for p in drawn["points"]] == [0.90, 0.91, 0.915, 0.92]  # seed 0, not 1 or 2
    # the one-width runs of seed 0 merged into one curve; n4 drawn, n2 (not run) left out
    alone = drawn["others"]["trained alone at one width"]
    assert [(p["width"], p["top1"]) for p in alone] == [(0.25, 0.89), (0.5, 0.9105), (0.75, 0.915),
                                                         (1.0, 0.90)]  # fmt: skip
    assert list(drawn["others"]) == ["trained alone at one width", "US-Net with n=4 (the paper's)"]
    write_run(suite, "n2", 0, {0.25: 90.0, 0.5: 85.0, 1.0: 92.0})
    report.plot(suite, tmp_path / "p.png")
    assert [p["top1"] for p in drawn["others"]["US-Net with n=2 (the two ends only)"]] == [
        0.90,
        0.85,
        0.92,
    ]
    assert not report.plot(tmp_path / "empty", tmp_path / "q.png")


def test_calibration_table_names_the_run_its_records_recalibrated(suite):
    records = json.loads((suite / "calibration.json").read_text())
    (suite / "calibration.json").write_text(json.dumps([{**r, "row": "n4"} for r in records]))
    assert "(seed-0 `n4` US-Net" in report.render(suite, claims_rows)


def test_paired_differences_standard_errors_and_words(suite):
    text = report.render(suite, claims_rows)
    lines = {line.split(" | ")[1]: line for line in rows_of(text, "| `us_net` - `individual` |")}
    # width 1.0: differences 2.0 / 1.8 / 1.8 -> mean 1.87, SE 0.07: far beyond noise
    cols = [c.strip() for c in lines["1.00"].strip("|").split("|")]
    assert cols[2:] == ["3", "+2.00 / +1.80 / +1.80", "+1.87", "0.07", "0.29", "ahead"]
    # width 0.5: -0.05 / +0.10 / +0.10 -> +0.05: level within noise
    assert lines["0.50"].endswith("| level within noise |")
    # width 0.25: only seeds 0 and 1 are paired
    assert lines["0.25"].split(" | ")[2] == "2"
    n4 = {line.split(" | ")[1]: line for line in rows_of(text, "| `n4` - `individual` |")}
    assert "n/a (1 seed)" in n4["1.00"] and n4["1.00"].endswith(
        "ahead (1 seed) |"
    )  # +1.9 > 2 x 0.29
    assert n4["0.75"].endswith("level within noise (1 seed) |")  # -0.1
    assert rows_of(text, "| `us_net` - `no_distill_n5` |")[0].endswith(
        "missing (`no_distill_n5` not run) |"
    )


def test_verdict_and_binomial_error():
    assert report.binomial_se(91.0, 10000) == pytest.approx(100 * math.sqrt(0.91 * 0.09 / 1e4))
    assert round(report.binomial_se(91.0, 10000), 2) == 0.29
    assert report.verdict(0.5, 0.1, 0.29) == "level within noise"  # 0.5 < 2 x 0.29
    assert report.verdict(0.7, 0.1, 0.29) == "ahead"
    assert report.verdict(0.7, 0.4, 0.29) == "level within noise"  # the seeds' SE is larger
    assert report.verdict(-0.7, None, 0.29) == "behind"


def test_conflicting_or_mixed_results_are_refused(tmp_path):
    d = tmp_path / "s"
    write_run(d, "us_net", 0, {0.25: 90.0})
    write_run(d, "us_net", 0, {0.25: 91.0}, index=1)  # a second file with the same width
    with pytest.raises(report.ReportError, match="width 0.25 measured twice"):
        report.render(d, claims_rows)
    e = tmp_path / "t"
    write_run(e, "us_net", 0, {0.25: 90.0})
    write_run(e, "individual", 0, {0.25: 90.0}, scored_on="val", images=5000)
    with pytest.raises(report.ReportError, match="scored on different sets"):
        report.render(e, claims_rows)
    (e / "broken.json").write_text(json.dumps({"format": report.FORMAT, "row": "x"}))
    with pytest.raises(report.ReportError, match="without 'seed'"):
        report.load_runs(e)


def test_spectrum_lines_and_cli(suite, capsys):
    widths = [round(0.25 + 0.025 * i, 3) for i in range(31)]
    top1 = {w: 90 + 2 * (w - 0.25) for w in widths}
    top1[0.7] -= 0.3  # 0.05 per step: 0.25 below its neighbour 0.675
    write_run(suite, "us_net", 3, top1)
    assert report.main([str(suite)]) == 0
    out = capsys.readouterr().out
    assert "`us_net` spectrum, seed 3: 31 widths, top-1 90.00 at 0.25 to 91.50 at 1;" in out
    assert "largest dip between neighbours 0.25 points (at 0.7)" in out
    with pytest.raises(SystemExit):
        report.main([str(suite.parent / "nothing-here")])


def test_paper_claims_writes_a_raw_result_for_a_finished_run(tmp_path):
    """A finished run directory (checkpoint + spectrum) gets its raw file, with the split it was
    scored on and its size; the report reads it back."""
    import usnet
    from usnet.train.config import load_config
    from usnet.train.trainer import FINAL

    args = argparse.Namespace(epochs=4, quick=True, score_on="val", threads=1, set=[], config=paper_claims.CONFIG,
                              results=tmp_path / "results" / "paper_claims-quick-E4-val")  # fmt: skip
    out = tmp_path / "runs" / "paper_claims-quick-E4-val"
    overrides = paper_claims.overrides_for("us_net", 0, 0, args)
    assert "data.val_split=5000" in overrides and "data.limit_train=6000" in overrides
    directory = paper_claims.run_dir(out, "us_net", 0, 0)
    directory.mkdir(parents=True)
    config = load_config(paper_claims.CONFIG, overrides)
    model = usnet.models.create_model("us_convnet", num_classes=10, in_channels=1, small_input=True)
    usnet.save(model, directory / FINAL, extra={"config": config.to_dict()})
    points = [{"width": w, "config_id": "c", "params": 1, "macs": 2, "top1": 0.9, "top5": 1.0}
              for w in WIDTHS]  # fmt: skip
    (directory / "spectrum.json").write_text(json.dumps(points))
    (directory / "benchmark.json").write_text(json.dumps({"commit": "abc", "wall_s": 5.0}))
    paper_claims.train(out, "us_net", 0, 0, args)
    raw = json.loads((args.results / "us_net-seed0.json").read_text())
    assert raw["format"] == "usnet-run/1" and raw["suite"] == "paper_claims-quick-E4-val"
    assert (raw["row"], raw["seed"], raw["epochs"], raw["commit"]) == ("us_net", 0, 4, "abc")
    assert raw["scored_on"] == "val" and raw["scored_images"] == 5000
    assert raw["config"]["data"]["val_split"] == 5000 and raw["spectrum"] == points
    assert {"platform", "cpus", "torch", "device"} <= set(raw["machine"])
    assert "90.00 [1]" in report.render(args.results, claims_rows)


def test_a_suite_without_results_is_an_error_not_an_empty_report(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "notes.txt").write_text("not a result")
    assert report.main([str(tmp_path / "logs")]) == 1
    assert "holds no usnet-run/1 result files" in capsys.readouterr().err
    (tmp_path / "logs" / "broken.json").write_text("{cut off")
    assert report.main([str(tmp_path / "logs")]) == 1
    assert "broken.json: not a readable JSON file" in capsys.readouterr().err
