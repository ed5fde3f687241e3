"""Checkpoints written before the package redesign (tests/fixtures/*_d0c15b1.pt, made by
tests/fixtures/make_checkpoints.py at commit d0c15b1) load with identical outputs: the converted
model pickles the old class paths (usnet.layers, usnet.params, usnet.timm_layers, ...)."""

import pickletools
import zipfile
from pathlib import Path

import pytest
import torch

import usnet
from usnet.checkpoint import MOVED_MODULES

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = torch.load(FIXTURES / "expected_d0c15b1.pt", weights_only=True)


def _pickled_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "STACK_GLOBAL") and isinstance(arg, str):
            names.add(arg.split(" ")[0])
    return names


def test_fixture_pickles_the_old_module_paths():
    # The test below means something only while the fixture holds moved paths.
    old = {m for m in _pickled_globals(FIXTURES / "converted_d0c15b1.pt") if m in MOVED_MODULES}
    assert {"usnet.layers", "usnet.params", "usnet.timm_layers", "usnet.bn_stats"} <= old


@pytest.mark.parametrize("name", ["converted", "zoo"])
def test_old_checkpoint_loads_with_identical_outputs(name):
    model = usnet.load(FIXTURES / f"{name}_d0c15b1.pt")
    assert usnet.get_width(model) == 0.5  # the saved width
    x = EXPECTED["input" if name == "converted" else "zoo_input"]
    model.eval()
    for w in (0.25, 0.5, 1.0):
        with usnet.width(model, w), torch.no_grad():
            assert torch.equal(model(x), EXPECTED[f"{name}@{w}"]), w


def test_old_converted_checkpoint_holds_todays_classes():
    model = usnet.load(FIXTURES / "converted_d0c15b1.pt")
    modules = {type(m).__module__ for m in model.modules()}
    assert not modules & MOVED_MODULES.keys()
    assert type(model.conv).__module__ == "usnet.nn.conv"
    assert type(model.ln).__module__ == "usnet.plugins.timm"
