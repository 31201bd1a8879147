"""Errors a user can fix. The library raises them; the CLI prints them in one line.

Each message says what was wrong, the value received, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable


class OodprobeError(Exception):
    """Base class of every user-fixable oodprobe error."""


class UnknownNameError(OodprobeError, ValueError):
    """A registry lookup (encoder, detector, dataset, benchmark) with a name that does not exist."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]) -> None:
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose from: {', '.join(self.choices)}")


class InvalidParameterError(OodprobeError, ValueError):
    """A parameter or an input array has a value that cannot be used."""


class DataError(OodprobeError, ValueError):
    """Images or a dataset could not be read: missing, empty, corrupt, or malformed."""


class MissingWeightsError(OodprobeError, FileNotFoundError):
    """Model weights are not on this machine (and could not be fetched)."""


class CacheError(OodprobeError, RuntimeError):
    """A feature-cache entry is damaged or incompatible."""


class DetectorFileError(OodprobeError, ValueError):
    """A saved detector file is damaged, tampered with, or of an incompatible format."""
