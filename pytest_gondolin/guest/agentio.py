"""The agent's low-level I/O: whole writes, quiet closes, and its frame writer.

Shared by every part of the agent (:mod:`pytest_gondolin.guest.agent`,
:mod:`~pytest_gondolin.guest.execs`, :mod:`~pytest_gondolin.guest.files`).
Standard library and :mod:`pytest_gondolin.guest.protocol` only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from pytest_gondolin.guest.protocol import FrameError, encode_frame

log = logging.getLogger(__name__)

#: Longest error message sent (keeps the header far below MAX_HEADER).
MAX_MESSAGE = 2000


def errno_of(exc: BaseException) -> int | None:
    """The errno an ``error`` reply carries for ``exc`` (``None`` if it is no OSError)."""
    return exc.errno if isinstance(exc, OSError) and exc.errno else None


def describe(exc: BaseException) -> str:
    """``exc`` as the message of an ``error`` reply."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (raises OSError)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def close_quietly(*fds: int) -> None:
    """Close each of ``fds`` that is not negative, ignoring errors."""
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class FrameWriter:
    """The agent's end of the control channel: serialised frame writes."""

    def __init__(self, fd: int, *, device: bool) -> None:
        self.fd = fd
        self.device = device
        self._lock = threading.Lock()
        #: Set when a write failed in --fd mode (the host is gone); the agent exits.
        self.failed = threading.Event()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Send one frame atomically; return False (and log) if it could not be sent."""
        try:
            data = encode_frame(header, payload)
        except FrameError as exc:
            log.error("cannot encode %s: %s", header.get("t"), exc)
            return False
        with self._lock:
            try:
                write_all(self.fd, data)
            except OSError as exc:
                log.warning("channel write failed: %s", exc)
                if not self.device:
                    self.failed.set()
                return False
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s (+%d bytes)", header, len(payload))
        return True

    def error(self, req_id: int, message: str, err: int | None = None) -> None:
        """Send an ``error`` reply to request ``req_id``."""
        self.send({"t": "error", "id": req_id, "message": message[:MAX_MESSAGE], "errno": err})
