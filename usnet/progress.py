"""Progress bars of long steps (tqdm, on stderr), or a bar that does nothing when quiet, so that
callers never branch on whether a bar is shown."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["NullBar", "progress_bar", "step_bar"]


class NullBar:
    """A bar that shows nothing: the methods of a tqdm bar that usnet calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, show: bool, desc: str = "calibrating", unit: str = "batch"):
    """A transient tqdm bar, or a :class:`NullBar` when not shown or there is nothing to do."""
    if not show or total == 0:
        return NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def step_bar(total: int, desc: str, show: bool | None):
    """The training epoch's bar: a :class:`NullBar` when ``show`` is False; on a terminal a
    transient bar, else (a log file) one line every 30 s that stays."""
    if show is False:
        return NullBar()
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="step", leave=tty is False, mininterval=1 if tty else 30
    )
