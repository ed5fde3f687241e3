"""Files a user keeps: written whole or not at all, never overwritten by surprise.

* :func:`atomic_write_bytes` writes to a hidden temporary file in the same directory and renames
  it over the target, so readers see the old file or the new one, never a part (a full disk or a
  kill leaves the old file as it was).
* :func:`check_output` runs before a command does any work: an output that cannot be written is
  reported first, not after an hour of search; an existing file is replaced only with
  ``force`` or when it is the command's own earlier output (which the caller recognizes).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UsnetValueError

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        # mkstemp makes 0600 files: keep the replaced file's mode, else honour the umask.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the hidden temporary files that :func:`atomic_write_bytes` left in ``directory``
    when its process was killed mid-write; call it only where no other process writes (a run
    directory whose lock this process holds). Returns the removed paths."""
    removed = []
    now = time.time()
    for path in Path(directory).glob(f".*{TMP_SUFFIX}"):
        try:
            if path.is_file() and now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, with the reason, if ``path`` cannot be written as a file (missing permissions,
    a directory in its place, a file where a parent directory should be)."""
    path = Path(path)
    if path.is_dir():
        raise UsnetValueError(f"{what} {str(path)!r} is a directory; name the file to write")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the directories below it are created on writing
    if not parent.is_dir():
        raise UsnetValueError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsnetValueError(
            f"{what} {str(path)!r} cannot be written (no write permission in {str(parent)!r}); "
            "choose a location you can write to"
        )
    return path


def check_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    option: str = "--out",
    own: Callable[[Path], str | None] | None = None,
) -> str | None:
    """Check, before any work, that ``path`` may be written by a command.

    An existing file is refused unless ``force`` or ``own(path)`` recognizes it as this command's
    own earlier output (``own`` returns a description of it, e.g. "an earlier calibration of these
    weights", else None). Returns what is being replaced (for the command to say), or None.
    """
    path = check_writable(path, option)
    if not path.exists():
        return None
    if force:
        return "an existing file (--force)"
    described = own(path) if own is not None else None
    if described:
        return described
    raise UsnetValueError(
        f"{option} {str(path)!r} already exists and is not this command's earlier output; "
        "pass --force to overwrite it or choose another path (nothing was written)"
    )
