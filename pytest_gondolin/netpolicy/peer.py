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
from collections import Counter
from typing import Final

from pytest_gondolin.netpolicy.link import FrameDecoder, LinkError, encode_frame

__all__ = ["DEFAULT_MAX_TX_BYTES", "DEFAULT_READ_CHUNK", "PeerLink"]

log = logging.getLogger(__name__)

#: Bytes asked of the kernel per ``recv``: a few maximal (64 KiB) frames.
DEFAULT_READ_CHUNK: Final = 256 * 1024
#: Frames waiting for QEMU to read them. QEMU stops reading while the
#: guest's receive queue is full; past this bound new frames are dropped
#: like a full NIC ring would drop them, and TCP retransmits.
DEFAULT_MAX_TX_BYTES: Final = 16 * 1024 * 1024


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
        self._tx = bytearray()

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
            frames.append(frame)
        return frames

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

    def close(self) -> None:
        self._tx = bytearray()
        with contextlib.suppress(OSError):
            self.sock.close()
