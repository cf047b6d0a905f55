"""NetworkDriver without QEMU: a fake guest speaks Ethernet frames over its Unix socket."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.driver import NetworkDriver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.stack.dns import DEFAULT_MAX_NAMES
from pytest_gondolin.netpolicy.stack.dns_wire import QTYPE_A, Rcode
from pytest_gondolin.netpolicy.stack.link import FrameDecoder, encode_frame
from pytest_gondolin.netpolicy.stack.network import GATEWAY_IP, GATEWAY_MAC, GUEST_IP
from pytest_gondolin.netpolicy.stack.packets import (
    ETHERTYPE_IPV4,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    UdpDatagram,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_udp,
)
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
)

from .netpolicy.dns_helpers import parse_response
from .netpolicy.dns_helpers import query as dns_query

GUEST_MAC = bytes.fromhex("525400123456")
#: Every wait in these tests; the driver answers in milliseconds.
WAIT = 5.0
Seen = list[tuple[str, str, dict[str, str]]]


# --------------------------------------------------------------------------- fake guest


class FakeGuest:
    """The guest end of the link: frames in and out, a few hand-driven TCP flows."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.05)
        self.decoder = FrameDecoder()
        self.frames: list[EthernetFrame] = []
        self.next_port = 40000

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_ip(self, dst: IPv4Address, protocol: int, payload: bytes) -> None:
        packet = IPv4Packet(GUEST_IP, dst, protocol, payload).build()
        frame = EthernetFrame(GATEWAY_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet).build()
        self.send_raw(encode_frame(frame))

    def poll(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("driver closed the link")
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            self.frames.append(parse_ethernet(frame))

    def take_ip(self, protocol: int) -> list[IPv4Packet]:
        out: list[IPv4Packet] = []
        rest: list[EthernetFrame] = []
        for eth in self.frames:
            ip = parse_ipv4(eth.payload) if eth.ethertype == ETHERTYPE_IPV4 else None
            if ip is not None and ip.protocol == protocol:
                out.append(ip)
            else:
                rest.append(eth)
        self.frames = rest
        return out

    def sync(self) -> None:
        """Ping the gateway and wait for the reply: every frame sent before it was processed."""
        self.send_ip(GATEWAY_IP, IPPROTO_ICMP, IcmpEcho(8, 4242, 1, b"sync").build())
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.poll()
            replies = self.take_ip(IPPROTO_ICMP)
            if any(parse_icmp_echo(ip.payload).identifier == 4242 for ip in replies):
                return
        raise TimeoutError("no reply to the sync ping")

    def connect(self, dst: IPv4Address, port: int) -> GuestFlow:
        self.next_port += 1
        flow = GuestFlow(self, dst, port, self.next_port)
        flow.handshake()
        return flow


class GuestFlow:
    """One guest TCP connection, in-order only (the link is lossless)."""

    def __init__(self, guest: FakeGuest, dst: IPv4Address, port: int, sport: int) -> None:
        self.guest = guest
        self.dst = dst
        self.port = port
        self.sport = sport
        self.snd = 1000
        self.rcv = 0
        self.data = bytearray()
        self.fin = False
        self.rst = False
        self.backlog: list[TcpSegment] = []

    def _send(self, flags: int, payload: bytes = b"", options: TcpOptions | None = None) -> None:
        seg = TcpSegment(
            self.sport,
            self.port,
            self.snd,
            self.rcv if flags & TCP_ACK else 0,
            flags,
            65535,
            payload,
            options or TcpOptions(),
        )
        self.guest.send_ip(self.dst, IPPROTO_TCP, seg.build(GUEST_IP, self.dst))
        self.snd = (
            self.snd + len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
        ) & 0xFFFFFFFF

    def _segments(self) -> list[TcpSegment]:
        self.guest.poll()
        mine = []
        for ip in self.guest.take_ip(IPPROTO_TCP):
            seg = parse_tcp(ip.payload, ip.src, ip.dst)
            if (seg.src_port, seg.dst_port) == (self.port, self.sport) and ip.src == self.dst:
                mine.append(seg)
            else:
                # Belongs to another flow of this guest: put it back.
                self.guest.frames.append(
                    EthernetFrame(GUEST_MAC, GATEWAY_MAC, ETHERTYPE_IPV4, ip.build())
                )
        return mine

    def handshake(self) -> None:
        self._send(TCP_SYN, options=TcpOptions(mss=1460, window_scale=7))
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for seg in self._segments():
                if seg.rst:
                    self.rst = True
                    return
                if seg.syn and seg.has_ack:
                    self.rcv = (seg.seq + 1) & 0xFFFFFFFF
                    self._send(TCP_ACK)
                    return
        raise TimeoutError("no SYN-ACK")

    def send(self, payload: bytes, *, fin: bool = False) -> None:
        for i in range(0, len(payload), 1460):
            self._send(TCP_ACK, payload[i : i + 1460])
        if fin:
            self._send(TCP_ACK | TCP_FIN)

    def pump(self) -> None:
        acked = False
        for seg in self._segments():
            if seg.rst:
                self.rst = True
                continue
            if seg.seq == self.rcv and (seg.payload or seg.fin):
                self.data += seg.payload
                self.rcv = (self.rcv + len(seg.payload) + seg.fin) & 0xFFFFFFFF
                self.fin |= seg.fin
                acked = True
        if acked and not self.rst:
            self._send(TCP_ACK)

    def read_until(self, pred: object, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if callable(pred) and pred(self):
                return bytes(self.data)
        raise TimeoutError(f"guest flow: condition not met; got {bytes(self.data)[:300]!r}")


def response_complete(flow: GuestFlow) -> bool:
    head, sep, body = bytes(flow.data).partition(b"\r\n\r\n")
    if not sep:
        return flow.rst or flow.fin
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return len(body) >= int(value)
    return flow.fin or flow.rst


# --------------------------------------------------------------------------- fixtures


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, dict[str, str]]]

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, dict(self.headers.items())))
        body = f"hello from upstream {self.path} auth={self.headers.get('Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[int, Seen]]:
    seen: Seen = []
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def driver(tmp_path: Path, ca: CertificateAuthority) -> Iterator[NetworkDriver]:
    d = NetworkDriver(
        tmp_path / "net.sock", ca=ca, mtu=1500, limits=DriverLimits(upstream_timeout=5.0)
    )
    yield d
    d.close()


