"""File transfers the agent serves: ``write_open`` / ``write_chunk`` / ``write_close`` and ``read``.

A write goes to a temp file in the target's directory, renamed over the
target on close, so readers never see a partial file (rename(2) is atomic
within a filesystem). The host gets exactly one reply per write: ``ok`` on
close, or one ``error`` at the first failure, after which the write's later
chunks and close are dropped silently. A read streams ``data`` frames, then
``ok``, from its own thread. An ``error`` carries the errno and the OS's
reason without a path: the host names the path its caller gave, and the
agent's own (a write's temp file) would only mislead. Standard library and
:mod:`pytest_gondolin.guest` only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
from dataclasses import dataclass

from pytest_gondolin.guest.agentio import (
    FrameWriter,
    close_quietly,
    describe,
    errno_of,
    write_all,
)
from pytest_gondolin.guest.protocol import CHUNK, Frame

#: Concurrent unfinished write_file transfers (each holds an open temp file).
MAX_WRITES = 64


def _reason(exc: BaseException) -> str:
    """The message of an ``error`` answer to a file request: the OS's reason, no path."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return describe(exc)


@dataclass
class _Write:
    fd: int
    tmp: str
    path: str


class Files:
    """The open writes, by request id, and the file handlers."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self._writes: dict[int, _Write] = {}
        self._failed_writes: set[int] = set()

    def abort_writes(self) -> None:
        """Drop every unfinished write (its temp file is removed, the target untouched)."""
        for w in self._writes.values():
            close_quietly(w.fd)
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
        self._writes.clear()
        self._failed_writes.clear()

    def _fail_write(self, frame: Frame, exc: BaseException) -> None:
        w = self._writes.pop(frame.id, None)
        if w is not None:
            close_quietly(w.fd)
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
        # Remember the id so later chunks and the close are dropped silently:
        # the host gets exactly one reply per write.
        self._failed_writes.add(frame.id)
        self.writer.error(frame.id, _reason(exc), errno_of(exc))

    def write_open(self, frame: Frame) -> None:
        """``write_open``: create the temp file (no reply unless it fails)."""
        if frame.id in self._writes or frame.id in self._failed_writes:
            raise OSError(errno.EEXIST, f"write id {frame.id} is already open")
        if len(self._writes) >= MAX_WRITES:
            self._fail_write(frame, OSError(errno.EMFILE, "too many concurrent file writes"))
            return
        path: str = frame.header["path"]
        try:
            parent, name = os.path.split(path)
            if not name:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            try:
                os.makedirs(parent, exist_ok=True)
            except FileExistsError as exc:
                # makedirs reports a file in the way as EEXIST; open(2) would say ENOTDIR.
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent) from exc
            # A temp file in the same directory, renamed on close: readers never
            # see a partial file (rename(2) is atomic within a filesystem).
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name[:100]}.", suffix=".tmp")
            try:
                os.fchmod(fd, frame.header["mode"])
            except OSError:
                close_quietly(fd)
                os.unlink(tmp)
                raise
        except OSError as exc:
            self._fail_write(frame, exc)
            return
        self._writes[frame.id] = _Write(fd, tmp, path)

    def write_chunk(self, frame: Frame) -> None:
        """``write_chunk``: append the payload (no reply unless it fails)."""
        if frame.id in self._failed_writes:
            return
        w = self._writes.get(frame.id)
        if w is None:
            self._fail_write(frame, OSError(errno.EBADF, f"no open write with id {frame.id}"))
            return
        try:
            write_all(w.fd, frame.payload)
        except OSError as exc:
            self._fail_write(frame, exc)

    def write_close(self, frame: Frame) -> None:
        """``write_close``: rename the temp file over the target; reply ``ok`` or ``error``."""
        if frame.id in self._failed_writes:
            self._failed_writes.discard(frame.id)
            return
        w = self._writes.pop(frame.id, None)
        if w is None:
            raise OSError(errno.EBADF, f"no open write with id {frame.id}")
        try:
            os.close(w.fd)
            os.replace(w.tmp, w.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
            self.writer.error(frame.id, _reason(exc), errno_of(exc))
            return
        self.writer.send({"t": "ok", "id": frame.id})

    def read(self, frame: Frame) -> None:
        """``read``: stream the file from a thread of its own."""
        # In a thread: a large file must not stall the dispatch of other requests.
        threading.Thread(
            target=self._read_file,
            args=(frame.id, frame.header["path"], frame.header["max_size"]),
            name=f"read-{frame.id}",
            daemon=True,
        ).start()

    def _read_file(self, req_id: int, path: str, max_size: int) -> None:
        try:
            # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", path)
                too_big = OSError(errno.EFBIG, f"file larger than max_size ({max_size})", path)
                if st.st_size > max_size:
                    raise too_big
                total = 0
                while chunk := os.read(fd, CHUNK):
                    total += len(chunk)
                    if total > max_size:
                        raise too_big
                    self.writer.send({"t": "data", "id": req_id}, chunk)
            finally:
                os.close(fd)
        except Exception as exc:
            self.writer.error(req_id, _reason(exc), errno_of(exc))
            return
        self.writer.send({"t": "ok", "id": req_id})
