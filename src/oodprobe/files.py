"""Atomic file writes: the one home of "write a temporary file beside it, then rename it over".

A failed or interrupted write never leaves a partial file in place of a good one, and never a
temporary file behind. Used by the feature cache, detector files, score CSVs and the report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "commit_temporary", "temporary_beside", "write_text_atomic"]


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, 'w')`` would give: the old file's, else 0666 minus the umask.

    ``mkstemp`` makes private (0600) files; a replaced file keeps its mode, a new one gets the
    ordinary one, so cache entries and results stay shareable.
    """
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temporary_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder (created if missing), for a later commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def commit_temporary(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it ``path``'s mode, and rename it over ``path`` (atomic on POSIX)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, _new_file_mode(path))
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        commit_temporary(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, line ends as given) to ``path`` atomically; return the path."""

    def write(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return atomic_write(path, write)
