"""usnet.select_width / usnet select: the widest width within a MACs, params or latency budget."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from usnet_testing import zoo_model

import usnet
import usnet.deploy.select as select_module
from usnet.channels import make_divisible
from usnet.cli import main
from usnet.deploy.select import config_candidates, parse_count, select_width

SIZE = (1, 1, 28, 28)
STAGES = (
    (32, 28),
    (64, 14),
    (64, 14),
    (128, 7),
    (128, 7),
)  # US-ConvNet: channels, output side at 28 px


def convnet_cost(width: float) -> tuple[int, int]:
    """(params, MACs) of the US-ConvNet at ``width`` on 28 px, by hand: 3x3 convs without bias,
    BN (weight + bias), linear 10-way classifier."""
    cin, params, macs = 1, 0, 0
    for channels, side in STAGES:
        c = make_divisible(channels * width, 8)
        params += cin * c * 9 + 2 * c
        macs += side * side * cin * c * 9
        cin = c
    return params + cin * 10 + 10, macs + cin * 10


GRID = [round(0.25 + i * 0.001, 3) for i in range(751)]


@pytest.fixture(scope="module")
def model():
    return zoo_model("us_convnet")


def test_parse_count():
    assert [parse_count(t) for t in ("150M", "2.5m", "800K", "1G", "1e6", "12345")] == [
        150_000_000, 2_500_000, 800_000, 1_000_000_000, 1_000_000, 12345]  # fmt: skip
    for bad in ("lots", "", "-5M", "0", "nanM"):
        with pytest.raises(ValueError, match="invalid count"):
            parse_count(bad)


def test_candidates_are_the_distinct_configurations(model):
    plan = usnet.channel_plan(model)
    candidates = config_candidates(plan)
    configs = [c for _, _, c in candidates]
    assert len(configs) == len(set(configs)) == len({plan.config(w) for w in GRID})
    previous_hi = None
    for width, (lo, hi), config in candidates:
        assert (
            lo <= width <= hi and plan.config(width) == plan.config(lo) == plan.config(hi) == config
        )
        if previous_hi is not None:
            assert lo == pytest.approx(previous_hi + 0.001)  # intervals tile the range
        previous_hi = hi
    assert candidates[0][1][0] == 0.25 and candidates[-1][1][1] == 1.0
    # representatives are round numbers: 0.5 for the interval holding 0.5
    assert any(w == 0.5 for w, _, _ in candidates)
    # one scan: the intervals and representatives are ChannelPlan.width_intervals', which
    # distinct_widths shares (0.5, not the 0.469 where its interval starts)
    assert [(i.width, (i.lo, i.hi), i.config) for i in plan.width_intervals()] == candidates
    assert plan.distinct_widths() == [w for w, _, _ in candidates]
    # a restricted sweep keeps the widest of widths with equal channels
    assert [w for w, _, _ in config_candidates(plan, [0.26, 0.25, 0.5, 1.0])] == [0.26, 0.5, 1.0]


@pytest.mark.parametrize("budget", [1_411_520, 5_532_544, 5_532_543, 9_000_000, 21_902_400, 10**9])
def test_macs_budget_picks_the_widest_fitting_configuration(model, budget):
    selection = select_width(model, max_macs=budget, input_size=SIZE)
    for c in selection.candidates:  # the profiler's counts are the hand-computed ones
        assert (c.params, c.macs) == convnet_cost(c.width)
    fitting = [w for w in GRID if convnet_cost(w)[1] <= budget]
    plan = usnet.channel_plan(model)
    assert plan.config(selection.width) == plan.config(max(fitting))
    assert selection.chosen.macs == convnet_cost(max(fitting))[1] <= budget
    assert selection.to_dict()["macs"] == selection.chosen.macs


def test_exact_macs_of_width_half_is_inclusive(model):
    assert convnet_cost(0.5)[1] == 5_532_544
    assert select_width(model, max_macs=5_532_544, input_size=SIZE).width == 0.5
    assert select_width(model, max_macs=5_532_543, input_size=SIZE).chosen.macs < 5_532_544


def test_macs_and_params_are_per_image(model):
    """The batch size of input_size is for latency only: MACs and params are counted per image."""
    selection = select_width(model, max_macs=5_532_544, input_size=(8, 1, 28, 28))
    assert selection.width == 0.5
    assert (selection.chosen.params, selection.chosen.macs) == convnet_cost(0.5)
    assert selection.input_size == (8, 1, 28, 28)


def test_params_and_combined_budgets(model):
    plan = usnet.channel_plan(model)
    selection = select_width(model, max_params=60_000, input_size=SIZE)
    assert plan.config(selection.width) == plan.config(
        max(w for w in GRID if convnet_cost(w)[0] <= 60_000)
    )
    both = select_width(model, max_params=100_000, max_macs=4_000_000, input_size=SIZE)
    expected = max(
        w for w in GRID if convnet_cost(w)[0] <= 100_000 and convnet_cost(w)[1] <= 4_000_000
    )
    assert plan.config(both.width) == plan.config(expected)


def test_spectrum_widths_and_top1(model):
    spectrum = [
        {"width": 0.45, "config_id": usnet.profile(model, 0.45, SIZE).config_id, "top1": 0.9}
    ]
    selection = select_width(model, max_macs=5_000_000, input_size=SIZE, spectrum=spectrum)
    assert selection.width == 0.45 and selection.chosen.top1 == 0.9  # 0.45's config fits 5M
    assert selection.to_dict()["top1"] == 0.9


def fake_latency(module, input_size, *, device, warmup, repeats):
    """A latency with a staircase bump: 24 channels in the first layer are 'misaligned' and slow."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    base = sum(c.out_channels for c in convs) / 40
    return [base + (100.0 if convs[0].out_channels == 24 else 0.0)] * repeats