@pytest.fixture
def guest(driver: NetworkDriver) -> Iterator[FakeGuest]:
    g = FakeGuest(driver.socket_path)
    assert driver.wait_connected(WAIT)
    yield g
    g.close()


def allow_upstream(
    driver: NetworkDriver, port: int, secrets: dict[str, Secret] | None = None
) -> Recorder:
    policy = NetworkPolicy(
        allow_hosts=["api.test"],
        resolve={"api.test:80": f"127.0.0.1:{port}"},
        secrets=secrets or {},
    )
    store = SecretStore(policy.secrets) if policy.secrets else None
    recorder = Recorder(redactor=store)
    driver.configure(policy, store, recorder)
    return recorder


SYNTH = IPv4Address("198.18.0.1")  # any address reaches the driver; Host decides


def get(flow: GuestFlow, host: str, path: str = "/", extra: str = "") -> bytes:
    flow.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return flow.read_until(response_complete)


# --------------------------------------------------------------------------- tests


def test_allowed_request_reaches_upstream_and_is_recorded(
    driver: NetworkDriver, guest: FakeGuest, upstream: tuple[int, Seen]
) -> None:
    port, seen = upstream
    recorder = allow_upstream(driver, port)
    flow = guest.connect(SYNTH, 80)
    response = get(flow, "api.test", "/hello")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert seen[-1][:2] == ("GET", "/hello")
    assert response.endswith(b"hello from upstream /hello auth=None")
    (ex,) = recorder.requests
    assert (ex.decision, ex.method, ex.url, ex.status) == (
        "allowed",
        "GET",
        "http://api.test/hello",
        200,
    )
    assert ex.response_header("X-Upstream") == "yes"
    # Keep-alive: a second request on the same flow.
    flow.data.clear()
    assert get(flow, "api.test", "/again").endswith(b"/again auth=None")
    assert len(recorder.requests) == 2


def test_denied_request_gets_403_naming_the_rule(
    driver: NetworkDriver, guest: FakeGuest, upstream: tuple[int, Seen]
) -> None:
    port, seen = upstream
    before = len(seen)
    recorder = allow_upstream(driver, port)
    response = get(guest.connect(SYNTH, 80), "evil.test", "/x")
    assert response.startswith(b"HTTP/1.1 403 ")
    assert b"rule: default-deny" in response
    (ex,) = recorder.get_requests(host="evil.test")
    assert ex.decision == "denied" and "default-deny" in ex.reason
    assert len(seen) == before


