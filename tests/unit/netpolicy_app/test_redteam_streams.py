"""A hostile guest against WebSocket upgrades and raw streams, without a VM.

Each test is a hole that was found and closed; each has a control that
shows the same setup works when it should. Upstreams are real sockets on
127.0.0.1 (a hand-written server where the point is what it answers).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_gondolin.netpolicy.driver import NetworkDriver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.interceptor import HttpInterceptor, RequestReceived
from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from pytest_gondolin.netpolicy.http.websocket import is_websocket
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.stack.network import GUEST_IP
from pytest_gondolin.netpolicy.stack.packets import IPPROTO_TCP
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
)

from ..test_driver import WAIT, FakeGuest, resolve_all

VALUE = "r3al-Secret-value-42"


def _handshake(upgrade: str = "websocket", host: str = "ws.test") -> bytes:
    return (
        f"GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@dataclass
class Scripted:
    """A server that reads one request head, then answers ``answer(head)`` (after ``gate``)."""

    answer: Callable[[bytes], bytes]
    gate: threading.Event = field(default_factory=threading.Event)
    heads: list[bytes] = field(default_factory=list)
    conns: list[socket.socket] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[bytes], bytes]], Scripted]]:
    listeners: list[socket.socket] = []
    servers: list[Scripted] = []

    def start(answer: Callable[[bytes], bytes], *, gated: bool = False) -> Scripted:
        server = Scripted(answer)
        if not gated:
            server.gate.set()
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        server.port = listener.getsockname()[1]

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                server.conns.append(conn)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                server.heads.append(head)
                server.gate.wait(WAIT * 4)
                conn.sendall(server.answer(head))

        threading.Thread(target=serve, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for listener in listeners:
        listener.close()
    for server in servers:
        server.gate.set()
        for conn in server.conns:
            conn.close()


def _context(port: int, *, secret_hosts: tuple[str, ...] = ()) -> MediationContext:
    policy = NetworkPolicy(
        allow_hosts=["ws.test", "api.test"],
        resolve={"ws.test:80": f"127.0.0.1:{port}", "api.test:80": f"127.0.0.1:{port}"},
        secrets={"TOKEN": Secret(value=VALUE, hosts=list(secret_hosts))} if secret_hosts else {},
    )
    store = SecretStore(policy.secrets) if secret_hosts else None
    return MediationContext(policy, store, Recorder(redactor=store), None)


def _mediate(context: MediationContext, raw: bytes, authority: str = "ws.test") -> Mediated:
    icpt = HttpInterceptor("http", authority=authority, port=80)
    (event,) = icpt.receive_data(raw)
    assert isinstance(event, RequestReceived)
    planned = plan_request(event.request, event.started, context)
    if isinstance(planned, UpstreamJob):
        return run_upstream(planned, timeout=WAIT)
    return planned


SWITCH_TO = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {}\r\nConnection: Upgrade\r\n\r\n"


# -- an upgrade to another protocol is not a WebSocket ------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("websocket", True),
        ("WebSocket", True),
        ("h2c, websocket", True),
        ("websocket/13", False),  # a protocol version is another protocol (RFC 9110 §7.8)
        ("x-websocket-tunnel", False),
        ("notwebsocket", False),
        ("h2c", False),
    ],
)
def test_only_the_websocket_token_is_a_websocket_upgrade(value: str, expected: bool) -> None:
    assert is_websocket((("Upgrade", value),)) is expected


def test_a_server_switching_to_another_protocol_is_not_relayed(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted],
) -> None:
    # The guest offers "h2c, websocket"; the server picks h2c. Relaying that
    # would give the guest an opaque HTTP/2 session no policy or record sees.
    server = scripted(lambda _head: SWITCH_TO.format("h2c").encode())
    outcome = _mediate(_context(server.port), _handshake("h2c, websocket"))
    assert outcome.upgraded is None and outcome.exchange.status == 502
    assert "h2c" in outcome.exchange.reason
    (head,) = server.heads
    assert b"\r\nUpgrade: websocket\r\n" in head and b"h2c" not in head  # only websocket offered


def test_negative_control_a_server_switching_to_websocket_is_relayed(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted],
) -> None:
    server = scripted(lambda _head: SWITCH_TO.format("WebSocket").encode())
    outcome = _mediate(_context(server.port), _handshake("h2c, websocket"))
    assert outcome.exchange.status == 101 and outcome.upgraded is not None
    outcome.upgraded.close()


# -- secrets: frames cannot be redacted, so no session with a secret's host -----------------


@pytest.mark.parametrize("secret_host", ["ws.test", "ws.test:443", "*.test"])
def test_a_websocket_to_a_secret_s_host_is_refused_even_without_the_placeholder(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted], secret_host: str
) -> None:
    # A stateful server hands a value it got earlier (a request that carried
    # the secret) to the guest in a frame: the host cannot redact frames.
    frame = b"\x81" + bytes([len(VALUE)]) + VALUE.encode()
    server = scripted(lambda _head: SWITCH_TO.format("websocket").encode() + frame)
    # Any port: the server behind ws.test:80 may be the one behind :443.
    outcome = _mediate(_context(server.port, secret_hosts=(secret_host,)), _handshake())
    assert outcome.upgraded is None and outcome.exchange.decision == "denied"
    assert "[rule: websocket]" in outcome.exchange.reason and "TOKEN" in outcome.exchange.reason
    assert server.heads == []  # never contacted


def test_negative_control_a_websocket_to_another_host_is_relayed(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted],
) -> None:
    server = scripted(lambda _head: SWITCH_TO.format("websocket").encode())
    outcome = _mediate(_context(server.port, secret_hosts=("api.test",)), _handshake())
    assert outcome.exchange.status == 101 and outcome.upgraded is not None
    outcome.upgraded.close()


def _gzip_answer(_head: bytes) -> bytes:
    body = gzip.compress(f"token={VALUE}".encode())
    return (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def test_a_declined_handshake_is_screened_like_any_response(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted],
) -> None:
    # A host without the secret echoes a value it learnt elsewhere, gzipped:
    # an ordinary request gets it decoded and redacted; so must a handshake.
    server = scripted(_gzip_answer)
    context = _context(server.port, secret_hosts=("api.test",))
    outcome = _mediate(context, _handshake())
    assert outcome.upgraded is None and outcome.exchange.status == 200
    body = outcome.response.body
    if outcome.response.header("content-encoding"):
        body = gzip.decompress(body)
    assert VALUE.encode() not in body and context.secrets is not None
    assert context.secrets.placeholder("TOKEN").encode() in body


def test_negative_control_the_same_answer_to_a_plain_request_is_redacted(
    scripted: Callable[[Callable[[bytes], bytes]], Scripted],
) -> None:
    server = scripted(_gzip_answer)
    context = _context(server.port, secret_hosts=("api.test",))
    raw = b"GET /chat HTTP/1.1\r\nHost: ws.test\r\n\r\n"
    outcome = _mediate(context, raw)
    assert outcome.exchange.status == 200 and VALUE.encode() not in outcome.response.body
    assert gzip.decompress(server.answer(b"").split(b"\r\n\r\n", 1)[1]).endswith(VALUE.encode())


# -- nothing outlives the driver ------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_a_handshake_answered_after_close_or_restore_does_not_keep_the_upstream_open(
    tmp_path: Path,
    ca: CertificateAuthority,
    scripted: Callable[..., Scripted],
    ending: str,
) -> None:
    # The guest starts a handshake; the VM closes (or is restored) while the
    # server thinks; the 101 arrives after. The upstream connection must not
    # be left open (before the fix, after close it stayed open for good).
    server = scripted(lambda _head: SWITCH_TO.format("websocket").encode(), gated=True)
    driver = NetworkDriver(tmp_path / "net.sock", ca=ca, mtu=1500)
    driver.configure(
        NetworkPolicy(allow_hosts=["ws.test"], resolve={"ws.test:80": f"127.0.0.1:{server.port}"})
    )
    guest = FakeGuest(driver.socket_path)
    assert driver.wait_connected(WAIT)
    address = resolve_all(guest, ["ws.test"])["ws.test"]
    flow = guest.connect(address, 80)  # type: ignore[arg-type]
    flow.send(_handshake())
    deadline = time.monotonic() + WAIT
    while not server.heads:
        flow.pump()
        assert time.monotonic() < deadline, "the handshake never reached the server"
    if ending == "close":
        driver.close()
    else:
        driver.reset()
    server.gate.set()  # the 101 goes out now, to a closed VM or a guest that forgot it
    (conn,) = server.conns
    conn.settimeout(WAIT)
    try:
        assert conn.recv(1) == b"", f"the host kept the upgraded connection after {ending}"
    except ConnectionResetError:
        pass  # closed abortively: fine too
    finally:
        driver.close()
        guest.close()
    assert driver.recorder.tcp_flows == []  # no session was relayed


# -- the host dials the guest (forward); the guest answers with a zero window forever ------


def _zero_window_flood(tmp_path: Path, ca: CertificateAuthority, stream_buffer: int) -> int:
    """Bytes a host client got into a forward whose guest accepted with window 0."""
    limits = DriverLimits(stream_buffer=stream_buffer, stream_idle_timeout=2.0)
    with NetworkDriver(tmp_path / "net.sock", ca=ca, mtu=1500, limits=limits) as driver:
        guest = FakeGuest(driver.socket_path)
        assert driver.wait_connected(WAIT)
        guest.sync()  # the stack learns the guest's MAC: no ARP before the SYN
        port = driver.forward(8000)
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        syn = None
        deadline = time.monotonic() + WAIT
        while syn is None:
            assert time.monotonic() < deadline, "the host never dialled the guest"
            guest.poll()
            for ip in guest.take_ip(IPPROTO_TCP):
                seg = parse_tcp(ip.payload, ip.src, ip.dst)
                if seg.syn and not seg.has_ack and seg.dst_port == 8000:
                    syn, gateway = seg, ip.src
        synack = TcpSegment(
            8000,
            syn.src_port,
            5000,
            (syn.seq + 1) & 0xFFFFFFFF,
            TCP_SYN | TCP_ACK,
            0,
            b"",
            TcpOptions(mss=1460),
        )
        guest.send_ip(gateway, IPPROTO_TCP, synack.build(GUEST_IP, gateway))
        client.settimeout(1.0)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < 256 * 1024 * 1024:
                sent += client.send(b"x" * 65536)
        flow = None
        deadline = time.monotonic() + WAIT * 2
        while flow is None or flow.open:
            assert time.monotonic() < deadline, driver.recorder.tcp_flows
            time.sleep(0.05)
            (flow,) = driver.recorder.tcp_flows
        assert flow.kind == "ingress" and flow.ended == "idle-timeout", flow
        assert flow.bytes_from_guest == 0
        client.settimeout(WAIT)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(65536):
                pass  # reset (or closed): the client is not left hanging
        client.close()
        guest.close()
    return sent


def test_a_guest_that_accepts_a_forward_with_a_zero_window_costs_a_bounded_buffer(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    # The guest completes the host's handshake, advertises window 0 and never
    # reads or answers again. The client's flood must stall in kernel buffers
    # (the relay stops reading past stream_buffer), and the silent stream be
    # reset at the idle timeout, freeing its slot (checked in the helper).
    sent = _zero_window_flood(tmp_path, ca, 64 * 1024)
    # Loopback socket buffers (measured: 3 MiB) plus the relay's 64 KiB.
    assert 0 < sent < 32 * 1024 * 1024, sent


def test_negative_control_a_relay_buffer_without_a_useful_bound_is_seen(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    assert _zero_window_flood(tmp_path, ca, 128 * 1024 * 1024) >= 32 * 1024 * 1024


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} spell them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(addr)
    return found


@pytest.mark.parametrize("host_port", [0, "free"])
def test_a_forward_listens_on_loopback_only(
    tmp_path: Path, ca: CertificateAuthority, host_port: int | str
) -> None:
    if host_port == "free":
        probe = socket.create_server(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
        probe.close()
    assert isinstance(host_port, int)
    with NetworkDriver(tmp_path / "net.sock", ca=ca, mtu=1500) as driver:
        port = driver.forward(8000, host_port)
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and nothing else (no ::, no 0.0.0.0)
    assert _listening(port) == []  # closed with the driver
