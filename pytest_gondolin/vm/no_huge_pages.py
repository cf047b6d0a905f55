"""QEMU started without transparent huge pages for its guest RAM (Linux).

QEMU asks for transparent huge pages on the guest's RAM (``MADV_HUGEPAGE``).
With the kernel's usual ``defrag=madvise`` a fault on such memory may stop
to compact host memory first, and a QEMU started after the host sat idle a
few seconds paid it while it loaded a snapshot. The edit-run loop is
exactly that (edit, pause, run): measured here, 4 runs each, alternating,
a 4 s pause before each, restoring the started worker took 0.49-1.19 s with
huge pages and 0.40-0.58 s without, and the first report came at 3.07-3.82
against 2.84-3.14 s; the guest ran no slower (collection 1.16-1.25 against
1.13-1.23 s).

``PR_SET_THP_DISABLE`` is a property of the process's memory, inherited by
its children and kept across ``execve``, and there is no command to set it
for a child only; so it is set on this process around the spawn (under a
lock: two threads spawning at once), then cleared. Elsewhere than Linux,
or where the call fails, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Final

__all__ = ["children_without_huge_pages"]

log = logging.getLogger(__name__)

#: linux/prctl.h
PR_SET_THP_DISABLE: Final = 41
PR_GET_THP_DISABLE: Final = 42

_lock = threading.Lock()


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), 0, 0, 0))


@contextlib.contextmanager
def children_without_huge_pages() -> Iterator[None]:
    """Processes spawned inside this block run without transparent huge pages."""
    if not sys.platform.startswith("linux"):
        yield
        return
    with _lock:
        try:
            already = _prctl(PR_GET_THP_DISABLE, 0) == 1
            if not already and _prctl(PR_SET_THP_DISABLE, 1) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
        except (OSError, AttributeError) as exc:
            log.debug("transparent huge pages left as they are: %s", exc)
            yield
            return
        try:
            yield
        finally:
            if not already:
                _prctl(PR_SET_THP_DISABLE, 0)
