"""usnet.channels: make_divisible, ChannelPlan arithmetic and validation, parse_widths."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models._utils import _make_divisible

from usnet import (
    ChannelGroup,
    ChannelPlan,
    config_id,
    config_key,
    make_divisible,
    parse_widths,
)


# --- make_divisible ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    value=st.floats(min_value=0.0, max_value=5000.0, allow_nan=False),
    divisor=st.sampled_from([1, 2, 3, 4, 8, 16, 24, 32]),
    min_value=st.one_of(st.none(), st.integers(min_value=1, max_value=64)),
)
def test_make_divisible_matches_torchvision(value, divisor, min_value):
    assert make_divisible(value, divisor, min_value) == _make_divisible(value, divisor, min_value)


@pytest.mark.parametrize(
    "value, divisor, expected",
    [(32 * 0.35, 8, 16), (32 * 0.5, 8, 16), (1280 * 0.75, 8, 960), (3.0, 8, 8), (20.0, 8, 24),
     (100.0, 8, 104), (11.0, 4, 12), (0.1, 1, 1)],
)  # fmt: skip
def test_make_divisible_examples(value, divisor, expected):
    assert make_divisible(value, divisor) == expected
    assert make_divisible(value, divisor) % divisor == 0


# --- plans ------------------------------------------------------------------------------------
def example_plan(width_range=(0.25, 1.0)) -> ChannelPlan:
    return ChannelPlan(
        [
            ChannelGroup("input", 3, fixed=True),
            ChannelGroup("stem", 32),
            ChannelGroup("expand", 192, parent="stem", ratio=6.0),
            ChannelGroup("block", 100, divisor=4),
            ChannelGroup("squeeze", 25, parent="block", ratio=0.25),
            ChannelGroup("odd", 10),
            ChannelGroup("logits", 10, fixed=True),
        ],
        width_range,
    )


@st.composite
def plans(draw):
    """Random plans: roots, fixed groups and derived groups (never capped by their size)."""
    lo = draw(st.floats(min_value=0.05, max_value=1.0))
    hi = draw(st.floats(min_value=lo, max_value=1.0))
    groups: list[ChannelGroup] = []
    for i in range(draw(st.integers(min_value=1, max_value=8))):
        kind = draw(st.sampled_from(["root", "fixed", "derived"]))
        size = draw(st.integers(min_value=1, max_value=600))
        if kind == "derived" and groups:
            parent = draw(st.sampled_from(groups))
            ratio = draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0, 4.0, 6.0]))
            size = max(1, int(round(parent.size * ratio)))
            groups.append(ChannelGroup(f"g{i}", size, parent=parent.name, ratio=ratio))
        elif kind == "fixed":
            groups.append(ChannelGroup(f"g{i}", size, fixed=True))
        else:
            divisor = draw(st.sampled_from([1, 2, 4, 8, 16, 24]))
            groups.append(ChannelGroup(f"g{i}", size, divisor=divisor))
    return ChannelPlan(groups, (lo, hi))


@settings(max_examples=150, deadline=None)
@given(plan=plans(), fractions=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
def test_channels_properties(plan, fractions):
    lo, hi = plan.width_range
    widths = sorted(min(hi, lo + f * (hi - lo)) for f in fractions)
    previous = None
    for w in widths:
        channels = plan.channels(w)
        assert list(channels) == list(plan.groups)
        for name, c in channels.items():
            g = plan.groups[name]
            assert 1 <= c <= g.size
            if g.fixed:
                assert c == g.size
            elif g.parent is not None:
                assert c == max(1, round(channels[g.parent] * g.ratio))
            else:
                assert c % g.divisor == 0 or c == g.size
                # width 1.0 is the network as built (issue 13); below it, torchvision's rounding
                expected = (
                    g.size if w >= 1.0 else min(g.size, make_divisible(g.size * w, g.divisor))
                )
                assert c == expected
            if previous is not None:
                assert c >= previous[name], (name, w)
        previous = channels
        assert plan.config(w) == tuple(channels.values())


def test_channels_example_values():
    plan = example_plan()
    assert plan.channels(1.0) == {
        "input": 3, "stem": 32, "expand": 192, "block": 100, "squeeze": 25, "odd": 10,
        "logits": 10,
    }  # fmt: skip
    # 32*0.35=11.2 -> 8 is below 90% -> 16; expand follows at 6x; 100*0.35=35 -> 36 (divisor 4)
    plan = example_plan((0.35, 1.0))
    assert plan.channels(0.35) == {
        "input": 3, "stem": 16, "expand": 96, "block": 36, "squeeze": 9, "odd": 8, "logits": 10,
    }  # fmt: skip
    assert plan.channels(0.5) == {
        "input": 3, "stem": 16, "expand": 96, "block": 52, "squeeze": 13, "odd": 8, "logits": 10,
    }  # fmt: skip
    assert plan.root_names == ["stem", "block", "odd"]


def test_channels_of_mapping_width_keeps_other_roots_at_top():
    plan = example_plan((0.25, 0.75))
    channels = plan.channels({"block": 0.25})
    assert channels["block"] == 24
    assert channels["stem"] == make_divisible(32 * 0.75, 8) == 24
    assert channels["expand"] == 144
    assert channels["odd"] == 8
    assert channels["input"] == 3 and channels["logits"] == 10


def test_width_range_top_below_one_caps_channels():
    plan = example_plan((0.25, 0.5))
    assert plan.channels(0.5)["stem"] == 16
    assert plan.config(0.5) != tuple(g.size for g in plan.groups.values())


def test_config_and_plan_equality():
    a, b = example_plan(), example_plan()
    assert a == b
    assert a.config(0.6) == b.config(0.6)
    assert a.config(0.3) != a.config(1.0)
    assert a != example_plan((0.35, 1.0))
    assert a != ChannelPlan([ChannelGroup("stem", 32)], (0.25, 1.0))
    assert a != "not a plan"
    # widths that round to the same channels are the same configuration
    assert a.config(0.5) == a.config(0.51)
    assert config_key((3, 16, 96)) == "3-16-96"
    ids = {config_id(c) for c in example_plan().distinct_configs(step=0.01)}
    assert len(ids) == len(example_plan().distinct_configs(step=0.01))
    # Pinned: the id names exported files and cache entries, so it must not change between
    # processes or releases (a salted hash() would pass a comparison with itself).
    assert config_id((3, 16, 96)) == "273dc70753"
    assert config_id((8, 16, 24)) != config_id((8, 16, 32))
    assert config_id((3, 16, 96)) != config_id((3, 169, 6))


def test_distinct_configs():
    plan = ChannelPlan([ChannelGroup("a", 32)], (0.25, 1.0))
    assert plan.distinct_configs() == [(8,), (16,), (24,), (32,)]
    configs = example_plan().distinct_configs(step=0.01)
    assert len(configs) == len(set(configs))
    assert configs[0] == example_plan().config(0.25)
    assert configs[-1] == example_plan().config(1.0)


# --- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.2, 1.01, 1.5, -0.5, 0.0, float("nan"), float("inf")])
def test_check_width_outside_range(bad):
    plan = example_plan()
    with pytest.raises(ValueError, match=r"\[0\.25, 1\.0\]"):
        plan.check_width(bad)
    with pytest.raises(ValueError, match=r"\[0\.25, 1\.0\]"):
        plan.channels(bad)


@pytest.mark.parametrize("bad", ["0.5", True, False, None, [0.5], b"1", 1j])
def test_check_width_wrong_type(bad):
    with pytest.raises(TypeError, match="width"):
        example_plan().check_width(bad)


def test_check_width_normalizes():
    plan = example_plan()
    assert plan.check_width(1) == 1.0 and isinstance(plan.check_width(1), float)
    assert plan.check_width(0.25 - 1e-12) == 0.25  # float noise at the ends is clamped
    assert plan.check_width(1.0 + 1e-12) == 1.0
    assert plan.check_width({"stem": 0.5}) == {"stem": 0.5}


def test_check_width_mapping_errors():
    plan = example_plan()
    with pytest.raises(ValueError) as info:
        plan.check_width({"nope": 0.5})
    message = str(info.value)
    assert "nope" in message
    for name in plan.root_names:
        assert name in message
    # fixed and derived groups have no multiplier of their own
    for name in ("input", "expand", "logits"):
        with pytest.raises(ValueError, match=name):
            plan.check_width({name: 0.5})
    with pytest.raises(ValueError, match="stem"):
        plan.check_width({"stem": 1.2})
    with pytest.raises(TypeError, match="stem"):
        plan.check_width({"stem": "0.5"})


@pytest.mark.parametrize("bad", [(0.5, 1.5), (0.0, 1.0), (-0.1, 1.0), (0.8, 0.5), (0.25, 1.0001)])
def test_width_range_values(bad):
    with pytest.raises(ValueError, match="width_range"):
        ChannelPlan([ChannelGroup("a", 8)], bad)


@pytest.mark.parametrize("bad", [(0.5,), (0.1, 0.5, 1.0), None, 0.5, ("a", "b")])
def test_width_range_types(bad):
    with pytest.raises(TypeError, match="width_range"):
        ChannelPlan([ChannelGroup("a", 8)], bad)


def test_width_range_single_width_allowed():
    plan = ChannelPlan([ChannelGroup("a", 64)], (0.5, 0.5))
    assert plan.width_range == (0.5, 0.5)
    assert plan.channels(0.5) == {"a": 32}


def test_plan_group_validation():
    with pytest.raises(ValueError, match="duplicate"):
        ChannelPlan([ChannelGroup("a", 8), ChannelGroup("a", 8)], (0.5, 1.0))
    with pytest.raises(ValueError, match="parent"):
        ChannelPlan([ChannelGroup("b", 8, parent="a"), ChannelGroup("a", 8)], (0.5, 1.0))
    with pytest.raises(ValueError, match="positive"):
        ChannelPlan([ChannelGroup("a", 0)], (0.5, 1.0))
    with pytest.raises(ValueError, match="positive"):
        ChannelPlan([ChannelGroup("a", 8, divisor=0)], (0.5, 1.0))


# --- serialization ----------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(plan=plans())
def test_to_dict_from_dict_round_trip(plan):
    data = json.loads(json.dumps(plan.to_dict()))  # plain JSON data
    again = ChannelPlan.from_dict(data)
    assert again == plan
    assert again.width_range == plan.width_range
    lo, hi = plan.width_range
    for w in (lo, (lo + hi) / 2, hi):
        assert again.channels(w) == plan.channels(w)


def test_from_dict_malformed():
    with pytest.raises(ValueError, match="malformed"):
        ChannelPlan.from_dict({"groups": []})
    with pytest.raises(ValueError, match="malformed"):
        ChannelPlan.from_dict({"groups": [{"nme": "a"}], "width_range": [0.5, 1.0]})


# --- parse_widths -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0.25:1.0:0.25", [0.25, 0.5, 0.75, 1.0]),
        ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),
        ("0.25:1.0:0.3", [0.25, 0.55, 0.85, 1.0]),  # stop is always included
        ("0.5:0.5:0.1", [0.5]),
        ("0.25,1.0", [0.25, 1.0]),
        (" 0.25, 0.5 ,1.0 ", [0.25, 0.5, 1.0]),
        ("0.35", [0.35]),
        ("1,", [1.0]),
    ],
)
def test_parse_widths(spec, expected):
    assert parse_widths(spec) == pytest.approx(expected, abs=1e-12)
    assert len(parse_widths(spec)) == len(expected)


@pytest.mark.parametrize(
    "spec", ["", " ", ",", "a,b", "0.25:1.0", "0.25:1.0:0", "0.25:1.0:-0.25", "1.0:0.25:0.25",
             "0.25:0.5:0.1:0.1", "0.25;0.5", "x:1:0.1"],
)  # fmt: skip
def test_parse_widths_invalid(spec):
    with pytest.raises(ValueError, match="invalid widths"):
        parse_widths(spec)


def test_parse_widths_dense_grid_is_exact():
    values = parse_widths("0.25:1.0:0.025")
    assert len(values) == 31
    assert values[0] == 0.25 and values[-1] == 1.0
    assert all(math.isclose(b - a, 0.025, abs_tol=1e-9) for a, b in zip(values, values[1:]))
