"""Tails of logs: the last bytes of a log file, the last lines of a text.

The one place that cuts logs down to what an error message, a report
section or a failure artifact quotes (QEMU's stderr, the guest console, a
build log, a worker's stderr). :func:`tail_lines` is defined with the error
classes in :mod:`pytest_gondolin.guest.errors` (the guest has those, and
their messages quote tails) and re-exported here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pytest_gondolin.guest.errors import tail_lines

__all__ = ["console_excerpt", "read_tail", "read_tail_text", "tail_lines"]


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


# The lines a dying guest kernel prints first, before the stack trace that
# usually pushes them out of a short tail.
_KERNEL_CAUSE = re.compile(r"Kernel panic - |Out of memory: |BUG: |Oops: |general protection fault")


def console_excerpt(console: str, limit: int) -> str:
    """The last ``limit`` characters of guest console text ``console``, cause kept.

    A kernel panic's own line comes before its stack trace; when the cut
    would drop it, the last such line is put in front, then ``[...]``, so a
    report always names why the guest died.
    """
    if limit <= 0:
        return ""
    tail = console[-limit:]
    if len(console) <= limit:
        return tail
    head = console[: len(console) - limit]
    causes = [m.start() for m in _KERNEL_CAUSE.finditer(head)]
    if not causes or _KERNEL_CAUSE.search(tail):
        return tail
    start = head.rfind("\n", 0, causes[-1]) + 1
    end = head.find("\n", causes[-1])
    line = head[start : end if end != -1 else len(head)].rstrip("\r")
    return f"{line}\n[...]\n{tail}"