def test_latency_choice_does_not_assume_monotonic_latency(model, monkeypatch, tmp_path):
    monkeypatch.setattr(select_module, "measure_latency", fake_latency)
    selection = select_width(model, max_latency_ms=10.0, input_size=SIZE, cache_dir=tmp_path)
    plan = usnet.channel_plan(model)
    latency = {c.width: c.latency_ms for c in selection.candidates}
    for c in selection.candidates:  # each is its own measurement
        channels = plan.channels(c.width)
        first = channels[plan.root_names[0]]
        assert c.latency_ms == pytest.approx(
            sum(channels[n] for n in plan.root_names) / 40 + (100 if first == 24 else 0)
        )
    slow = [w for w, ms in latency.items() if ms > 10.0]
    fitting = [w for w, ms in latency.items() if ms <= 10.0]
    assert selection.width == max(fitting)
    assert min(slow) < selection.width  # a narrower width is over budget: not smooth, still right
    assert selection.chosen.latency_ms <= 10.0 and selection.latency["measured"] == len(
        selection.candidates
    )


def test_latency_nothing_fits(model, monkeypatch, tmp_path):
    monkeypatch.setattr(select_module, "measure_latency", fake_latency)
    with pytest.raises(
        ValueError,
        match=r"no width fits the budget: the narrowest, width 0.25, needs .* ms > 0.01 ms",
    ):
        select_width(model, max_latency_ms=0.01, input_size=SIZE, cache_dir=tmp_path)


def test_measured_latency_threads_restored(model, tmp_path):
    before = torch.get_num_threads()
    selection = select_width(model, max_latency_ms=1e4, input_size=SIZE, widths=[0.25, 1.0], threads=2,
                             warmup=1, repeats=3, cache_dir=tmp_path)  # fmt: skip
    assert torch.get_num_threads() == before
    assert selection.latency["threads"] == 2 and selection.width == 1.0
    assert all(c.latency_ms > 0 for c in selection.candidates)


def test_real_latency_measurement_orders_widths_and_chooses_by_it(model, tmp_path):
    """Measured, not mocked: at batch 32 the US-ConvNet at 0.25 does 1/15 of the MACs of 1.0, so
    its latency must be well under half; a budget between the two measurements then chooses 0.25
    (from the cache: the same measurements), and one above both chooses 1.0."""
    size = (32, 1, 28, 28)
    kwargs = dict(input_size=size, widths=[0.25, 1.0], threads=1, warmup=2, repeats=9,
                  cache_dir=tmp_path)  # fmt: skip
    selection = select_width(model, max_latency_ms=1e4, **kwargs)
    latency = {c.width: c.latency_ms for c in selection.candidates}
    assert selection.latency["measured"] == 2
    assert latency[0.25] < 0.5 * latency[1.0], latency  # 15x fewer MACs: a generous margin
    between = (latency[0.25] + latency[1.0]) / 2
    assert select_width(model, max_latency_ms=between, **kwargs).width == 0.25
    assert select_width(model, max_latency_ms=1.01 * latency[1.0], **kwargs).width == 1.0


