"""Raw TCP streams with a real guest: named TCP services (``tcp=``) and ``vm.forward``.

Each test talks to a real server: a TCP server the test starts on the
host's 127.0.0.1 for services, ``python3 -m http.server`` in the guest for
ingress. Negative controls: names and ports not in ``tcp`` stay cut, a
refused target is refused in the guest, a forward is on loopback only.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow
from pytest_gondolin.vm.machine import VM

#: Bounded waits: a stream's record is final a moment after the guest's
#: program exits (the last FIN crosses the host loop); TCG is slow.
RECORD_WAIT = 30.0
SERVER_WAIT = 60.0


@dataclass
class HostServer:
    """A TCP server on the host: reads to EOF, answers the bytes upper-cased, closes."""

    port: int
    received: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def host_server() -> Iterator[HostServer]:
    listener = socket.create_server(("127.0.0.1", 0))
    server = HostServer(listener.getsockname()[1])
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            data = b"".join(chunks)
            server.received.append(data)
            conn.sendall(data.upper())  # after the guest's half-close: half-close relayed

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(5)
    listener.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tcp_vm(vm_factory: VMFactory, host_server: HostServer) -> VM:
    return vm_factory(
        tcp={
            "db.test:5432": f"127.0.0.1:{host_server.port}",
            "gone.test:6379": f"localhost:{_closed_port()}",
        }
    )


def _final_flows(vm: VM, count: int) -> list[TcpFlow]:
    assert vm.http is not None
    deadline = time.monotonic() + RECORD_WAIT
    while True:
        flows = vm.http.tcp_flows
        if len(flows) >= count and not any(f.open for f in flows):
            return flows
        if time.monotonic() > deadline:
            raise AssertionError(f"streams not final after {RECORD_WAIT} s: {flows}")
        time.sleep(0.05)


CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"hello gondolin " * 4000)
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(len(data), data[:15].decode())
"""


