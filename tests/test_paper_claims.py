"""benchmarks/paper_claims.py: every row is a valid `usnet train` configuration (a typo in a row
would otherwise surface 20 minutes into a benchmark run), and the ablations stay what was measured."""

from __future__ import annotations

import contextlib

import pytest
from usnet_testing import load_benchmark

from usnet.train.config import load_config

paper_claims = load_benchmark("paper_claims")
claims_rows = load_benchmark("claims_rows")


@pytest.mark.parametrize("name", list(claims_rows.ROWS))
def test_every_run_of_every_row_is_a_valid_config(name):
    row = claims_rows.ROWS[name]
    for overrides in row.runs:
        config = load_config(paper_claims.CONFIG, [*overrides, "seed=0", "epochs=4",
                                                   f"eval.widths={row.eval_widths}"])  # fmt: skip
        if name == "us_net":
            assert (
                config.num_widths == 5 and config.distill_label_weight == 0.5
            )  # the default recipe
        elif name.startswith("individual_lr"):
            assert config.mode == "individual" and config.lr in claims_rows.LRS
        elif name not in ("individual", "n2", "n3", "n6", "no_distill_n5"):
            assert config.num_widths == 4  # ablations of the paper's sandwich, as measured


def test_groups_name_rows():
    for group in claims_rows.GROUPS.values():
        assert set(group) <= set(claims_rows.ROWS)


def test_a_finished_run_trained_otherwise_is_refused(tmp_path):
    """A result is reused only while its row still describes it (by the run's own saved config)."""
    import usnet
    from usnet.train.trainer import FINAL

    def finished(name: str, overrides: list[str]) -> dict:
        config = load_config(paper_claims.CONFIG, overrides)
        model = usnet.models.create_model(
            "us_convnet", num_classes=10, in_channels=1, small_input=True
        )
        (tmp_path / name).mkdir()
        usnet.save(model, tmp_path / name / FINAL, extra={"config": config.to_dict()})
        return config.to_dict()

    common = ["seed=0", "epochs=4"]
    expected = load_config(paper_claims.CONFIG, common).to_dict()  # row us_net today
    finished("n4_run", [*common, "num_widths=4"])
    with pytest.raises(
        RuntimeError, match=r"other settings than row 'us_net' now has \(num_widths\)"
    ):
        paper_claims.check_trained_as(tmp_path / "n4_run", expected, "us_net")
    finished("other_eval", [*common, "eval.widths=0.25:1.0:0.25", "log_every=7"])
    paper_claims.check_trained_as(tmp_path / "other_eval", expected, "us_net")  # evaluation only
    alone = lambda w: [*common, "mode=individual", f"width={w}"]  # noqa: E731
    finished("alone", [*alone(0.5), "num_widths=4", "distill_label_weight=0.0"])  # unused by it
    for width, refused in ((0.5, False), (0.75, True)):
        expected = load_config(paper_claims.CONFIG, alone(width)).to_dict()
        with (
            pytest.raises(RuntimeError, match=r"\(width\)") if refused else contextlib.nullcontext()
        ):
            paper_claims.check_trained_as(tmp_path / "alone", expected, "individual")
