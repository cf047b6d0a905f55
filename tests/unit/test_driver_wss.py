"""``wss://`` through the real driver, without a VM: a fake guest speaks TLS over the userspace stack.

The guest side is a client ``ssl.SSLObject`` trusting the driver's CA,
its records carried by the fake guest's TCP flow; the upstream a TLS
``websockets`` echo server on 127.0.0.1 with its own test CA
(``upstream_ca``). Hostile input: a guest that breaks its TLS session
after the upgrade costs that stream only.
"""

from __future__ import annotations

import base64
import os
import ssl
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from pytest_gondolin.netpolicy.driver import NetworkDriver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow

from .test_driver import WAIT, FakeGuest, GuestFlow, resolve_all


class GuestTlsClient:
    """The guest's TLS client over one fake-guest flow."""

    def __init__(self, flow: GuestFlow, ca: CertificateAuthority) -> None:
        context = ssl.create_default_context(cadata=ca.ca_pem.decode())
        self.flow = flow
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="ws.test")
        self._seen = 0
        self.plain = bytearray()
        self.closed = False

    def _exchange(self) -> None:
        if self._out.pending:
            self.flow.send(self._out.read())
        self.flow.pump()
        if len(self.flow.data) > self._seen:
            self._in.write(bytes(self.flow.data[self._seen :]))
            self._seen = len(self.flow.data)

    def handshake(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                self.tls.do_handshake()
                self._exchange()
                return
            except ssl.SSLWantReadError:
                self._exchange()
        raise TimeoutError("no TLS handshake with the host")

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._exchange()

    def read_until(self, predicate: object) -> bytes:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self._exchange()
            try:
                chunk = self.tls.read(65536)
                self.plain += chunk
                self.closed |= not chunk  # b"": the host's close_notify
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.closed = True
            if callable(predicate) and predicate(bytes(self.plain)):
                return bytes(self.plain)
            if self.flow.rst:
                break
        raise TimeoutError(f"guest TLS: condition not met; got {bytes(self.plain)[:200]!r}")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def wss_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    upstream_ca = CertificateAuthority.create("wss upstream CA")
    ca_file = tmp_path_factory.mktemp("wss") / "ca.pem"
    ca_file.write_bytes(upstream_ca.ca_pem)

    def handler(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(handler, "127.0.0.1", 0, ssl=upstream_ca.ssl_context_for("ws.test"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1], ca_file
    server.shutdown()
    thread.join(5)


def _ended(driver: NetworkDriver) -> TcpFlow:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        flows = driver.recorder.tcp_flows
        if flows and not flows[0].open:
            return flows[0]
        time.sleep(0.01)
    raise AssertionError(f"no ended stream: {driver.recorder.tcp_flows}")


def _upgraded(
    tmp_path: Path,
    ca: CertificateAuthority,
    upstream: tuple[int, Path],
    *,
    then: bytes = b"",
) -> tuple[NetworkDriver, FakeGuest, GuestTlsClient]:
    """A driver, its fake guest and a ``wss://`` session past the 101.

    ``then``: raw bytes the guest sends right behind its upgrade request,
    before the 101 (its first records); the 101 is then not awaited.
    """
    port, ca_file = upstream
    driver = NetworkDriver(tmp_path / "net.sock", ca=ca, mtu=1500)
    driver.configure(
        NetworkPolicy(
            allow_hosts=["ws.test"],
            resolve={"ws.test:443": f"127.0.0.1:{port}"},
            upstream_ca=str(ca_file),
        )
    )
    guest = FakeGuest(driver.socket_path)
    assert driver.wait_connected(WAIT)
    address = resolve_all(guest, ["ws.test"])["ws.test"]
    assert isinstance(address, IPv4Address)
    flow = guest.connect(address, 443)
    client = GuestTlsClient(flow, ca)
    client.handshake()
    key = base64.b64encode(os.urandom(16)).decode()
    client.send(
        (
            "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    if then:
        flow.send(then)
        return driver, guest, client
    head = client.read_until(lambda data: b"\r\n\r\n" in data)
    assert head.startswith(b"HTTP/1.1 101 "), head
    client.plain.clear()
    return driver, guest, client


def test_a_wss_session_is_relayed_through_both_tls_sessions(
    tmp_path: Path, ca: CertificateAuthority, wss_upstream: tuple[int, Path]
) -> None:
    driver, guest, client = _upgraded(tmp_path, ca, wss_upstream)
    with driver:
        (handshake,) = driver.recorder.requests
        assert (handshake.status, handshake.url) == (101, "https://ws.test/chat")
        payload = b"x" * 3000  # a frame bigger than one TCP segment
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        client.send(b"\x82\xfe" + len(payload).to_bytes(2, "big") + mask + masked)
        echo = client.read_until(lambda data: len(data) >= 4 + len(payload))
        assert echo == b"\x82\x7e" + len(payload).to_bytes(2, "big") + payload
        client.plain.clear()
        client.send(b"\x88\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\x03\xe8")))
        client.read_until(lambda data: data.startswith(b"\x88\x02\x03\xe8"))
        # The server closes after the close frames: the guest gets close_notify,
        # then the FIN; its own FIN ends the stream.
        client.read_until(lambda _data: client.closed)
        client.flow.read_until(lambda f: f.fin)
        client.flow.send(b"", fin=True)
        ended = _ended(driver)
        assert (ended.kind, ended.name, ended.port) == ("websocket", "ws.test", 443)
        assert ended.bytes_from_guest == (8 + 3000) + (6 + 2)  # frames, not TLS records
        assert ended.bytes_to_guest == (4 + 3000) + (2 + 2)
        assert ended.ended == "closed"
        guest.close()


def test_a_guest_that_breaks_its_tls_after_the_upgrade_costs_its_stream_only(
    tmp_path: Path, ca: CertificateAuthority, wss_upstream: tuple[int, Path]
) -> None:
    driver, guest, client = _upgraded(tmp_path, ca, wss_upstream)
    with driver:
        # An application-data record that does not authenticate.
        client.flow.send(b"\x17\x03\x03\x00\x20" + os.urandom(32))
        client.flow.read_until(lambda f: f.rst)
        assert _ended(driver).ended == "guest-tls-error"
        # The driver lives on: the next session works.
        flow = guest.connect(resolve_all(guest, ["ws.test"])["ws.test"], 443)  # type: ignore[arg-type]
        second = GuestTlsClient(flow, ca)
        second.handshake()
        assert second.tls.version() is not None
        guest.close()


def test_a_guest_whose_first_records_are_broken_costs_its_stream_only(
    tmp_path: Path, ca: CertificateAuthority, wss_upstream: tuple[int, Path]
) -> None:
    # The bad record arrives with the upgrade request, before the server's 101:
    # the session that takes the flow over finds it at once.
    bad = b"\x17\x03\x03\x00\x20" + os.urandom(32)
    driver, guest, client = _upgraded(tmp_path, ca, wss_upstream, then=bad)
    with driver:
        client.flow.read_until(lambda f: f.rst)
        assert _ended(driver).ended == "guest-tls-error"
        (handshake,) = driver.recorder.requests
        assert handshake.status == 101
        guest.close()