def test_stub_answers_without_upstream(driver: NetworkDriver, guest: FakeGuest) -> None:
    recorder = Recorder()
    recorder.stub("GET", "http://nowhere.test/api", json={"ok": True})
    driver.configure(NetworkPolicy(), None, recorder)  # deny-all: the stub needs no allow
    response = get(guest.connect(SYNTH, 80), "nowhere.test", "/api")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b'{"ok": true}')
    assert recorder.requests[0].decision == "stubbed"


def test_secret_substituted_only_for_its_host(
    driver: NetworkDriver, guest: FakeGuest, upstream: tuple[int, Seen]
) -> None:
    port, seen = upstream
    recorder = allow_upstream(
        driver, port, secrets={"TOKEN": Secret(value="s3cr3t-value", hosts=["api.test"])}
    )
    store = driver.secrets
    assert store is not None
    placeholder = store.placeholder("TOKEN")
    response = get(
        guest.connect(SYNTH, 80), "api.test", "/s", f"Authorization: Bearer {placeholder}\r\n"
    )
    assert response.startswith(b"HTTP/1.1 200 ")
    assert seen[-1][2]["Authorization"] == "Bearer s3cr3t-value"  # the upstream got the value
    assert b"s3cr3t-value" not in response  # the echo is redacted for the guest
    assert placeholder.encode() in response
    assert "s3cr3t-value" not in recorder.to_json()


def test_raw_tcp_is_reset_and_recorded(driver: NetworkDriver, guest: FakeGuest) -> None:
    flow = guest.connect(SYNTH, 443)
    flow.send(b"\x00\x01garbage that is neither HTTP nor TLS\r\n")
    flow.read_until(lambda f: f.rst)
    (ex,) = driver.recorder.requests
    assert ex.decision == "denied" and ex.method == "" and "not-http" in ex.reason


def test_tls_is_terminated_with_the_ca(
    driver: NetworkDriver, guest: FakeGuest, ca: CertificateAuthority
) -> None:
    recorder = Recorder()
    recorder.stub("GET", "https://secure.test/", body=b"tls ok")
    driver.configure(NetworkPolicy(), None, recorder)
    flow = guest.connect(SYNTH, 443)
    context = ssl.create_default_context(cadata=ca.ca_pem.decode())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="secure.test")

    def step() -> None:
        if outgoing.pending:
            flow.send(outgoing.read())
        flow.pump()
        if flow.data:
            incoming.write(bytes(flow.data))
            flow.data.clear()

    deadline = time.monotonic() + WAIT
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            assert time.monotonic() < deadline, "TLS handshake timed out"
            step()
    tls.write(b"GET / HTTP/1.1\r\nHost: secure.test\r\n\r\n")
    plain = b""
    while not plain.endswith(b"tls ok"):
        assert time.monotonic() < deadline, plain
        step()
        try:
            plain += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    assert plain.startswith(b"HTTP/1.1 200 ")
    assert recorder.requests[0].url == "https://secure.test/"


def test_garbage_frames_do_not_kill_the_loop(driver: NetworkDriver, guest: FakeGuest) -> None:
    for junk in (b"", b"\x00", b"\xff" * 13, b"\x02gond1" + b"\x00" * 60, bytes(range(256))):
        guest.send_raw(encode_frame(junk))
    # A bad IPv4 packet for a live TCP port, too.
    guest.send_ip(SYNTH, IPPROTO_TCP, b"\x01\x02\x03")
    recorder = Recorder()
    recorder.stub("GET", "http://alive.test/", body=b"still here")
    driver.configure(NetworkPolicy(), None, recorder)
    assert get(guest.connect(SYNTH, 80), "alive.test").endswith(b"still here")
    assert driver.counters.get("driver.loop-errors", 0) == 0


def test_corrupt_link_disconnects_but_the_driver_survives(
    driver: NetworkDriver, guest: FakeGuest
) -> None:
    guest.send_raw(b"\xff\xff\xff\xff")  # a length no frame can have
    deadline = time.monotonic() + WAIT
    while driver.connected:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again = FakeGuest(driver.socket_path)  # a new peer may connect
    try:
        assert driver.wait_connected(WAIT)
        recorder = Recorder()
        recorder.stub("GET", "http://back.test/", body=b"back")
        driver.configure(NetworkPolicy(), None, recorder)
        assert get(again.connect(SYNTH, 80), "back.test").endswith(b"back")
    finally:
        again.close()


