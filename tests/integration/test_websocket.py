"""WebSocket through the host's mediation, with a real guest and a real server.

The server is the ``websockets`` library on the host's 127.0.0.1; the
guest's client is a stdlib-only RFC 6455 client (socket + handshake +
masked frames). Negative controls: a host not allowed, a handshake with a
secret, ``wss://``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.secrets import Secret
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow
from pytest_gondolin.vm.machine import VM

RECORD_WAIT = 30.0


@dataclass
class EchoServer:
    port: int
    paths: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def echo_server() -> Iterator[EchoServer]:
    state = EchoServer(0)

    def handler(ws: ServerConnection) -> None:
        state.paths.append(ws.request.path if ws.request is not None else "?")
        for message in ws:
            ws.send(f"echo: {message}" if isinstance(message, str) else message)

    server: Server = serve(handler, "127.0.0.1", 0)
    state.port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    thread.join(5)


#: A stdlib RFC 6455 client: handshake, one masked text frame per argument,
#: a close frame; prints the status line, each echo and the close code.
CLIENT = r"""
import base64, os, socket, struct, sys

def frame(opcode, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else \
        struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    return head + mask + masked

def read_frame(f):
    b1, b2 = f.read(2)
    n = b2 & 0x7F
    if n == 126:
        n = struct.unpack("!H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", f.read(8))[0]
    return b1 & 0x0F, f.read(n)

host, path = sys.argv[1], sys.argv[2]
s = socket.create_connection((host, 80), timeout=30)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
           "Sec-WebSocket-Version: 13\r\n" + "".join(a + "\r\n" for a in sys.argv[4:]) +
           "\r\n").encode())
f = s.makefile("rb")
status = f.readline().decode().split()[1]
while f.readline() not in (b"\r\n", b""):
    pass
print(status)
if status == "101":
    for text in sys.argv[3].split(","):
        s.sendall(frame(1, text.encode()))
        print(read_frame(f)[1].decode())
    s.sendall(frame(8, struct.pack("!H", 1000)))
    opcode, payload = read_frame(f)
    print("close", struct.unpack("!H", payload[:2])[0])
"""


def _ws(vm: VM, host: str, path: str, texts: str, *headers: str) -> list[str]:
    r = vm.exec(["python3", "-c", CLIENT, host, path, texts, *headers], timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _final_flows(vm: VM) -> list[TcpFlow]:
    assert vm.http is not None
    deadline = time.monotonic() + RECORD_WAIT
    while True:
        flows = vm.http.tcp_flows
        if flows and not any(f.open for f in flows):
            return flows
        if time.monotonic() > deadline:
            raise AssertionError(f"streams not final after {RECORD_WAIT} s: {flows}")
        time.sleep(0.05)


def _policy(port: int, **extra: object) -> NetworkPolicy:
    return NetworkPolicy(
        allow_hosts=["ws.test"],
        resolve={"ws.test:80": f"127.0.0.1:{port}", "ws.test:443": f"127.0.0.1:{port}"},
        **extra,  # type: ignore[arg-type]
    )


def test_websocket_echo_is_mediated_and_recorded(vm: VM, echo_server: EchoServer) -> None:
    recorder = vm.configure_network(_policy(echo_server.port))
    out = _ws(vm, "ws.test", "/chat?room=1", "hello,world," + "x" * 1000)
    assert out == ["101", "echo: hello", "echo: world", "echo: " + "x" * 1000, "close 1000"]
    assert echo_server.paths[-1] == "/chat?room=1"
    (exchange,) = recorder.requests
    assert (exchange.status, exchange.decision, exchange.path) == (101, "allowed", "/chat")
    assert exchange.response_header("sec-websocket-accept")
    (flow,) = _final_flows(vm)
    assert (flow.kind, flow.name, flow.port) == ("websocket", "ws.test", 80)
    assert flow.target == f"127.0.0.1:{echo_server.port}"
    # Masked client frames (6-8 bytes of header each) and the close frame;
    # unmasked echoes ("echo: " added) and the server's close frame.
    assert flow.bytes_from_guest == (6 + 5) + (6 + 5) + (8 + 1000) + (6 + 2)
    assert flow.bytes_to_guest == (2 + 11) + (2 + 11) + (4 + 1006) + (2 + 2)
    assert flow.ended == "closed"


def test_websocket_to_a_host_not_allowed_is_denied(vm: VM, echo_server: EchoServer) -> None:
    assert vm.http is not None
    seen = len(echo_server.paths)
    assert _ws(vm, "ws.test", "/chat", "hello") == ["403"]
    (exchange,) = vm.http.requests
    assert exchange.decision == "denied" and "default-deny" in exchange.reason
    assert vm.http.tcp_flows == [] and len(echo_server.paths) == seen


def test_websocket_handshake_with_a_secret_is_refused(vm: VM, echo_server: EchoServer) -> None:
    policy = _policy(echo_server.port, secrets={"TOKEN": Secret(value="s3cret", hosts=["ws.test"])})
    recorder = vm.configure_network(policy)
    placeholder = vm.secret_env()["TOKEN"]
    seen = len(echo_server.paths)
    out = _ws(vm, "ws.test", "/chat", "hello", f"Authorization: Bearer {placeholder}")
    assert out == ["403"]
    (exchange,) = recorder.requests
    assert exchange.decision == "denied" and "[rule: websocket]" in exchange.reason
    assert "cannot redact the frames" in exchange.reason
    assert len(echo_server.paths) == seen


def test_websocket_over_tls_is_refused_with_a_reason(vm: VM, echo_server: EchoServer) -> None:
    recorder = vm.configure_network(_policy(echo_server.port))
    r = vm.exec(
        "curl -s -H 'Upgrade: websocket' -H 'Connection: Upgrade' "
        "-H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "
        "https://ws.test/chat",
        timeout=60,
    )
    assert "wss://" in r.stdout and "not mediated" in r.stdout, r.stdout
    (exchange,) = recorder.requests
    assert exchange.status == 403 and "[rule: websocket]" in exchange.reason
