"""Sans-IO framing of QEMU's ``-netdev stream`` byte stream.

QEMU (net/stream.c) writes each Ethernet frame the guest transmits as a
4-byte big-endian length followed by that many bytes, and expects the same
from us. There is no magic, no checksum and no resynchronisation point: a
length we refuse leaves the reader somewhere inside an unknown frame, so
the only safe reaction is to declare the link broken for good. The driver
then tears the VM's network down (QEMU itself does the same on its side,
disconnecting the stream, when it receives a bad length).

Usage, from the driver that owns the socket::

    decoder = FrameDecoder()
    decoder.feed(sock.recv(65536))          # may raise LinkError
    while (frame := decoder.next_frame()) is not None:
        stack.receive_frame(frame, now)
    ...
    sock.sendall(b"".join(encode_frame(f) for f in stack.outgoing_frames()))
"""

from __future__ import annotations

import logging

from pytest_gondolin.errors import ConfigError, NetworkPolicyError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "LENGTH_PREFIX_SIZE",
    "FrameDecoder",
    "LinkError",
    "encode_frame",
]

logger = logging.getLogger(__name__)

LENGTH_PREFIX_SIZE = 4

#: The largest frame accepted by default: a maximal IPv4 datagram (65535
#: bytes, enough for a ``host_mtu=65520`` link) plus a 14-byte Ethernet
#: header and one 4-byte VLAN tag. QEMU's own ceiling (NET_BUFSIZE,
#: 4096 + 65536) is a little higher; nothing legitimate comes near either.
DEFAULT_MAX_FRAME_SIZE = 65535 + 14 + 4


class LinkError(NetworkPolicyError):
    """The stream to QEMU is corrupt; the link cannot be used any more.

    ``reason`` says what was wrong (e.g. the refused length).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"network link to the guest is broken: {reason}")


def encode_frame(frame: bytes, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return ``frame`` with its 4-byte big-endian length prefix.

    Raises :class:`LinkError` for a frame larger than ``max_frame_size``
    (QEMU would refuse it and drop the connection).
    """
    if len(frame) > max_frame_size:
        raise LinkError(f"refusing to send a {len(frame)}-byte frame (max {max_frame_size})")
    return len(frame).to_bytes(LENGTH_PREFIX_SIZE, "big") + frame


class FrameDecoder:
    """Splits the byte stream from QEMU into Ethernet frames.

    Guarantees: frames come out whole, in order, each of 1 to
    ``max_frame_size`` bytes; zero-length records carry nothing and are
    skipped (they cost no synchronisation); once a length above the
    maximum is seen every later call raises :class:`LinkError` (``broken``
    holds the reason). The decoder holds only bytes fed and not yet
    returned, so a driver that pops every frame after each ``feed`` keeps
    it below one read plus one frame.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 1:
            raise ConfigError(f"max_frame_size must be positive, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._broken: str | None = None

    @property
    def broken(self) -> str | None:
        """Why the link was declared broken, or ``None`` while it is healthy."""
        return self._broken

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append bytes read from the socket. Raises :class:`LinkError` if broken."""
        if self._broken is not None:
            raise LinkError(self._broken)
        # Compact here, once per read, rather than once per frame: a read
        # holding many small frames would otherwise cost quadratic copying.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises :class:`LinkError` when the next length prefix is above
        ``max_frame_size``; frames before it were returned by earlier calls.
        """
        if self._broken is not None:
            raise LinkError(self._broken)
        buf = self._buf
        while len(buf) - self._pos >= LENGTH_PREFIX_SIZE:
            start = self._pos + LENGTH_PREFIX_SIZE
            length = int.from_bytes(buf[self._pos : start], "big")
            if length > self.max_frame_size:
                # No resync is possible (see the module docstring): forget
                # the buffer so a broken link holds no memory.
                self._broken = f"frame length {length} exceeds the maximum {self.max_frame_size}"
                self._buf = bytearray()
                self._pos = 0
                logger.warning("guest network link broken: %s", self._broken)
                raise LinkError(self._broken)
            end = start + length
            if len(buf) < end:
                return None
            self._pos = end
            if length:
                return bytes(buf[start:end])
        return None
