"""The Unix socket QEMU's ``-netdev stream`` connects to, seen from the driver's loop.

This module owns :class:`QemuSocket`: the listening socket (it exists
before QEMU starts), accepting its one peer (a second connection is
refused: QEMU is the only client), reading frames within a per-wake-up
budget, and writing them as fast as the peer drains them (write interest
in the loop's selector only while frames wait). Frame codec and buffers
are :class:`~.stack.peer.PeerLink`'s; the loop is the
:class:`~.driver.NetworkDriver`'s, and so are threads and timeouts.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.stack.link import LinkError
from pytest_gondolin.netpolicy.stack.peer import PeerLink

__all__ = ["QemuSocket"]

log = logging.getLogger(__name__)

#: A listen backlog of one: QEMU is the only client, anything else is refused.
_BACKLOG: Final = 1


class QemuSocket:
    """Listen on ``path`` and serve its one peer from the loop thread.

    The socket is listening (and registered in ``selector`` as
    ``"listen"``; the peer as ``"peer"``) when the constructor returns;
    raises :class:`NetworkPolicyError` if it cannot be created. A corrupt
    frame stream (:class:`~.stack.link.LinkError`) disconnects the peer, as
    QEMU itself does.
    """

    def __init__(
        self,
        path: Path,
        selector: selectors.BaseSelector,
        *,
        limits: DriverLimits,
        counters: Counter[str],
        name: str,
    ) -> None:
        self.path = path
        self.name = name
        self.limits = limits
        self.connected = threading.Event()
        self.peer: PeerLink | None = None
        self._selector = selector
        self._counters = counters
        self._writing = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._listener.bind(str(path))
            self._listener.listen(_BACKLOG)
            self._listener.setblocking(False)
        except OSError as exc:
            self._listener.close()
            raise NetworkPolicyError(
                f"cannot listen for the guest network on {path}: {exc}"
            ) from exc
        selector.register(self._listener, selectors.EVENT_READ, "listen")

    def accept(self) -> None:
        """Take QEMU's connection (the selector saw the listener readable)."""
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.peer is not None:
            # QEMU is the only peer; a second connection gets nothing.
            log.warning("%s: refusing a second connection to the network socket", self.name)
            conn.close()
            return
        self.peer = PeerLink(
            conn,
            read_chunk=self.limits.read_chunk,
            max_tx_bytes=self.limits.max_tx_bytes,
            counters=self._counters,
        )
        self._writing = False
        self._selector.register(conn, selectors.EVENT_READ, "peer")
        self.connected.set()
        self._counters["peer-connects"] += 1
        log.debug("%s: guest network connected", self.name)

    def drop(self, why: str) -> None:
        """Disconnect the peer (if any), saying ``why`` in the log."""
        peer = self.peer
        if peer is None:
            return
        log.info("%s: guest network link closed: %s", self.name, why)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        peer.close()
        self.peer = None
        self._writing = False
        self.connected.clear()

    def read(self, on_frames: Callable[[list[bytes], float], None]) -> None:
        """Read up to ``max_read_per_wake`` bytes; ``on_frames(frames, now)`` per chunk."""
        budget = self.limits.max_read_per_wake
        while self.peer is not None and budget > 0:
            try:
                frames = self.peer.recv_frames()
            except LinkError as exc:
                self._counters["link-errors"] += 1
                self.drop(exc.reason)
                return
            if frames is None:
                return
            budget -= self.limits.read_chunk
            on_frames(frames, time.monotonic())

    def queue(self, frames: list[bytes]) -> None:
        """Queue ``frames`` for the peer (counted and dropped without one)."""
        if self.peer is None:
            if frames:
                self._counters["tx-dropped-no-peer"] += len(frames)
            return
        self.peer.queue(frames)

    @property
    def pending_tx(self) -> int:
        """Bytes queued for the peer and not written yet (0 without a peer)."""
        return self.peer.pending_tx if self.peer is not None else 0

    def flush(self) -> None:
        """Write what the peer takes now; watch for writability only while bytes wait."""
        peer = self.peer
        if peer is None:
            return
        try:
            peer.flush()
        except LinkError as exc:
            self.drop(exc.reason)
            return
        want_write = peer.pending_tx > 0
        if want_write != self._writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(peer.sock, events, "peer")
            self._writing = want_write

    def discard_stale(self) -> int:
        """Forget frames read or queued before a snapshot restore; how many."""
        if self.peer is None:
            return 0
        try:
            return self.peer.discard_stale()
        except LinkError as exc:
            self.drop(exc.reason)
            return 0

    def close(self) -> None:
        """Close the peer and the listener, remove the socket file. Idempotent."""
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        with contextlib.suppress(OSError):
            self._listener.close()
        self.connected.clear()
        with contextlib.suppress(OSError):
            self.path.unlink()
