"""A hostile guest against WebSocket upgrades, named TCP services and forwards, in a real VM.

Each attack comes with its control: the same server or service reached the
way the policy allows. Host-side measurements (descriptors, threads) are
taken around a VM this module creates and closes itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.secrets import Secret
from pytest_gondolin.vm import ioloop
from pytest_gondolin.vm.machine import VM

#: A guest handshake: prints the status line's code, then what followed the head.
HANDSHAKE = r"""
import socket, sys
host, upgrade = sys.argv[1], sys.argv[2]
s = socket.create_connection((host, 80), timeout=60)
s.sendall((f"GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: {upgrade}\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
f = s.makefile("rb")
print(f.readline().decode().split()[1])
"""


@dataclass
class Switcher:
    """A host server answering every request head with a 101 to ``protocol``, then ``after``."""

    port: int = 0
    protocol: str = "h2c"
    after: bytes = b""
    heads: list[bytes] = field(default_factory=list)


@pytest.fixture
def switcher() -> Iterator[Switcher]:
    state = Switcher()
    listener = socket.create_server(("127.0.0.1", 0))
    state.port = listener.getsockname()[1]
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            head = b""
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            state.heads.append(head)
            conn.sendall(
                f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {state.protocol}\r\n"
                "Connection: Upgrade\r\n\r\n".encode()
                + state.after
            )

    threading.Thread(target=serve, daemon=True).start()
    yield state
    listener.close()
    for conn in conns:
        conn.close()


def _status(vm: VM, host: str, upgrade: str) -> str:
    r = vm.exec(["python3", "-c", HANDSHAKE, host, upgrade], timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_an_upgrade_cannot_open_another_protocol_or_reach_a_secret_s_host(
    vm: VM, switcher: Switcher
) -> None:
    policy = NetworkPolicy(
        allow_hosts=["ws.test"], resolve={"ws.test:80": f"127.0.0.1:{switcher.port}"}
    )
    recorder = vm.configure_network(policy)
    # The guest offers h2c too and the server picks it: an opaque HTTP/2
    # session would bypass the policy and the record. 502, nothing relayed.
    assert _status(vm, "ws.test", "h2c, websocket") == "502"
    (head,) = switcher.heads
    assert b"\r\nUpgrade: websocket\r\n" in head and b"h2c" not in head
    assert "switched to 'h2c'" in recorder.requests[0].reason
    assert recorder.tcp_flows == []
    # Control: the same server switching to websocket is relayed.
    switcher.protocol = "websocket"
    assert _status(vm, "ws.test", "websocket") == "101"
    assert len(recorder.tcp_flows) == 1

    # A secret bound to ws.test: a server holding its value could send it in a
    # frame the host cannot redact, so no session, even without the placeholder.
    secret = Secret(value="s3cret-from-earlier", hosts=["ws.test"])
    recorder = vm.configure_network(
        NetworkPolicy(
            allow_hosts=["ws.test"],
            resolve={"ws.test:80": f"127.0.0.1:{switcher.port}"},
            secrets={"TOKEN": secret},
        )
    )
    seen = len(switcher.heads)
    assert _status(vm, "ws.test", "websocket") == "403"
    (exchange,) = recorder.requests
    assert "[rule: websocket]" in exchange.reason and "TOKEN" in exchange.reason
    assert len(switcher.heads) == seen and recorder.tcp_flows == []


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


#: Opens ``n`` connections to a service at once, holds them, writes to each.
STORM = r"""
import socket, sys, time
ip, n = socket.gethostbyname("db.test"), int(sys.argv[1])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((ip, 5432))
    except BlockingIOError:
        pass
    except OSError:
        continue
    socks.append(s)
time.sleep(8)
ok = 0
for s in socks:
    try:
        s.send(b"x" * 1000)
        ok += 1
    except OSError:
        pass
print(ok)
"""


def test_a_connection_storm_costs_a_bounded_number_of_host_sockets_and_nothing_after_close(
    vm_factory: object,
) -> None:
    accepted: list[socket.socket] = []
    sink = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def serve() -> None:  # accepts and never reads
        while True:
            try:
                accepted.append(sink.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    ioloop.loop()  # the process's shared asyncio loop: up before the baseline, not counted
    before_threads = {t.name for t in threading.enumerate()}
    baseline = _fds()
    vm = vm_factory(tcp={"db.test:5432": f"127.0.0.1:{sink.getsockname()[1]}"})  # type: ignore[operator]
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _fds())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        port = vm.forward(8000)
        r = vm.exec(["python3", "-c", STORM, "1000"], timeout=300)
        assert r.returncode == 0, r.stderr
        served = int(r.stdout)
    finally:
        stop.set()
        sampler.join(5)
    # The stack's flow cap (256) bounds the host sockets one guest can hold;
    # the VM's own (QEMU, channels, overlay) add a few dozen.
    assert 0 < served <= 256, served
    assert len(accepted) <= 256
    # ``accepted`` are the sink's ends, in this process too (it only grows).
    assert peak - baseline - len(accepted) <= 256 + 64, (peak, baseline, len(accepted))
    assert vm.exec("echo alive").stdout == "alive\n"

    vm.close()
    with pytest.raises(ConnectionRefusedError):  # the forward's port is closed with the VM
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for conn in accepted:  # the relay closed its side of every stream
        conn.settimeout(5)
        try:
            while conn.recv(65536):
                pass
        except ConnectionResetError:
            pass
        conn.close()
    sink.close()
    deadline = time.monotonic() + 30
    while True:
        extra = {t.name for t in threading.enumerate()} - before_threads
        leftover = _fds() - baseline
        if (not extra and leftover <= 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not extra, f"threads left after close: {sorted(extra)}"
    # The sink's listener was counted in the baseline and is closed now.
    assert leftover <= 0, f"{leftover} descriptors left after close"
