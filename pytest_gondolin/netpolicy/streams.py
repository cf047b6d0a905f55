"""Raw TCP streams: named TCP services (``tcp=``) and ingress (``VM.forward``).

:class:`StreamRelay` joins a guest TCP flow of the stack to a host socket
and moves opaque bytes both ways. Two ways a stream starts:

* **service** (egress): the guest dials ``name:port`` that the policy's
  ``tcp`` option names (:mod:`.http.tcp_services`). The guest's SYN is
  held while the host connects to the target; the flow is accepted once
  that connect succeeds and refused with RST ("connection refused") if it
  fails, so the guest sees what it would see talking to the target itself.
  Any other name and port never gets here: the HTTP layer sniffs it and
  resets what is not HTTP.
* **ingress**: a client connects to a port the host listens on for
  ``VM.forward`` (on ``127.0.0.1`` only); the host dials the guest's port
  through the stack (:mod:`.stack.tcp_active`) and relays once the guest
  accepted. A refusal in the guest closes the client's connection with RST.

It runs on the driver's loop thread and registers its sockets in the
driver's selector (each with a callback as its data); the driver owns the
thread, this module owns these sockets. Guarantees, each per stream so a
stream's trouble costs that stream only:

* at most ``stream_buffer`` bytes wait each way (:class:`~.limits.DriverLimits`):
  past that the host stops reading the other side, so a side that never
  reads closes the other's TCP window instead of growing host memory;
* a stream silent for ``stream_idle_timeout`` seconds, or past
  ``stream_max_bytes`` in all, is reset both ways;
* half-close is relayed (FIN one way, data still flowing the other);
* at most ``max_ingress_connections`` ingress streams at once (a client
  beyond that is closed at once) and ``max_forwards`` listening ports;
* every stream is recorded in the recorder current when it opened, as a
  :class:`~.http.tcp_record.TcpFlow`, and its record updated when it ends.

A ``wss://`` session is TLS on both sides: the guest's side goes through
the session the MITM terminated (:class:`~.stream_tls.GuestTls`), the
host's socket is the verified ``ssl.SSLSocket`` of the handshake. The
bounds above then count plaintext, and so do the recorded bytes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.mediation import MediationContext
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow, TcpFlowKind
from pytest_gondolin.netpolicy.http.websocket import Upgraded
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.stack.flow_events import (
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowWritable,
    NewFlow,
)
from pytest_gondolin.netpolicy.stack.network import NetworkStack
from pytest_gondolin.netpolicy.stack.tcp import CloseReason
from pytest_gondolin.netpolicy.stream_pump import Stream, StreamPump, close_socket
from pytest_gondolin.netpolicy.stream_tls import GuestTls, GuestTlsError

__all__ = ["LISTEN_BACKLOG", "StreamRelay", "bind_forward"]

log = logging.getLogger(__name__)

#: Pending connections per forwarded port, before the loop accepts them.
LISTEN_BACKLOG: Final = 64
#: Connections accepted per listener per wake-up, so one busy port cannot
#: starve the loop's other work.
_ACCEPTS_PER_WAKE: Final = 32
#: How a stream ended when the guest's flow closed for this reason.
_FLOW_ENDINGS: Final = {
    CloseReason.NORMAL: "closed",
    CloseReason.GUEST_RESET: "reset-by-guest",
    CloseReason.TIMEOUT: "guest-unresponsive",
    CloseReason.REFUSED: "refused-by-guest",
    CloseReason.ACCEPT_TIMEOUT: "connect-timeout",
}

_Flow = FlowData | FlowEOF | FlowWritable | FlowClosed


class StreamRelay(StreamPump):
    """The raw TCP streams of one stack (see the module docstring).

    ``stack`` is the stack whose flows it relays (a new stack needs a new
    relay); ``selector`` is the driver's; ``context`` returns the current
    policy and recorder; ``counters`` is shared with the driver.
    """

    def __init__(
        self,
        stack: NetworkStack,
        selector: selectors.BaseSelector,
        *,
        context: Callable[[], MediationContext],
        limits: DriverLimits,
        counters: Counter[str],
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stack = stack
        self._selector = selector
        self._context = context
        self._limits = limits
        self._counters = counters
        self._name = name
        self._clock = clock
        self._streams: dict[int, Stream] = {}  # by flow id
        # host port -> (listening socket, guest port)
        self._listeners: dict[int, tuple[socket.socket, int]] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def next_deadline(self) -> float | None:
        """When the stalest stream goes idle, or ``None``."""
        if not self._streams:
            return None
        idle = self._limits.stream_idle_timeout
        return min(s.last_active for s in self._streams.values()) + idle

    def on_timer(self, now: float) -> None:
        """Reset the streams idle for ``stream_idle_timeout``."""
        idle = self._limits.stream_idle_timeout
        for stream in list(self._streams.values()):
            if now - stream.last_active >= idle:
                self._abort(stream, "idle-timeout")

    # -- starting streams ---------------------------------------------------------

    def claim(self, event: NewFlow) -> bool:
        """Take a new guest flow if the policy names it as a TCP service."""
        context = self._context()
        service = context.policy.tcp_service(event.dns_name, event.dst_port)
        if service is None:
            return False
        family = socket.AF_INET6 if ":" in service.target_ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: this flow is refused, the loop goes on
            log.warning("%s: no socket for tcp service %s: %s", self._name, service.key, exc)
            self._stack.reject(event.flow_id)
            return True
        sock.setblocking(False)
        stream = self._new_stream(
            event.flow_id, sock, "tcp", service.name, service.port, service.target, context.recorder
        )
        err = sock.connect_ex((service.target_ip, service.target_port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._stack.reject(event.flow_id)
            self._end(stream, f"refused-by-target: {errno.errorcode.get(err, err)}")
            return True
        self._counters["streams.tcp"] += 1
        log.debug(
            "%s: flow %d to tcp service %s -> %s",
            self._name,
            event.flow_id,
            service.key,
            service.target,
        )
        self._update_interest(stream)
        return True

    def adopt(
        self,
        flow_id: int,
        upgraded: Upgraded,
        *,
        name: str,
        port: int,
        head: bytes,
        from_guest: bytes,
        guest_eof: bool,
        recorder: Recorder,
        guest_tls: GuestTls | None = None,
    ) -> None:
        """Relay a guest flow whose WebSocket handshake the server accepted.

        ``head`` is the framed 101 for the guest (sent first, not counted in
        ``bytes_to_guest``), then the server's ``upgraded.early`` bytes;
        ``from_guest`` are frames the guest sent with its request. For
        ``wss://``, ``guest_tls`` carries the guest's session on and
        ``head`` is already encrypted.
        """
        sock = upgraded.sock
        sock.setblocking(False)
        stream = self._new_stream(flow_id, sock, "websocket", name, port, upgraded.target, recorder)
        stream.phase = "open"
        stream.guest_tls = guest_tls
        if guest_tls is not None:
            guest_tls.wire[:0] = head
        else:
            stream.to_guest += head
            stream.sent_to_guest = -len(head)
        stream.to_guest += upgraded.early
        stream.to_host += from_guest
        stream.from_guest = len(from_guest)
        stream.guest_eof = guest_eof
        self._counters["streams.websocket"] += 1
        try:
            self._pump(stream)
        except GuestTlsError as exc:  # the guest's first records already broke its session
            self._guest_tls_failed(stream, exc)

    def listen(self, sock: socket.socket, guest_port: int) -> None:
        """Serve ``sock`` (bound, listening, non-blocking) as a forward to ``guest_port``."""
        host_port = sock.getsockname()[1]
        self._listeners[host_port] = (sock, guest_port)
        self._selector.register(
            sock, selectors.EVENT_READ, lambda _mask: self._accept(sock, host_port, guest_port)
        )

    @property
    def forwards(self) -> dict[int, int]:
        """``{host port: guest port}`` of the listening forwards."""
        return {port: guest for port, (_, guest) in self._listeners.items()}

    def _accept(self, listener: socket.socket, host_port: int, guest_port: int) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accept on 127.0.0.1:%d failed: %s", self._name, host_port, exc)
                return
            ingress = sum(1 for s in self._streams.values() if s.kind == "ingress")
            flow_id = None
            if ingress < self._limits.max_ingress_connections:
                flow_id = self._stack.connect(guest_port)
            if flow_id is None:
                self._counters["streams.ingress-refused"] += 1
                close_socket(conn, abortive=True)
                continue
            conn.setblocking(False)
            self._counters["streams.ingress"] += 1
            self._new_stream(
                flow_id,
                conn,
                "ingress",
                "guest",
                guest_port,
                f"127.0.0.1:{host_port}",
                self._context().recorder,
            )

    def _new_stream(
        self,
        flow_id: int,
        sock: socket.socket,
        kind: TcpFlowKind,
        name: str,
        port: int,
        target: str,
        recorder: Recorder,
    ) -> Stream:
        record = TcpFlow(next(self._ids), kind, name, port, target, time.time())
        now = self._clock()
        stream = Stream(flow_id, sock, kind, record, recorder, now, now)
        self._streams[flow_id] = stream
        recorder.tcp_log.record(record)
        return stream

    # -- events ---------------------------------------------------------------------

    def on_event(self, event: _Flow) -> None:
        """Act on a stack event of a stream's flow (events of other flows are ignored)."""
        stream = self._streams.get(event.flow_id)
        if stream is None:
            return
        try:
            if isinstance(event, FlowClosed):
                self._flow_closed(stream, event.reason)
                return
            stream.last_active = self._clock()
            if isinstance(event, FlowEOF):
                stream.guest_eof = True
            elif isinstance(event, FlowWritable) and stream.phase == "connecting":
                stream.phase = "open"  # ingress: the guest accepted our SYN
            self._pump(stream)
        except GuestTlsError as exc:
            self._guest_tls_failed(stream, exc)
        except Exception:
            self._failed(stream)

    def _on_ready(self, stream: Stream, mask: int) -> None:
        if self._streams.get(stream.flow_id) is not stream:
            return
        stream.last_active = self._clock()
        try:
            if stream.phase == "connecting":
                self._connected(stream)
                return
            self._pump(stream)  # reads the socket too when it has room
        except GuestTlsError as exc:
            self._guest_tls_failed(stream, exc)
        except Exception:
            self._failed(stream)

    def _failed(self, stream: Stream) -> None:
        """A bug while handling ``stream``: it costs that stream, logged with its traceback."""
        self._counters["streams.errors"] += 1
        log.exception("%s: error on stream of flow %d; resetting it", self._name, stream.flow_id)
        self._abort(stream, "error")

    def _guest_tls_failed(self, stream: Stream, exc: GuestTlsError) -> None:
        """The guest broke its ``wss://`` TLS session: reset the stream (its alert goes first)."""
        if stream.guest_tls is not None:
            self._send_guest(stream.flow_id, stream.guest_tls.wire, self._limits.send_chunk)
        log.debug("%s: stream of flow %d: %s", self._name, stream.flow_id, exc)
        self._abort(stream, "guest-tls-error")

    def _connected(self, stream: Stream) -> None:
        err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._stack.reject(stream.flow_id)  # the guest sees "connection refused"
            self._end(stream, f"refused-by-target: {errno.errorcode.get(err, err)}")
            return
        stream.phase = "open"
        self._stack.accept(stream.flow_id)
        self._update_interest(stream)

    def _flow_closed(self, stream: Stream, reason: CloseReason) -> None:
        ending = _FLOW_ENDINGS.get(reason, reason.value)
        if reason is not CloseReason.NORMAL:
            self._end(stream, ending, abortive=True)
            return
        stream.phase = "draining"  # both FINs are through: send the host what is left
        self._pump(stream)

    def close(self, how: str) -> None:
        """End every stream (``how`` is recorded) and close every forward."""
        for stream in list(self._streams.values()):
            self._end(stream, how, abortive=True)
        for sock, _ in self._listeners.values():
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
            sock.close()
        self._listeners.clear()


def bind_forward(guest_port: object, host_port: object) -> socket.socket:
    """A non-blocking socket listening on ``127.0.0.1:host_port`` (0: a free port).

    Loopback only, never another interface. Raises :class:`ConfigError`
    naming a bad port and :class:`NetworkPolicyError` if it cannot be bound.
    """
    for what, port, low in (("guest_port", guest_port, 1), ("host_port", host_port, 0)):
        if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
            raise ConfigError(f"forward: {what} must be an int in {low}..65535, got {port!r}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", host_port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise NetworkPolicyError(
            f"forward: cannot listen on 127.0.0.1:{host_port} for guest port {guest_port}: {exc}"
        ) from exc
    return sock
