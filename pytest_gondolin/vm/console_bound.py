"""Keeping each guest's serial console log to its newest part.

QEMU writes what the guest sends to its serial port into ``console.log`` in
the VM's runtime folder (a ``file`` chardev, so the tail stays readable
after QEMU dies: a panic's report quotes it). A guest can write there
without pause (~0.4 MB/s under TCG), and the runtime folder is usually RAM
(``$XDG_RUNTIME_DIR``). So one watcher thread per process looks at every
watched log each :data:`CONSOLE_CHECK_INTERVAL` and, once more than twice
:data:`CONSOLE_KEEP_BYTES` of it are stored, frees all but the last
:data:`CONSOLE_KEEP_BYTES` with ``fallocate(FALLOC_FL_PUNCH_HOLE |
FALLOC_FL_KEEP_SIZE)``. QEMU keeps writing at its own offset; the file keeps
its length, its older part reads as zeros and holds no storage, its tail is
the guest's newest output. A log never stores more than twice the cap plus
what the guest writes in one interval.

A file system without hole punching (``EOPNOTSUPP``; tmpfs, ext4, xfs and
btrfs all have it) is logged once per log and that log is left alone. The
thread runs only while there is a log to watch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

__all__ = ["CONSOLE_CHECK_INTERVAL", "CONSOLE_KEEP_BYTES", "trim", "unwatch", "watch"]

log = logging.getLogger(__name__)

#: The newest console bytes kept: a kernel panic's report with its stack
#: trace is ~8 KiB; 1 MiB also keeps a long boot or test's last messages.
CONSOLE_KEEP_BYTES = 2**20
#: How often the logs are looked at: one ``stat`` per log; at 0.4 MB/s a
#: guest writes ~0.2 MB in between.
CONSOLE_CHECK_INTERVAL = 0.5

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: Holes are punched in whole pages (a partial page is only zeroed).
_PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def trim(path: Path, keep: int = CONSOLE_KEEP_BYTES) -> int:
    """Free all but the last ``keep`` bytes of ``path`` once it stores more than ``2 * keep``.

    Returns the file offset up to which it is now a hole (0: nothing
    freed). Raises OSError (``EOPNOTSUPP`` where holes cannot be punched;
    ``ENOENT`` once the log is gone).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 <= 2 * keep:
            return 0
        end = (st.st_size - keep) // _PAGE * _PAGE
        if end <= 0:
            return 0
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, end) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"punching a hole in {path}: {os.strerror(code)}")
        return end
    finally:
        os.close(fd)


class _Watcher:
    """The watched logs (path -> bytes kept) and the thread that trims them."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._logs: dict[Path, int] = {}
        self._thread: threading.Thread | None = None

    def watch(self, path: Path, keep: int) -> None:
        with self._lock:
            self._logs[path] = keep
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gondolin-console-bound", daemon=True
                )
                self._thread.start()

    def unwatch(self, path: Path) -> None:
        with self._lock:
            self._logs.pop(path, None)
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait(CONSOLE_CHECK_INTERVAL)
                if not self._logs:
                    self._thread = None
                    return
                logs = list(self._logs.items())
            for path, keep in logs:
                try:
                    trim(path, keep)
                except FileNotFoundError:
                    pass  # not created yet (QEMU starting), or its folder is gone
                except OSError as exc:
                    log.warning("console log %s is not bounded: %s", path, exc)
                    self.unwatch(path)


_WATCHER = _Watcher()


def watch(path: Path, keep: int | None = None) -> None:
    """Keep ``path`` (a console log QEMU writes) to its last ``keep`` bytes until :func:`unwatch`."""
    _WATCHER.watch(path, CONSOLE_KEEP_BYTES if keep is None else keep)


def unwatch(path: Path) -> None:
    """Stop bounding ``path`` (idempotent)."""
    _WATCHER.unwatch(path)