def test_reset_forgets_flows_silently(driver: NetworkDriver, guest: FakeGuest) -> None:
    recorder = Recorder()
    recorder.stub("GET", "http://r.test/", body=b"ok")
    driver.configure(NetworkPolicy(), None, recorder)
    flow = guest.connect(SYNTH, 80)
    guest.sync()  # the handshake's last ACK reached the old stack
    driver.reset()
    flow.pump()
    assert not flow.rst  # nothing was sent to the guest by the reset itself
    flow.send(b"GET / HTTP/1.1\r\nHost: r.test\r\n\r\n")
    flow.read_until(lambda f: f.rst)  # the old flow is unknown now: RST, like a closed port
    assert driver.recorder is not recorder and driver.recorder.stubs == []  # a fresh recorder
    driver.recorder.stub("GET", "http://r.test/", body=b"ok")
    assert get(guest.connect(SYNTH, 80), "r.test").endswith(b"ok")  # new flows work
    assert recorder.requests == []  # the old recorder got nothing after the reset


def resolve_all(guest: FakeGuest, names: list[str]) -> dict[str, IPv4Address | int]:
    """Ask the driver's DNS for ``names`` (A); each name's address, or its rcode if none."""
    got: dict[str, IPv4Address | int] = {}
    for start in range(0, len(names), 256):  # batches: the link queue stays small
        batch = names[start : start + 256]
        for i, name in enumerate(batch):
            msg = dns_query(name, qid=start + i)
            guest.send_ip(
                GATEWAY_IP, IPPROTO_UDP, UdpDatagram(5353, 53, msg).build(GUEST_IP, GATEWAY_IP)
            )
        deadline = time.monotonic() + WAIT
        while len(got) < start + len(batch):
            assert time.monotonic() < deadline, f"{len(got)} answers"
            guest.poll()
            for ip in guest.take_ip(IPPROTO_UDP):
                r = parse_response(parse_udp(ip.payload, ip.src, ip.dst).payload)
                got[names[r.id]] = r.addresses[0] if r.addresses else r.rcode
    return got


def raw_flow_host(driver: NetworkDriver, guest: FakeGuest, address: IPv4Address) -> list[str]:
    """Connect to ``address``, send bytes that are not HTTP; the hosts the record names."""
    flow = guest.connect(address, 80)
    flow.send(b"SSH-2.0-OpenSSH_9.2\r\n")
    flow.read_until(lambda f: f.rst or f.fin)
    return [ex.host for ex in driver.recorder.requests]


def test_reset_starts_dns_afresh_with_its_own_cap(driver: NetworkDriver, guest: FakeGuest) -> None:
    """A restore gives the next test the whole name cap, and no name of the test before."""
    driver.configure(NetworkPolicy(allow_hosts=["*.test"]))  # the policy stays over the reset
    names = [f"n{i}.before.test" for i in range(DEFAULT_MAX_NAMES)]
    got = resolve_all(guest, [*names, "over.before.test"])
    # Negative control: before the reset the cap is hit, and an address
    # tells whoever connects to it which name it stood for.
    assert sum(isinstance(a, IPv4Address) for a in got.values()) == DEFAULT_MAX_NAMES
    assert got["over.before.test"] == Rcode.REFUSED
    late = got[names[4000]]
    assert isinstance(late, IPv4Address)
    assert raw_flow_host(driver, guest, late) == ["n4000.before.test"]
    assert driver.counters.get("dns.queries", 0) > DEFAULT_MAX_NAMES

    driver.reset()
    assert driver.counters.get("dns.queries", 0) == 0 and driver.recorder.requests == []
    after = resolve_all(guest, ["new.after.test", "n1.before.test", "over.before.test"])
    assert all(isinstance(a, IPv4Address) for a in after.values())  # room again
    # The first address is handed out again, to this test's first name.
    assert after["new.after.test"] == got[names[0]]
    # An address the test before got names nothing now: the record shows the bare address.
    assert raw_flow_host(driver, guest, late) == [str(late)]


