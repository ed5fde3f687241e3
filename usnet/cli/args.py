"""Argument types of the command line (each names the option's valid values)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..channels import parse_widths


def parse_input_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 4 or min(size) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid input size {text!r}; expected N,C,H,W such as 1,3,224,224"
        )
    return size


def whole_number(least: int):
    """An argparse type: a whole number >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value

    return parse


def widths_arg(text: str) -> list[float]:
    try:
        return parse_widths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --- deployment: export, select, search -------------------------------------------------------
def width_spec(text: str):
    """A width: a number, a JSON object {group: multiplier}, or a JSON file holding ``"width"``
    (what ``usnet search --out`` writes)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
    except (OSError, ValueError):
        value = None
    if isinstance(value, dict) and "width" in value:
        value = value["width"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and value:
        return value
    raise argparse.ArgumentTypeError(
        f"invalid width {text!r}; expected a number (0.5), a JSON object "
        '({"group": 0.5, ...}) or a JSON file with a "width" entry (usnet search --out)'
    )


def count_arg(text: str) -> int:
    from ..deploy.select import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
