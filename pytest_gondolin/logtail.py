"""Tails of logs: the last bytes of a log file, the last lines of a text.

The one place that cuts logs down to what an error message, a report
section or a failure artifact quotes (QEMU's stderr, the guest console, a
build log, a worker's stderr). :func:`tail_lines` is defined with the error
classes in :mod:`pytest_gondolin.guest.errors` (the guest has those, and
their messages quote tails) and re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_gondolin.guest.errors import tail_lines

__all__ = ["read_tail", "read_tail_text", "tail_lines"]


def read_tail(path: Path | None, limit: int) -> bytes:
    """The last ``limit`` bytes of file ``path``; ``b""`` if there is no path or it cannot be read.

    Never raises for a missing or unreadable file: a tail is quoted while
    something else already went wrong, and must not hide that.
    """
    if path is None or limit <= 0:
        return b""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read(limit)
    except OSError:
        return b""


def read_tail_text(path: Path | None, limit: int) -> str:
    """:func:`read_tail`, decoded as UTF-8 with replacement (a cut may split a character)."""
    return read_tail(path, limit).decode("utf-8", errors="replace")
