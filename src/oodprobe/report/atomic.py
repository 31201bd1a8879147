"""Report files are written atomically; the mechanism's one home is :mod:`oodprobe.files`."""

from oodprobe.files import write_text_atomic

__all__ = ["write_text_atomic"]
