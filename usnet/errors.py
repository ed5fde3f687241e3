"""usnet's own errors: one base class, each also the built-in type that fits.

Code that catches ``ValueError`` keeps working; the command line turns :class:`UsnetError` (and
``OSError`` and argument errors) into one-line messages and lets every other exception, a real
failure, keep its traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "RunDirectoryError",
    "TrainingError",
    "UncalibratedWidthError",
    "UsnetError",
    "UsnetTypeError",
    "UsnetValueError",
]


class UsnetError(Exception):
    """Base class of every error usnet raises on purpose (bad input, a state it refuses)."""


class UsnetValueError(UsnetError, ValueError):
    """A value given to usnet (argument, file content, width, size) is invalid."""


class UsnetTypeError(UsnetError, TypeError):
    """An argument given to usnet has the wrong type (a model that is not slimmable, ...)."""


class DataError(UsnetValueError):
    """A dataset cannot be used as given (corrupt file, too few classes, shape mismatch)."""


class RunDirectoryError(UsnetError, RuntimeError):
    """A run directory is in use by another process, or holds something a command refuses."""


class TrainingError(UsnetError, RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message says where and what is kept."""


class ConfigError(UsnetValueError):
    """A configuration key or value is invalid; the message names it and the valid choices."""


class UncalibratedWidthError(UsnetError, RuntimeError):
    """Eval-mode forward at a width whose BatchNorm statistics were never calibrated."""
