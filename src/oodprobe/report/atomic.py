"""Atomic file writing: a failed write never leaves a partial file in place of a good one.

The content goes to a temporary file in the destination's folder (same file system, so the
final ``os.replace`` is atomic on POSIX and Windows); only a complete file replaces the old one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_text_atomic"]


def _umask() -> int:
    # os.umask can only be read by setting it; restore it at once
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move the finished file to ``path`` atomically.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed. The parent folder is created if needed. The file gets the usual
    permissions of a new file (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    The temporary name keeps the destination's suffix, for writers that check it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends as given) to ``path`` atomically."""

    def write(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return atomic_write(path, write)
