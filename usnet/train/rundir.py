"""The run directory of ``usnet train``: who owns it, what resumes from it, its metrics log.

A run directory is owned by one process at a time: :class:`RunLock` creates ``.usnet.lock``
holding the owner's pid and host (atomically: a complete file or none). A second ``usnet train``
into the same ``--out`` is refused, naming the owner; a lock left by a killed run (its pid no
longer exists on this host) is recognized as stale and taken over, and the hidden temporary
files the killed run left behind are removed.

Layout: ``checkpoint.pt`` (latest epoch, with the trainer state that ``--resume`` reads),
``model.pt`` (the calibrated final model), ``metrics.jsonl`` (one JSON record per line),
``spectrum.csv``/``.json``/``.png`` (:mod:`usnet.deploy.spectrum`) and ``tensorboard/``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import RunDirectoryError, UsnetValueError
from ..files import atomic_write_bytes, remove_stale_temporaries

CHECKPOINT = "checkpoint.pt"  # latest epoch, with trainer state: what --resume reads
FINAL = "model.pt"  # calibrated final model
METRICS = "metrics.jsonl"
LOCK = ".usnet.lock"


class RunLock:
    """Ownership of a run directory by this process (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK
        self.held = False

    def acquire(self) -> list[str]:
        """Take the lock or raise :class:`RunDirectoryError` naming its owner. Returns notes for
        the log (a stale lock taken over, temporary files removed)."""
        notes: list[str] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _owner_record()
        for _ in range(3):
            # not named like atomic_write_bytes' temporaries: the owner's clean-up removes those
            tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.new")
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock exists
                self.held = True
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            if self.held:
                removed = remove_stale_temporaries(self.path.parent)
                if removed:
                    notes.append(
                        f"removed {len(removed)} temporary files left by an interrupted write"
                    )
                return notes
            owner = _read_owner(self.path)
            if (
                owner is not None
                and owner.get("pid") == me["pid"]
                and owner.get("host") == me["host"]
            ):
                # This process owns it already (a Trainer built to resume, then another): the
                # lock guards against other processes; within one, runs follow each other.
                self.held = True
                return notes
            if owner is None or _is_stale(owner, me["host"]):
                self.path.unlink(missing_ok=True)
                what = f"pid {owner['pid']}" if owner else "an unreadable owner"
                notes.append(
                    f"took over the stale lock of {what} (no such process): an earlier run was killed"
                )
                continue
            raise RunDirectoryError(
                f"{str(self.path.parent)!r} is in use by another usnet run (pid {owner.get('pid')} "
                f"on {owner.get('host')}, since {owner.get('started')}); wait for it to finish or "
                f"choose another --out (if that process is gone, delete {str(self.path)!r})"
            )
        raise RunDirectoryError(
            f"could not take the lock {str(self.path)!r}; another run keeps taking it"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = _read_owner(self.path)
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _owner_record() -> dict[str, Any]:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started}


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _is_stale(owner: dict[str, Any], host: str) -> bool:
    """Whether the owner is known to be gone: a pid that no longer exists on this host (another
    host's processes cannot be seen, so its lock is never taken over)."""
    if owner.get("host") != host:
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    return False


# --- what the directory holds ---------------------------------------------------------------------
def holds_run(out_dir: str | os.PathLike) -> bool:
    out = Path(out_dir)
    return (out / CHECKPOINT).exists() or (out / FINAL).exists()


def resumable_checkpoint(out_dir: str | os.PathLike) -> dict:
    """The checkpoint that ``--resume`` continues in ``out_dir`` (with config and trainer state)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {str(out_dir)!r}")
    payload = ckpt.read_checkpoint(path)
    extra = payload.get("extra", {})
    if extra.get("config") is None or "trainer" not in extra:
        raise UsnetValueError(f"{str(path)!r} holds no trainer state to resume from")
    return payload


def append_metric(out_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to ``metrics.jsonl`` (a line cut off by a kill is skipped on reading)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out_dir: str | os.PathLike, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run continues from its checkpoint's step;
    ``-1`` empties the log), dropping lines cut off by an interruption."""
    path = Path(out_dir) / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
