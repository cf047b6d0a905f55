"""Raw TCP streams in the NetworkDriver, driven by a fake guest: bounds and endings.

Real sockets on the host side (a TCP server on 127.0.0.1), the fake guest
of ``test_driver`` on the link; limits shrunk so the bounds show in
milliseconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.driver import NetworkDriver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow
from pytest_gondolin.netpolicy.limits import DriverLimits

from .test_driver import WAIT, FakeGuest, resolve_all


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def sink() -> Iterator[tuple[int, list[socket.socket]]]:
    """A server that accepts and never reads (with a small receive buffer: it fills fast)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before listen()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], held
    listener.close()
    for conn in held:
        conn.close()


def _driver(tmp_path: Path, ca: CertificateAuthority, **limits: object) -> NetworkDriver:
    return NetworkDriver(tmp_path / "net.sock", ca=ca, mtu=1500, limits=DriverLimits(**limits))  # type: ignore[arg-type]


def _ended(driver: NetworkDriver) -> TcpFlow:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        flows = driver.recorder.tcp_flows
        if flows and not flows[0].open:
            return flows[0]
        time.sleep(0.01)
    raise AssertionError(f"no ended stream: {driver.recorder.tcp_flows}")


def _service(driver: NetworkDriver, port: int) -> tuple[FakeGuest, IPv4Address]:
    driver.configure(NetworkPolicy(tcp={"db.test:5432": f"127.0.0.1:{port}"}))
    guest = FakeGuest(driver.socket_path)
    assert driver.wait_connected(WAIT)
    address = resolve_all(guest, ["db.test"])["db.test"]
    assert isinstance(address, IPv4Address)
    return guest, address


def test_a_silent_stream_is_reset_after_the_idle_timeout(
    tmp_path: Path, ca: CertificateAuthority, sink: tuple[int, list[socket.socket]]
) -> None:
    with _driver(tmp_path, ca, stream_idle_timeout=0.3) as driver:
        guest, address = _service(driver, sink[0])
        flow = guest.connect(address, 5432)
        assert not flow.rst
        flow.read_until(lambda f: f.rst, timeout=WAIT)
        ended = _ended(driver)
        assert ended.ended == "idle-timeout" and ended.duration is not None
        assert 0.3 <= ended.duration < WAIT
        guest.close()


def test_a_stream_past_its_byte_cap_is_reset(
    tmp_path: Path, ca: CertificateAuthority, sink: tuple[int, list[socket.socket]]
) -> None:
    with _driver(tmp_path, ca, stream_max_bytes=10_000) as driver:
        guest, address = _service(driver, sink[0])
        flow = guest.connect(address, 5432)
        flow.send(b"x" * 20_000)
        flow.read_until(lambda f: f.rst)
        ended = _ended(driver)
        assert ended.ended == "size-limit" and 10_000 < ended.bytes_from_guest <= 20_000
        guest.close()


def test_a_service_that_never_reads_holds_only_a_bounded_buffer(
    tmp_path: Path, ca: CertificateAuthority, sink: tuple[int, list[socket.socket]]
) -> None:
    # The guest pushes 16 MiB at a target that never reads; the host takes
    # what the kernel's socket buffers, its stream buffer and the stack's
    # window hold, then the guest's window stays shut.
    with _driver(tmp_path, ca, stream_buffer=64 * 1024) as driver:
        guest, address = _service(driver, sink[0])
        flow = guest.connect(address, 5432)
        guest.sock.settimeout(WAIT)  # the driver reads the link at its own pace under load
        flow.send(b"y" * (16 << 20))
        guest.sock.settimeout(0.05)
        guest.sync()
        time.sleep(0.2)
        guest.sync()
        held = driver.counters.get("tcp.zero-window-drops", 0) + driver.counters.get(
            "tcp.unacceptable", 0
        )
        assert held > 0, driver.counters  # the stack refused what did not fit
        assert driver.recorder.tcp_flows[0].open  # the stream lives on, stalled
        # Another service flow of the same guest still works.
        other = guest.connect(address, 5432)
        assert not other.rst
        guest.close()


def test_a_refused_target_refuses_the_guest(tmp_path: Path, ca: CertificateAuthority) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with _driver(tmp_path, ca) as driver:
        guest, address = _service(driver, closed)
        flow = guest.connect(address, 5432)
        assert flow.rst  # the held SYN was answered with RST
        assert _ended(driver).ended == "refused-by-target: ECONNREFUSED"
        guest.close()


def test_forward_is_on_loopback_and_ends_with_the_driver(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    driver = _driver(tmp_path, ca, max_forwards=2)
    taken = socket.create_server(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    with pytest.raises(NetworkPolicyError, match=f"cannot listen on 127.0.0.1:{busy}"):
        driver.forward(9000, busy)
    taken.close()
    port = driver.forward(8000)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
        pass
    driver.forward(8001)
    with pytest.raises(ConfigError, match="max_forwards"):
        driver.forward(8002)
    driver.reset()  # a restore closes every forward
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    driver.close()


def test_forwarded_connections_past_the_cap_are_closed_at_once(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    # A guest that never answers the host's SYNs: each connection waits in
    # SYN-SENT and holds a slot; past max_ingress_connections a client is
    # closed at once instead of holding host state.
    with _driver(tmp_path, ca, max_ingress_connections=3) as driver:
        guest = FakeGuest(driver.socket_path)
        assert driver.wait_connected(WAIT)
        port = driver.forward(8000)
        clients = []
        for _ in range(5):
            with contextlib.suppress(ConnectionResetError):  # a late one may be closed that fast
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        deadline = time.monotonic() + WAIT
        while driver.counters.get("driver.streams.ingress-refused", 0) < 2:
            assert time.monotonic() < deadline, driver.counters
            time.sleep(0.01)
        assert driver.counters["driver.streams.ingress"] == 3
        assert len(driver.recorder.tcp_flows) == 3
        for waiting in clients[:3]:  # still held open, waiting for the guest
            waiting.settimeout(0.2)
            with pytest.raises(TimeoutError):
                waiting.recv(1)
        for late in clients[3:]:
            with contextlib.suppress(ConnectionResetError):
                assert late.recv(1) == b""
        for client in clients:
            client.close()
        guest.close()
