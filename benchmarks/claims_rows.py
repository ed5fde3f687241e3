"""The rows of benchmarks/paper_claims.py: what each one trains, how the report groups and compares
them. Plain data, imported by paper_claims.py (which trains them) and report.py (which reports
them), so neither imports the other's entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
WIDTHS = (0.25, 0.5, 0.75, 1.0)
SPECTRUM = "0.25:1.0:0.025"
RESULTS = ROOT / "benchmarks" / "results"
VAL_SPLIT = (
    "data.val_split=5000",
    "data.val_seed=0",
)  # --score-on val: 5000 held-out training images
LRS = (0.05, 0.2, 0.4)  # the individual networks' sweep around the shipped lr 0.1 (`individual`)


@dataclass(frozen=True)
class Row:
    title: str
    runs: tuple[tuple[str, ...], ...] = ((),)  # one `--set` list per run; results merge by width
    eval_widths: str = "0.25:1.0:0.25"


def _individual() -> tuple[tuple[str, ...], ...]:
    return tuple(("mode=individual", f"width={w}") for w in WIDTHS)


# The ablations change one thing of the paper's sandwich (n=4, the default before n=5), the
# recipe they were measured against; `n4` is that recipe itself.
N4 = "num_widths=4"


def _ablation(title: str, *overrides: str, eval_widths: str = "0.25:1.0:0.25") -> Row:
    return Row(f"{title} (n=4)", ((N4, *overrides),), eval_widths)


ROWS: dict[str, Row] = {
    # headline: the paper's central claim and its two techniques
    "us_net": Row("US-Net, default recipe (n=5)", eval_widths=SPECTRUM),
    "individual": Row("individual networks, one trained per width", _individual()),
    "n4": Row("US-Net with the paper's n=4", ((N4,),), eval_widths=SPECTRUM),
    "no_distill": _ablation("US-Net without in-place distillation", "inplace_distill=false"),
    "n2": Row("US-Net with only max + min (n=2)", (("num_widths=2",),)),
    "no_distill_n5": Row(
        "default recipe without in-place distillation", (("inplace_distill=false",),)
    ),
    # the recipe's steps on a short schedule
    "pure_distill": _ablation("pure in-place distillation (λ=0)", "distill_label_weight=0.0"),
    "distill_warmup": _ablation(
        "distillation after a 1-epoch warm-up on labels (λ 1 → 0)",
        "distill_label_weight=0.0",
        "distill_warmup_epochs=1",
    ),  # fmt: skip
    "warmup_mix": _ablation("λ 1 → 0.5 over 2 epochs", "distill_warmup_epochs=2"),
    "temperature2": _ablation("distillation temperature 2", "distill_temperature=2.0"),
    # (a) widths per step (n=4: `n4`, n=5: the default, `us_net`)
    **{f"n{n}": Row(f"n={n} widths per step", ((f"num_widths={n}",),)) for n in (3, 6)},
    # (b) lower bound of the width range
    **{
        f"lower{lo:g}": _ablation(
            f"width range [{lo:g}, 1.0]",
            f"width_range=[{lo},1.0]",
            eval_widths="0.05,0.15,0.25,0.35,0.5,0.75,1.0",
        )  # fmt: skip
        for lo in (0.05, 0.15, 0.35)
    },
    # (c) input averaging
    "input_averaging": _ablation(
        "output averaged by active input channels", "model_kwargs={input_averaging: true}"
    ),  # fmt: skip
    # (e) only one end of the sandwich (distillation off: the teacher would not be the widest)
    "ends_max": _ablation(
        "widest + 3 random, no narrowest, no distillation",
        "sandwich_ends=max",
        "inplace_distill=false",
    ),  # fmt: skip
    "ends_min": _ablation(
        "narrowest + 3 random, no widest, no distillation",
        "sandwich_ends=min",
        "inplace_distill=false",
    ),  # fmt: skip
    "ends_none": _ablation(
        "4 random widths, neither end, no distillation",
        "sandwich_ends=none",
        "inplace_distill=false",
    ),  # fmt: skip
    # the networks trained alone got the US-Net's lr (tuned for a sum over n widths): a sweep
    **{
        f"individual_lr{lr:g}": Row(
            f"individual networks, lr {lr:g}", tuple((*run, f"lr={lr}") for run in _individual())
        )  # fmt: skip
        for lr in LRS
    },
}
GROUPS = {
    "headline": ["us_net", "individual", "n4", "no_distill_n5", "no_distill", "n2"],
    "recipe": [
        "us_net",
        "no_distill_n5",
        "n4",
        "no_distill",
        "pure_distill",
        "distill_warmup",
        "warmup_mix",
        "temperature2",
    ],
    "claims": [
        "n2",
        "n3",
        "n4",
        "us_net",
        "n6",
        "lower0.05",
        "lower0.15",
        "n4",
        "lower0.35",
        "no_distill",
        "input_averaging",
        "ends_max",
        "ends_min",
        "ends_none",
    ],
    "lr_sweep": ["individual", *(f"individual_lr{lr:g}" for lr in LRS)],
}
GROUP_TITLES = {
    "headline": "Headline: US-Net against individually trained networks (top-1 %)",
    "recipe": "Recipe steps",
    "claims": "The seed paper's other claims",
    "lr_sweep": "Learning rate of the networks trained alone (lr 0.1 is `individual`)",
}
# Paired differences the report prints under each group's table (a - b, by seed).
COMPARISONS = {
    "headline": [
        ("us_net", "individual"),
        ("n4", "individual"),
        ("us_net", "no_distill_n5"),
        ("n4", "no_distill"),
        ("us_net", "n2"),  # n2 is the default recipe with n=2
    ],
    "recipe": [
        ("us_net", "n4"),
        ("distill_warmup", "n4"),
        ("temperature2", "n4"),
        ("pure_distill", "n4"),
    ],
    "claims": [
        ("n3", "n4"),
        ("n6", "us_net"),
        ("lower0.05", "n4"),
        ("lower0.15", "n4"),
        ("lower0.35", "n4"),
        ("input_averaging", "n4"),
        ("ends_max", "no_distill"),
        ("ends_min", "no_distill"),
        ("ends_none", "no_distill"),
    ],
    "lr_sweep": [(f"individual_lr{lr:g}", "individual") for lr in LRS],
}
CLAIM_WIDTHS = (0.05, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0)
SPECTRUM_ROWS = ("us_net", "n4")
CALIBRATION_ROW = "us_net"  # claim (d) is measured on the default recipe's seed-0 US-Net
