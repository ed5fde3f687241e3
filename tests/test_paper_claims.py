"""benchmarks/paper_claims.py: every row is a valid `usnet train` configuration (a typo in a row
would otherwise surface 20 minutes into a benchmark run), and the ablations stay what was measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from usnet.config import load_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_claims.py"
spec = importlib.util.spec_from_file_location("paper_claims", SCRIPT)
paper_claims = importlib.util.module_from_spec(spec)
sys.modules.setdefault("paper_claims", paper_claims)  # dataclasses look their module up
spec.loader.exec_module(paper_claims)


@pytest.mark.parametrize("name", list(paper_claims.ROWS))
def test_every_run_of_every_row_is_a_valid_config(name):
    row = paper_claims.ROWS[name]
    for overrides in row.runs:
        config = load_config(paper_claims.CONFIG, [*overrides, "seed=0", "epochs=4",
                                                   f"eval.widths={row.eval_widths}"])  # fmt: skip
        if name == "us_net":
            assert config.num_widths == 5 and config.distill_label_weight == 0.5  # the default recipe
        elif name not in ("individual", "n2", "n3", "n6", "no_distill_n5"):
            assert config.num_widths == 4  # ablations of the paper's sandwich, as measured


def test_groups_name_rows():
    for group in paper_claims.GROUPS.values():
        assert set(group) <= set(paper_claims.ROWS)