def test_dns_and_ping(driver: NetworkDriver, guest: FakeGuest) -> None:
    driver.configure(NetworkPolicy(allow_hosts=["example.com"]))
    query = (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + b"\x07example\x03com\x00"
        + QTYPE_A.to_bytes(2, "big")
        + b"\x00\x01"
    )
    guest.send_ip(GATEWAY_IP, IPPROTO_UDP, UdpDatagram(5353, 53, query).build(GUEST_IP, GATEWAY_IP))
    guest.send_ip(GATEWAY_IP, IPPROTO_ICMP, IcmpEcho(8, 7, 1, b"ping").build())
    deadline = time.monotonic() + WAIT
    udp: list[IPv4Packet] = []
    icmp: list[IPv4Packet] = []
    while not (udp and icmp):
        assert time.monotonic() < deadline
        guest.poll()
        udp += guest.take_ip(IPPROTO_UDP)
        icmp += guest.take_ip(IPPROTO_ICMP)
    answer = parse_udp(udp[0].payload, udp[0].src, udp[0].dst).payload
    assert answer[:2] == b"\x12\x34" and answer[-4:] == bytes([198, 18, 0, 1])
    assert parse_icmp_echo(icmp[0].payload).payload == b"ping"
    assert driver.recorder.requests == []


def test_dns_refuses_and_records_a_name_the_policy_does_not_know(
    driver: NetworkDriver, guest: FakeGuest
) -> None:
    got = resolve_all(guest, ["denied.example"])  # the default policy: deny all
    assert got["denied.example"] == Rcode.NXDOMAIN
    (record,) = driver.recorder.requests
    assert (record.host, record.decision, record.scheme) == ("denied.example", "denied", "dns")
    assert "[rule: dns]" in record.reason and "allow_hosts is empty" in record.reason


def test_close_is_idempotent_and_removes_the_socket(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    d = NetworkDriver(tmp_path / "n.sock", ca=ca)
    assert d.socket_path.exists()
    d.close()
    d.close()
    assert not d.socket_path.exists()
    d.reset()  # a no-op once closed


def test_large_response_is_paced_by_the_guest_window(
    driver: NetworkDriver, guest: FakeGuest
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: four times the stack's per-flow send buffer
    recorder = Recorder()
    recorder.stub("GET", "http://big.test/", body=body)
    driver.configure(NetworkPolicy(), None, recorder)
    response = get(guest.connect(SYNTH, 80), "big.test")
    assert response.endswith(body)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"slow")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_requests_wait_for_a_free_upstream_worker(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = NetworkDriver(tmp_path / "s.sock", ca=ca, mtu=1500, limits=DriverLimits(upstream_workers=1))
    g = FakeGuest(d.socket_path)
    try:
        assert d.wait_connected(WAIT)
        allow_upstream(d, server.server_address[1])
        flows = [g.connect(SYNTH, 80) for _ in range(3)]
        started = time.monotonic()
        for flow in flows:
            flow.send(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        for flow in flows:
            assert flow.read_until(response_complete).endswith(b"slow")
        assert time.monotonic() - started >= 0.85  # one at a time: 3 x 0.3 s
        assert d.recorder.get_requests(host="api.test") and len(d.recorder.requests) == 3
    finally:
        g.close()
        d.close()
        server.shutdown()
        server.server_close()


_FLAGS = st.integers(min_value=0, max_value=0xFF)


def _tcp_frames() -> st.SearchStrategy[bytes]:
    def build(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
        seg = TcpSegment(sport, dport, seq, ack, flags, 65535, payload, TcpOptions(mss=1460))
        packet = IPv4Packet(GUEST_IP, SYNTH, IPPROTO_TCP, seg.build(GUEST_IP, SYNTH)).build()
        return EthernetFrame(GATEWAY_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet).build()

    return st.builds(
        build,
        st.sampled_from([40000, 40001]),
        st.sampled_from([80, 443, 22]),
        st.sampled_from([1000, 1001, 0]),
        st.integers(min_value=0, max_value=2**32 - 1),
        _FLAGS,
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"\x16\x03\x01\x00"]),
        ),
    )


def test_random_frames_never_kill_the_loop(tmp_path: Path, ca: CertificateAuthority) -> None:
    d = NetworkDriver(tmp_path / "f.sock", ca=ca, mtu=1500)
    g = FakeGuest(d.socket_path)
    try:
        assert d.wait_connected(WAIT)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.one_of(st.binary(max_size=120), _tcp_frames()), max_size=8))
        def send(frames: list[bytes]) -> None:
            for frame in frames:
                g.send_raw(encode_frame(frame))
            g.frames.clear()

        send()
        g.next_port = 50000  # clear of the ports the random frames used
        recorder = Recorder()
        recorder.stub("GET", "http://after.test/", body=b"alive")
        d.configure(NetworkPolicy(), None, recorder)
        assert get(g.connect(SYNTH, 80), "after.test").endswith(b"alive")
        assert d.counters.get("driver.loop-errors", 0) == 0
        assert d.counters.get("driver.flow-errors", 0) == 0
    finally:
        g.close()
        d.close()