def test_select_errors(model):
    with pytest.raises(ValueError, match="a budget is needed"):
        select_width(model, input_size=SIZE)
    with pytest.raises(ValueError, match="max_macs must be a positive number"):
        select_width(model, max_macs=-1, input_size=SIZE)
    with pytest.raises(
        ValueError,
        match=r"no width fits the budget: the narrowest, width 0.25, needs 1.41M MACs > 1.00M",
    ):
        select_width(model, max_macs=1_000_000, input_size=SIZE)
    with pytest.raises(ValueError, match="outside the width range"):
        select_width(model, max_macs=1e9, input_size=SIZE, widths=[0.1])
    with pytest.raises(ValueError, match="device: invalid value 'meta'; valid: auto, cpu, cuda"):
        select_width(model, max_latency_ms=5, input_size=SIZE, device="meta")
    with pytest.raises(ValueError, match="latency is measured on cpu or cuda, not 'meta'"):
        select_width(model, max_latency_ms=5, input_size=SIZE, device=torch.device("meta"))


# --- usnet select and its latency cache ---------------------------------------------------------
def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def latency_argv(path, cache):
    return ["select", path, "--max-latency-ms", 1e4, "--widths", "0.25,0.5,1.0", "--repeats", 2,
            "--warmup", 1, "--threads", 1, "--latency-cache", cache, "--input-size", "1,1,28,28", "--json"]  # fmt: skip


def test_cli_latency_cache_reused_and_invalidated(tmp_path, capsys):
    model = zoo_model("us_convnet")
    spectrum = [
        {"width": 1.0, "config_id": usnet.profile(model, 1.0, SIZE).config_id, "top1": 0.91}
    ]
    path = usnet.save(model, tmp_path / "m.pt", extra={"spectrum": spectrum})
    cache = tmp_path / "cache"
    code, out, _ = run(latency_argv(path, cache), capsys)
    first = json.loads(out)
    assert code == 0 and first["latency"]["measured"] == 3 and first["latency"]["cached"] == 0
    assert first["width"] == 1.0 and first["top1"] == 0.91 and first["latency_ms"] > 0
    assert {"width", "params", "macs", "latency_ms", "top1"} <= set(first)
    files = list((cache / "latency").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["threads"] == 1
    # same checkpoint and settings: every latency comes from the cache, unchanged
    code, out, _ = run(latency_argv(path, cache), capsys)
    second = json.loads(out)
    assert code == 0 and second["latency"]["measured"] == 0 and second["latency"]["cached"] == 3
    assert [c["latency_ms"] for c in second["candidates"]] == [
        c["latency_ms"] for c in first["candidates"]
    ]
    # a damaged cache file is measured again and rewritten
    files[0].write_text("{not json")
    code, out, _ = run(latency_argv(path, cache), capsys)
    assert json.loads(out)["latency"]["measured"] == 3 and json.loads(files[0].read_text())["key"]
    # the checkpoint changes (new weights): its timings are not reused
    with torch.no_grad():
        model.features[0][0].weight.add_(1.0)
    usnet.save(model, path, extra={"spectrum": spectrum})
    code, out, _ = run(latency_argv(path, cache), capsys)
    assert code == 0 and json.loads(out)["latency"]["measured"] == 3
    assert len(list((cache / "latency").iterdir())) == 2


def test_cli_select_macs_text_and_plot(tmp_path, capsys):
    plot = tmp_path / "select.png"
    code, out, _ = run(["select", "us_convnet", "--max-macs", "5.6M", "--input-size", "1,1,28,28",
                        "--plot", plot], capsys)  # fmt: skip
    assert code == 0
    assert out.startswith("width 0.5 (same channels for widths") and "MACs 5.53M" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a budget is needed: max_macs, max_params or max_latency_ms (--max-macs"),
        (
            ["--max-macs", "1M"],
            "no width fits the budget: the narrowest, width 0.25, needs 1.41M MACs > 1.00M",
        ),
        (
            ["--max-macs", "1G", "--widths", "0.1,0.5"],
            "width 0.1 is outside the width range [0.25, 1.0]",
        ),
        (["--max-latency-ms", "-3"], "max_latency_ms must be a positive number"),
        (
            ["--max-latency-ms", "3", "--device", "tpu"],
            "device: invalid value 'tpu'; valid: auto, cpu, cuda, cuda:N",
        ),
    ],
)
def test_cli_select_errors_are_one_line(args, message, capsys):
    code, _, err = run(["select", "us_convnet", "--input-size", "1,1,28,28", *args], capsys)
    lines = err.strip().splitlines()
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith("usnet: error: ")
        and message in lines[0]
    )


def test_cli_select_bad_count_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "us_convnet", "--max-macs", "lots"])
    assert exit_info.value.code == 2 and "invalid count 'lots'" in capsys.readouterr().err
