"""The QEMU end of the link, as the network driver's loop sees it.

:class:`PeerLink` wraps the accepted, non-blocking Unix stream socket that
QEMU's ``-netdev stream`` connected with: whole Ethernet frames in
(:class:`~.link.FrameDecoder`), whole frames out (:func:`~.link.encode_frame`)
through a bounded transmit backlog. It never blocks and owns no thread;
the driver's selector tells it when to read or write.

Every failure (QEMU closed the socket, a read or write error, a corrupt
length prefix) is reported as :class:`~.link.LinkError`; after one the
link is finished, as QEMU's own side is (no resynchronisation exists in
this framing).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter, deque
from typing import Final

from pytest_gondolin.netpolicy.stack.link import FrameDecoder, LinkError, encode_frame

__all__ = ["DEFAULT_MAX_TX_BYTES", "DEFAULT_READ_CHUNK", "PeerLink"]

log = logging.getLogger(__name__)

#: Bytes asked of the kernel per ``recv``: a few maximal (64 KiB) frames.
DEFAULT_READ_CHUNK: Final = 256 * 1024
#: Frames waiting for QEMU to read them. QEMU stops reading while the
#: guest's receive queue is full; past this bound new frames are dropped
#: like a full NIC ring would drop them, and TCP retransmits.
DEFAULT_MAX_TX_BYTES: Final = 16 * 1024 * 1024
#: Reads :meth:`PeerLink.discard_stale` makes at most. The guest is paused
#: then, so QEMU writes little more than what is already buffered; the
#: bound only keeps a misbehaving peer from holding the loop.
_MAX_STALE_READS: Final = 256


class PeerLink:
    """Frames to and from one connected QEMU (see the module docstring).

    ``counters`` (shared with the owner) gets ``tx-dropped-backlog`` and
    ``tx-dropped-oversize``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        read_chunk: int = DEFAULT_READ_CHUNK,
        max_tx_bytes: int = DEFAULT_MAX_TX_BYTES,
        counters: Counter[str] | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.read_chunk = read_chunk
        self.max_tx_bytes = max_tx_bytes
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._decoder = FrameDecoder()
        self._skip_frames = 0  # frames QEMU began before discard_stale, still to drop
        self._tx = bytearray()
        # Where each queued frame ends, counted in bytes ever queued, and how
        # many bytes were written: enough to find the frame being written.
        self._tx_ends: deque[int] = deque()
        self._tx_written = 0
        self._tx_done = 0  # the end of the last frame written whole

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending_tx(self) -> int:
        """Encoded bytes not yet written (the driver waits for writability while > 0)."""
        return len(self._tx)

    def recv_frames(self) -> list[bytes] | None:
        """Complete frames from one ``recv``: ``[]`` if it ended mid-frame, ``None`` if nothing was ready.

        Raises :class:`LinkError` if QEMU closed the link, the read failed
        or the stream is corrupt.
        """
        try:
            data = self.sock.recv(self.read_chunk)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise LinkError(f"read failed: {exc}") from exc
        if not data:
            raise LinkError("QEMU closed the connection")
        self._decoder.feed(data)
        frames = []
        while (frame := self._decoder.next_frame()) is not None:
            if self._skip_frames:
                self._skip_frames -= 1
                continue
            frames.append(frame)
        return frames

    def discard_stale(self) -> int:
        """Drop every frame from before now, both ways; return how many went.

        In: what QEMU already wrote is read and dropped, and a frame it was
        half-way through is dropped when it completes. Out: queued frames
        not begun are dropped; the rest of one partly written stays, since
        the stream must stay framed. Raises :class:`LinkError` as reads do.
        """
        dropped = 0
        for _ in range(_MAX_STALE_READS):
            frames = self.recv_frames()
            if frames is None:
                break
            dropped += len(frames)
        if self._decoder.buffered_bytes:
            self._skip_frames = 1
        if self._tx_ends:
            head_end = self._tx_ends[0]
            begun = self._tx_written > self._tx_done
            keep = head_end - self._tx_written if begun else 0
            dropped += len(self._tx_ends) - (1 if begun else 0)
            del self._tx[keep:]
            self._tx_ends = deque([head_end] if begun else [])
        return dropped

    def queue(self, frames: list[bytes]) -> None:
        """Append ``frames`` to the transmit backlog, dropping what exceeds its bound."""
        for frame in frames:
            if len(self._tx) + len(frame) + 4 > self.max_tx_bytes:
                self.counters["tx-dropped-backlog"] += 1
                continue
            try:
                self._tx += encode_frame(frame)
            except LinkError:
                self.counters["tx-dropped-oversize"] += 1
                continue
            self._tx_ends.append(self._tx_written + len(self._tx))

    def flush(self) -> None:
        """Write as much of the backlog as the socket takes now. Raises :class:`LinkError`."""
        while self._tx:
            try:
                sent = self.sock.send(self._tx)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise LinkError(f"write failed: {exc}") from exc
            # Deleting from the front of a bytearray is O(1) in CPython.
            del self._tx[:sent]
            self._tx_written += sent
            while self._tx_ends and self._tx_ends[0] <= self._tx_written:
                self._tx_done = self._tx_ends.popleft()

    def close(self) -> None:
        self._tx = bytearray()
        self._tx_ends.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
