"""Report files are written atomically: a failed write never leaves a partial file in place.

The mechanism has one home, :func:`oodprobe.cache.atomic_write` (temporary file in the
destination's folder, fsync, ``os.replace``; ordinary ``0o666``-less-umask permissions); this
module only adds the text convenience the report writers use.
"""

from __future__ import annotations

import os
from pathlib import Path

from oodprobe.cache import atomic_write

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, line ends as given) to ``path`` atomically; return the path.

    If writing fails, ``path`` keeps its previous content and no temporary file is left.
    """
    path = Path(path)

    def write(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)
    return path
