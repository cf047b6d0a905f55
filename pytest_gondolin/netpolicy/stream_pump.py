"""Moving a raw TCP stream's bytes, and ending it: the base of :class:`~.streams.StreamRelay`.

Split from :mod:`.streams` (which starts streams and handles the stack's
events) by concern: :class:`StreamPump` holds the per-stream work that
moves bytes between a guest flow and a host socket within the bounds of
:class:`~.limits.DriverLimits`, relays each half-close, and ends a stream
(recording how). :class:`Stream` is one stream's state.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow, TcpFlowKind
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.stack.network import NetworkStack
from pytest_gondolin.netpolicy.stream_tls import GuestTls

__all__ = ["Phase", "Stream", "StreamPump", "close_socket"]

log = logging.getLogger(__name__)

#: Rounds of moving bytes per stream per wake-up (each up to ``stream_buffer``
#: each way): a busy stream leaves the loop to the others between bursts.
_PUMP_ROUNDS: Final = 16
Phase = Literal["connecting", "open", "draining"]
#: What a non-blocking socket raises when it cannot move bytes now (for a
#: TLS socket also while a record is incomplete).
_WOULD_BLOCK: Final = (
    BlockingIOError,
    InterruptedError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


@dataclass(eq=False)
class Stream:
    """One relayed stream: its guest flow, its host socket, what waits each way."""

    flow_id: int
    sock: socket.socket
    kind: TcpFlowKind
    record: TcpFlow
    recorder: Recorder
    opened: float  # monotonic
    last_active: float
    phase: Phase = "connecting"
    to_guest: bytearray = field(default_factory=bytearray)
    to_host: bytearray = field(default_factory=bytearray)
    host_eof: bool = False  # the host socket sent EOF
    guest_eof: bool = False  # the guest sent FIN
    host_shut: bool = False  # we shut the host socket's sending side
    fin_sent: bool = False  # we asked the stack to send FIN
    from_guest: int = 0  # payload bytes taken from the guest
    sent_to_guest: int = 0  # payload bytes handed to the guest's flow
    mask: int = 0  # the selector events registered
    guest_tls: GuestTls | None = None  # wss://: the guest's TLS session (plaintext in the buffers)


class StreamPump:
    """Per-stream byte moving and ending; :class:`~.streams.StreamRelay` provides the state."""

    _stack: NetworkStack
    _selector: selectors.BaseSelector
    _limits: DriverLimits
    _counters: Counter[str]
    _name: str
    _clock: Callable[[], float]
    _streams: dict[int, Stream]  # by flow id

    def _on_ready(self, stream: Stream, mask: int) -> None:
        raise NotImplementedError  # the relay's: the selector calls it

    # -- moving bytes ---------------------------------------------------------------

    def _pump(self, stream: Stream) -> None:
        """Move what can move each way, close what is finished, re-arm the selector."""
        flow_id = stream.flow_id
        buffer = self._limits.stream_buffer
        for _ in range(_PUMP_ROUNDS):
            if stream.phase == "connecting" or self._streams.get(flow_id) is not stream:
                break
            moved = 0
            if stream.phase == "open":
                moved += self._read_guest(stream, buffer - len(stream.to_host))
            moved += self._write_host(stream)
            if stream.phase == "open":
                moved += self._read_host(stream)
                moved += self._write_guest(stream)
            if not self._finish_halves(stream) or not moved:
                break
        if self._streams.get(flow_id) is stream:
            self._check_size(stream)
        if self._streams.get(flow_id) is stream:
            self._update_interest(stream)

    def _read_guest(self, stream: Stream, room: int) -> int:
        """Take up to ``room`` guest bytes (for ``wss://``, decrypt them) into ``to_host``."""
        data = self._stack.flow_read(stream.flow_id, room) if room > 0 else b""
        moved = len(data)
        tls = stream.guest_tls
        if tls is not None and (data or stream.guest_eof) and not tls.guest_closed:
            # All readable plaintext at once: none waits in the session unseen.
            data = tls.decrypt(data, eof=stream.guest_eof and not moved)
            if tls.guest_closed:
                stream.guest_eof = True  # close_notify: nothing more comes from the guest
                moved += 1
        elif tls is not None:
            data = b""  # after close_notify: nothing to relay
        stream.to_host += data
        stream.from_guest += len(data)
        return moved

    def _read_host(self, stream: Stream) -> int:
        room = self._limits.stream_buffer - len(stream.to_guest)
        if room <= 0 or stream.host_eof:
            return 0
        try:
            data = stream.sock.recv(room)
            if data and isinstance(stream.sock, ssl.SSLSocket) and stream.sock.pending():
                # Plaintext OpenSSL decrypted but we did not take would wake no
                # selector: take it now (at most one record, 16 KiB).
                data += stream.sock.recv(stream.sock.pending())
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            self._host_failed(stream, exc)
            return 0
        if not data:
            stream.host_eof = True
            return 1  # progress: the EOF is relayed next
        stream.to_guest += data
        return len(data)

    def _write_host(self, stream: Stream) -> int:
        total = 0
        while stream.to_host:  # a TLS socket takes one record per send
            try:
                sent = stream.sock.send(stream.to_host)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self._host_failed(stream, exc)
                break
            del stream.to_host[:sent]
            total += sent
            if not sent:
                break
        return total

    def _write_guest(self, stream: Stream) -> int:
        chunk = self._limits.send_chunk
        tls = stream.guest_tls
        if tls is None:
            total = self._send_guest(stream.flow_id, stream.to_guest, chunk)
            stream.sent_to_guest += total
            return total
        # Encrypt only as fast as the stack takes ciphertext (bounded wire buffer).
        total = 0
        while True:
            total += self._send_guest(stream.flow_id, tls.wire, chunk)
            if tls.wire or not stream.to_guest:
                break
            plain = bytes(memoryview(stream.to_guest)[:chunk])
            del stream.to_guest[: len(plain)]
            tls.encrypt(plain)
            stream.sent_to_guest += len(plain)
        return total

    def _send_guest(self, flow_id: int, buffer: bytearray, chunk: int) -> int:
        """Hand ``buffer``'s bytes to the guest's flow while the stack takes them; bytes taken."""
        total = 0
        while buffer:
            n = self._stack.flow_send(flow_id, bytes(memoryview(buffer)[:chunk]))
            del buffer[:n]
            total += n
            if n < chunk:
                break
        return total

    def _finish_halves(self, stream: Stream) -> bool:
        """Relay each side's EOF once its bytes are through; False once the stream ended."""
        flow_id = stream.flow_id
        tls = stream.guest_tls
        if stream.host_eof and not stream.to_guest and not stream.fin_sent:
            if tls is not None:
                tls.close()  # close_notify before the FIN
                self._send_guest(flow_id, tls.wire, self._limits.send_chunk)
            if tls is None or not tls.wire:
                stream.fin_sent = True
                self._stack.flow_close(flow_id)
        guest_done = stream.phase == "draining" or (
            stream.guest_eof
            and (info := self._stack.flow_info(flow_id)) is not None
            and info.readable == 0
        )
        if guest_done and not stream.to_host and not stream.host_shut:
            stream.host_shut = True
            _shut_write(stream.sock)
        if stream.phase == "draining" and not stream.to_host:
            self._end(stream, "closed")
            return False
        return self._streams.get(flow_id) is stream

    def _check_size(self, stream: Stream) -> None:
        if stream.from_guest + stream.sent_to_guest > self._limits.stream_max_bytes:
            self._abort(stream, "size-limit")

    def _host_failed(self, stream: Stream, exc: OSError) -> None:
        who = "target" if stream.kind == "tcp" else "client"
        self._abort(stream, f"reset-by-{who}")
        log.debug("%s: stream of flow %d: %s", self._name, stream.flow_id, exc)

    def _update_interest(self, stream: Stream) -> None:
        mask = 0
        if stream.phase == "connecting":
            mask = selectors.EVENT_WRITE if stream.kind == "tcp" else 0
        else:
            buffered = len(stream.to_guest)
            if (
                stream.phase == "open"
                and not stream.host_eof
                and buffered < self._limits.stream_buffer
            ):
                mask |= selectors.EVENT_READ
            if stream.to_host:
                mask |= selectors.EVENT_WRITE
        if mask == stream.mask:
            return
        if stream.mask == 0:
            self._selector.register(stream.sock, mask, lambda m: self._on_ready(stream, m))
        elif mask == 0:
            self._selector.unregister(stream.sock)
        else:
            self._selector.modify(stream.sock, mask, lambda m: self._on_ready(stream, m))
        stream.mask = mask

    # -- ending ---------------------------------------------------------------------

    def _abort(self, stream: Stream, how: str) -> None:
        """Reset both sides: RST to the guest and to the host socket."""
        self._end(stream, how, abortive=True)
        self._stack.flow_abort(stream.flow_id)

    def _end(self, stream: Stream, how: str, *, abortive: bool = False) -> None:
        if self._streams.get(stream.flow_id) is not stream:
            return
        del self._streams[stream.flow_id]
        if stream.mask:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(stream.sock)
        close_socket(stream.sock, abortive=abortive)
        record = replace(
            stream.record,
            bytes_from_guest=stream.from_guest,
            bytes_to_guest=stream.sent_to_guest,
            duration=self._clock() - stream.opened,
            ended=how,
        )
        stream.record = record
        stream.recorder.tcp_log.update(record)
        self._counters[f"streams.ended.{how.split(':')[0]}"] += 1
        log.debug("%s: stream of flow %d ended: %s", self._name, stream.flow_id, record.summary())


def _shut_write(sock: socket.socket) -> None:
    """Half-close ``sock``: FIN, or for TLS ``close_notify`` (reading goes on either way)."""
    if isinstance(sock, ssl.SSLSocket):
        # shutdown() would drop the TLS layer under our feet; unwrap() sends
        # close_notify and, non-blocking, does not wait for the server's.
        with contextlib.suppress(OSError, ValueError):  # SSLWantReadError is an OSError
            sock.unwrap()
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def close_socket(sock: socket.socket, *, abortive: bool) -> None:
    """Close ``sock``; ``abortive`` makes the peer see a reset, not an orderly EOF."""
    if abortive:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
