"""The guest's TLS session of a relayed stream (``wss://``), carried on after the MITM.

A ``wss://`` handshake arrives over TLS the host terminated
(:class:`~pytest_gondolin.netpolicy.http.mitm.FlowProxy`); once the server
answered 101, the session is relayed as an opaque stream
(:mod:`.streams`), but the guest still speaks TLS to the host. A
:class:`GuestTls` takes over that very session (its ``ssl.SSLObject`` and
memory BIOs) and turns the guest's ciphertext into plaintext for the
upstream and back. Sans-IO: bytes in, bytes out, no socket, no clock.

Bounds: :meth:`GuestTls.decrypt` returns at most what was fed plus what
the session held already (one call drains it, so no plaintext is left
waiting where no selector would see it); :meth:`GuestTls.encrypt` adds
one record's overhead per 16 KiB; the caller encrypts only while
:attr:`GuestTls.wire` is short.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

__all__ = ["GuestTls", "GuestTlsError"]

log = logging.getLogger(__name__)

#: Plaintext taken out of the session per read (several 16 KiB records).
_READ_CHUNK: Final = 64 * 1024


class GuestTlsError(Exception):
    """The guest's TLS session failed (a bad record, an alert): the stream must be reset."""


class GuestTls:
    """One guest TLS session, server side, already past its handshake (see the module docstring).

    ``wire`` starts with ciphertext the proxy had encrypted but the stack
    had not taken yet (the 101); the caller sends from it and deletes what
    the stack accepted. ``guest_closed`` turns true once the guest sent
    ``close_notify`` (or its TLS stream ended): no more plaintext comes.
    """

    def __init__(
        self,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        *,
        wire: bytes = b"",
    ) -> None:
        self._tls = tls
        self._in = incoming
        self._out = outgoing
        self.wire = bytearray(wire)
        self.guest_closed = False
        self._closing = False

    def decrypt(self, data: bytes, *, eof: bool = False) -> bytes:
        """Feed the guest's ciphertext ``data`` (``eof``: its TCP side ended); all plaintext now readable.

        Raises :class:`GuestTlsError` if the session fails.
        """
        if data:
            self._in.write(data)
        if eof and not self._in.eof:
            self._in.write_eof()
        out = bytearray()
        while not self.guest_closed:
            try:
                chunk = self._tls.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""  # close_notify, or a ragged EOF: the guest is done either way
            except ssl.SSLError as exc:
                self._drain()  # the alert tells the guest what went wrong
                raise GuestTlsError(f"TLS error from the guest: {exc}") from exc
            if not chunk:
                self.guest_closed = True
                break
            out += chunk
        self._drain()  # reading can answer (key updates)
        return bytes(out)

    def encrypt(self, data: bytes) -> None:
        """Encrypt ``data`` for the guest onto :attr:`wire`. Raises :class:`GuestTlsError`."""
        view = memoryview(data)
        while view:
            try:
                written = self._tls.write(view)
            except ssl.SSLError as exc:
                raise GuestTlsError(f"TLS write to the guest failed: {exc}") from exc
            view = view[written:]
            self._drain()

    def close(self) -> None:
        """Queue ``close_notify`` on :attr:`wire` (once); the guest's answer is not awaited."""
        if self._closing:
            return
        self._closing = True
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, OSError):
            pass  # close_notify is queued; we do not wait for the guest's
        self._drain()

    def _drain(self) -> None:
        pending = self._out.pending
        if pending:
            self.wire += self._out.read(pending)