def test_guest_reaches_a_named_tcp_service(tcp_vm: VM, host_server: HostServer) -> None:
    assert tcp_vm.http is not None
    tcp_vm.http.clear()
    host_server.received.clear()
    r = tcp_vm.exec(["python3", "-c", CLIENT, "db.test", "5432"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["60000", "HELLO", "GONDOLIN"]
    assert host_server.received == [b"hello gondolin " * 4000]
    (flow,) = _final_flows(tcp_vm, 1)
    assert (flow.kind, flow.name, flow.port) == ("tcp", "db.test", 5432)
    assert flow.target == f"127.0.0.1:{host_server.port}"
    assert (flow.bytes_from_guest, flow.bytes_to_guest) == (60000, 60000)
    assert flow.ended == "closed" and flow.duration is not None and flow.duration > 0
    assert tcp_vm.http.requests == []  # a stream is not an HTTP exchange


RAW = """
import socket, sys
for target in sys.argv[1:]:
    name, port = target.split(":")
    try:
        s = socket.create_connection((name, int(port)), timeout=20)
        s.sendall(b"\\x00\\x01not http\\r\\n")
        print(target, s.recv(100) or "eof")
    except ConnectionRefusedError:
        print(target, "refused")
    except ConnectionResetError:
        print(target, "reset")
    except socket.gaierror:
        print(target, "nxdomain")
"""


def test_other_names_and_ports_stay_denied(tcp_vm: VM, host_server: HostServer) -> None:
    assert tcp_vm.http is not None
    tcp_vm.http.clear()
    host_server.received.clear()
    targets = ["db.test:5433", "other.test:5432", "gone.test:6379"]
    r = tcp_vm.exec(["python3", "-c", RAW, *targets], timeout=120)
    assert r.stdout.splitlines() == [
        "db.test:5433 reset",  # a name tcp= knows, on another port: not HTTP, cut
        "other.test:5432 nxdomain",  # a name nothing names: the guest cannot even look it up
        "gone.test:6379 refused",  # the target refused: so does the guest's connect
    ], r.stderr
    assert host_server.received == []
    (refused,) = _final_flows(tcp_vm, 1)
    assert refused.name == "gone.test" and refused.ended == "refused-by-target: ECONNREFUSED"
    denied = tcp_vm.http.get_requests(method="")
    assert sorted((ex.host, ex.port, ex.scheme) for ex in denied) == [
        ("db.test", 5433, ""),
        ("other.test", 53, "dns"),
    ]
    assert all(ex.decision == "denied" for ex in denied)


def test_a_flood_to_a_service_that_never_reads_costs_its_stream_only(vm: VM) -> None:
    # The target accepts and never reads: the guest's writes stall (its TCP
    # window closes) instead of filling the host, and the VM stays usable.
    sink = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(sink.accept()[0]), daemon=True).start()
    try:
        vm.configure_network(
            NetworkPolicy(tcp={"sink.test:9": f"127.0.0.1:{sink.getsockname()[1]}"})
        )
        flood = (
            "import socket\n"
            "s = socket.create_connection(('sink.test', 9), timeout=30)\n"
            "s.settimeout(5)\n"
            "sent = 0\n"
            "try:\n"
            "    while sent < 256 * 1024 * 1024:\n"
            "        sent += s.send(b'x' * 65536)\n"
            "except TimeoutError:\n"
            "    pass\n"
            "print(sent)\n"
        )
        r = vm.exec(["python3", "-c", flood], timeout=120)
        sent = int(r.stdout)
        # Guest socket buffers + the stack's window + the relay's buffer + the
        # host's kernel buffers: a few MiB at most, far below what it tried.
        assert 0 < sent < 32 * 1024 * 1024, sent
        assert vm.exec("echo alive").stdout == "alive\n"
    finally:
        for conn in held:
            conn.close()
        sink.close()


def test_bad_tcp_entries_fail_early_naming_them(vm_factory: VMFactory) -> None:
    for bad, needle in [
        ({"db.test": "127.0.0.1:5432"}, "needs a port"),
        ({"db.test:0": "127.0.0.1:5432"}, "invalid port"),
        ({"db.test:70000": "127.0.0.1:5432"}, "invalid port"),
        ({"db.test:5432": "127.0.0.1:70000"}, "invalid port"),
        ({"db.test:5432": 5432}, "must be an 'addr:port' string"),
        ({"db.test:5432": "db.internal:5432"}, "must be an IP address"),
        ({5432: "127.0.0.1:5432"}, "must be a 'name:port' string"),
        ("db.test:5432", "expected a dict"),
    ]:
        with pytest.raises(ConfigError, match=needle) as info:
            vm_factory(tcp=bad)
        assert str(info.value).startswith("vm_factory: tcp")


# --------------------------------------------------------------------------- ingress


def _get(url: str) -> bytes:
    deadline = time.monotonic() + SERVER_WAIT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                body: bytes = response.read()
                return body
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the guest's server is still starting


def test_forward_reaches_a_server_in_the_guest(vm: VM) -> None:
    vm.write_file("/srv/www/hello.txt", "hello from the guest\n")
    server = vm.spawn(["python3", "-m", "http.server", "8000", "-d", "/srv/www"])
    try:
        port = vm.forward(8000)
        assert _get(f"http://127.0.0.1:{port}/hello.txt") == b"hello from the guest\n"
        big = vm.exec("head -c 3000000 /dev/urandom > /srv/www/big.bin && md5sum /srv/www/big.bin")
        body = _get(f"http://127.0.0.1:{port}/big.bin")
        assert hashlib.md5(body).hexdigest() == big.stdout.split()[0]
        flows = [f for f in _final_flows(vm, 2) if f.bytes_to_guest]
        shown = "\n".join(f.summary() for f in flows)
        assert all((f.kind, f.name, f.port) == ("ingress", "guest", 8000) for f in flows), shown
        assert all(f.target == f"127.0.0.1:{port}" and f.ended == "closed" for f in flows), shown
        assert max(f.bytes_from_guest for f in flows) > 3_000_000, shown
        # Loopback only: the port is not open on the host's other addresses.
        outward = "127.0.0.1"
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
            contextlib.suppress(OSError),
        ):
            probe.connect(("192.0.2.1", 9))  # no packet sent: picks the outward address
            outward = probe.getsockname()[0]
        if not outward.startswith("127."):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outward, port), timeout=10).close()
        # A guest port nothing listens on: the client's connection is reset.
        closed = vm.forward(8001)
        # (A reset that fast may already fail the connect() itself.)
        with (
            contextlib.suppress(ConnectionResetError),
            socket.create_connection(("127.0.0.1", closed), timeout=30) as s,
        ):
            assert s.recv(10) == b""
        refused = [f for f in _final_flows(vm, 3) if f.port == 8001]
        assert [f.ended for f in refused] == ["refused-by-guest"], (
            vm.http.tcp_flows if vm.http else None
        )
    finally:
        server.kill()
        server.close()


def test_forward_rejects_bad_ports(vm: VM) -> None:
    for guest_port, host_port in [(0, 0), (70000, 0), (80, -1), ("80", 0), (True, 0)]:
        with pytest.raises(ConfigError, match=r"forward: (guest|host)_port"):
            vm.forward(guest_port, host_port)  # type: ignore[arg-type]
