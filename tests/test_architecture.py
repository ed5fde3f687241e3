"""The package's architecture: the import-linter contracts of pyproject.toml hold, and each
kind of violation they exist for (an arrow against the rooms' order, a cycle inside a room) is
caught; no module grows past about 800 lines; no private name crosses a module boundary."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "usnet"
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the project's own contracts."""
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def copy_of_the_package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arch")
    shutil.copytree(PACKAGE, root / "usnet", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        # deploy/ must never import train/
        ("deploy/cost.py", "from ..train import sandwich", "Rooms, top to bottom"),
        # nn/ imports only the base
        ("nn/base.py", "from .. import state", "Rooms, top to bottom"),
        # nothing imports cli
        ("train/trainer.py", "from .. import cli", "Rooms, top to bottom"),
        # the converter's tables must not import its graph walk
        ("convert/registry.py", "from . import graph", "Converter"),
        # a cycle inside a room: artifact <-> select
        ("deploy/artifact.py", "from . import select", "No import cycle"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(copy_of_the_package, module, line, contract):
    path = copy_of_the_package / "usnet" / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # noqa\n")
        result = lint_imports(copy_of_the_package)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) >= 1 and any(contract in ln for ln in broken), result.stdout


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_past_about_800_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 820
    }
    assert not long


def test_no_private_name_is_imported_from_another_module():
    crossings = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("usnet")
            ):
                crossings += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]  # fmt: skip
    assert not crossings
