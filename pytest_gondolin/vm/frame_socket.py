"""A connected stream socket carrying whole frames: the threaded I/O under the agent channel.

:class:`FrameSocket` knows nothing of the protocol. It sends a frame whole
or not at all within a deadline (a frame cut short corrupts the stream, so
that counts as losing the socket), and runs one daemon thread that hands
every chunk it receives to ``on_data`` and reports EOF or a failure, once,
to ``on_lost``. :class:`~pytest_gondolin.vm.channel.AgentChannel` supplies
both callbacks and does all the protocol work under its own lock.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from pytest_gondolin.errors import AgentTimeout, VMError

__all__ = ["CLOSE_JOIN_TIMEOUT", "RECV_SIZE", "SEND_POLL_SLICE", "FrameSocket"]

log = logging.getLogger(__name__)

#: How long close() waits for the reader thread to notice the shutdown.
CLOSE_JOIN_TIMEOUT = 5.0
#: Bytes per recv().
RECV_SIZE = 256 << 10
#: Longest single poll() while sending without a deadline, so close() is noticed.
SEND_POLL_SLICE = 1.0


class FrameSocket:
    """Owns ``sock``: a reader thread feeding ``on_data``, and deadline-bound whole-frame sends.

    ``on_data(chunk)`` runs on the reader thread and returns False to stop
    reading (the owner closed). ``on_lost(error)`` is called when the socket
    hits EOF, fails, or a send is cut mid-frame; the owner makes it
    idempotent. ``check_alive()`` raises when the owner is closed or lost,
    so a blocked send gives up.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        on_data: Callable[[bytes], bool],
        on_lost: Callable[[VMError], None],
        check_alive: Callable[[], None],
    ) -> None:
        self.name = name
        self._on_data = on_data
        self._on_lost = on_lost
        self._check_alive = check_alive
        sock.setblocking(True)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def send(self, data: bytes, deadline: float | None) -> None:
        """Send one whole frame, or nothing, or report the socket lost (a partial frame).

        Raises:
            AgentTimeout: the deadline passed before (or while) sending.
            VMError: the owner is closed or lost, or the write failed.
        """
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise AgentTimeout(f"{self.name}: deadline passed before sending")
        if not self._send_lock.acquire(timeout=-1 if remaining is None else remaining):
            raise AgentTimeout(f"{self.name}: channel busy until the deadline")
        try:
            self._check_alive()
            view = memoryview(data)
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLOUT)
            while view:
                try:
                    n = self._sock.send(view, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        if len(view) < len(data):
                            self._on_lost(
                                VMError(f"{self.name}: send timed out mid-frame; stream corrupt")
                            )
                        raise AgentTimeout(f"{self.name}: guest not reading the channel") from None
                    slice_s = (
                        SEND_POLL_SLICE if remaining is None else min(remaining, SEND_POLL_SLICE)
                    )
                    poller.poll(slice_s * 1000)
                    self._check_alive()
                    continue
                except OSError as exc:
                    raise VMError(f"{self.name}: channel write failed: {exc}") from exc
                view = view[n:]
        finally:
            self._send_lock.release()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %d bytes: %r", self.name, len(data), data[8:200])

    def close(self) -> None:
        """Shut the socket down, let the reader thread end, close the socket."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(CLOSE_JOIN_TIMEOUT)
        with self._send_lock:
            self._sock.close()

    def _read_loop(self) -> None:
        error: VMError
        try:
            while True:
                try:
                    data = self._sock.recv(RECV_SIZE)
                except OSError as exc:
                    error = VMError(f"{self.name}: agent channel read failed: {exc}")
                    break
                if not data:
                    error = VMError(f"{self.name}: agent channel closed by the guest (EOF)")
                    break
                if not self._on_data(data):
                    return
        except Exception as exc:  # the reader must never die silently
            log.exception("%s: reader thread failed", self.name)
            error = VMError(f"{self.name}: agent channel reader failed: {exc!r}")
        self._on_lost(error)
