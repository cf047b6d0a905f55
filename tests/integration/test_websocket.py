"""WebSocket through the host's mediation, with a real guest and a real server.

The server is the ``websockets`` library on the host's 127.0.0.1; the
guest's client is a stdlib-only RFC 6455 client (socket + handshake +
masked frames), over TLS for ``wss://`` (the guest trusts the host's CA;
the host verifies the server with a test CA given as ``upstream_ca``).
Negative controls: a host not allowed, a handshake with a secret, a port
not allowed, an upstream the trust does not cover.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.secrets import Secret
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow
from pytest_gondolin.vm.machine import VM

RECORD_WAIT = 30.0


@dataclass
class EchoServer:
    port: int
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    ca_file: Path | None = None  # TLS servers: the CA that signed their ws.test certificate


def _serve(state: EchoServer, ssl_context: ssl.SSLContext | None = None) -> Iterator[EchoServer]:
    def handler(ws: ServerConnection) -> None:
        request = ws.request
        state.paths.append(request.path if request is not None else "?")
        state.headers.append(dict(request.headers) if request is not None else {})
        for message in ws:
            ws.send(f"echo: {message}" if isinstance(message, str) else message)

    server: Server = serve(handler, "127.0.0.1", 0, ssl=ssl_context)
    state.port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    thread.join(5)


@pytest.fixture(scope="module")
def echo_server() -> Iterator[EchoServer]:
    yield from _serve(EchoServer(0))


@pytest.fixture(scope="module")
def wss_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    """The echo server over TLS, with a ``ws.test`` certificate from its own test CA."""
    ca = CertificateAuthority.create("wss upstream test CA")
    ca_file = tmp_path_factory.mktemp("wss") / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    yield from _serve(EchoServer(0, ca_file=ca_file), ca.ssl_context_for("ws.test"))


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
tls = os.environ.get("WS_TLS") == "1"
s = socket.create_connection((host, 443 if tls else 80), timeout=30)
if tls:  # wss://: the guest's system trust holds the host's CA
    import ssl
    s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
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
    f.read()  # RFC 6455 §7.1.1: the server closes the connection first
"""


def _ws(vm: VM, host: str, path: str, texts: str, *headers: str, tls: bool = False) -> list[str]:
    r = vm.exec(
        ["python3", "-c", CLIENT, host, path, texts, *headers],
        env={"WS_TLS": "1" if tls else "0"},
        timeout=120,
    )
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


def test_websocket_to_a_port_not_allowed_is_denied(vm: VM, echo_server: EchoServer) -> None:
    # ws.test is known (the guest resolves it) but allowed on another port only.
    policy = NetworkPolicy(
        allow_hosts=["ws.test:8080"], resolve={"ws.test:8080": f"127.0.0.1:{echo_server.port}"}
    )
    recorder = vm.configure_network(policy)
    seen = len(echo_server.paths)
    assert _ws(vm, "ws.test", "/chat", "hello") == ["403"]
    (exchange,) = recorder.requests
    assert exchange.decision == "denied" and "default-deny" in exchange.reason
    assert recorder.tcp_flows == [] and len(echo_server.paths) == seen


def test_websocket_to_a_name_the_policy_does_not_know_fails_at_dns(
    vm: VM, echo_server: EchoServer
) -> None:
    assert vm.http is not None
    seen = len(echo_server.paths)
    r = vm.exec(["python3", "-c", CLIENT, "ws.test", "/chat", "hello"], timeout=120)
    assert r.returncode != 0 and "gaierror" in r.stderr, r.stderr
    (exchange,) = vm.http.requests
    assert (exchange.host, exchange.decision, exchange.scheme) == ("ws.test", "denied", "dns")
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


def _wss_policy(server: EchoServer, **extra: object) -> NetworkPolicy:
    return _policy(server.port, upstream_ca=str(server.ca_file), **extra)


def test_wss_echo_is_mediated_and_recorded(vm: VM, wss_server: EchoServer) -> None:
    recorder = vm.configure_network(_wss_policy(wss_server))
    out = _ws(vm, "ws.test", "/secure?room=2", "hello,world," + "x" * 1000, tls=True)
    assert out == ["101", "echo: hello", "echo: world", "echo: " + "x" * 1000, "close 1000"]
    assert wss_server.paths[-1] == "/secure?room=2"
    (exchange,) = recorder.requests
    assert (exchange.status, exchange.decision, exchange.scheme) == (101, "allowed", "https")
    assert exchange.url == "https://ws.test/secure?room=2"
    (flow,) = _final_flows(vm)
    assert (flow.kind, flow.name, flow.port) == ("websocket", "ws.test", 443)
    assert flow.target == f"127.0.0.1:{wss_server.port}"
    # Plaintext frames each way, as for ws:// (TLS records are not counted).
    assert flow.bytes_from_guest == (6 + 5) + (6 + 5) + (8 + 1000) + (6 + 2)
    assert flow.bytes_to_guest == (2 + 11) + (2 + 11) + (4 + 1006) + (2 + 2)
    assert flow.ended == "closed"


def test_wss_handshake_with_a_secret_is_refused(vm: VM, wss_server: EchoServer) -> None:
    # As for ws://: after the upgrade the frames cannot be redacted, so the
    # handshake never goes upstream, with the value or the placeholder.
    policy = _wss_policy(wss_server, secrets={"TOKEN": Secret(value="s3cret", hosts=["ws.test"])})
    recorder = vm.configure_network(policy)
    placeholder = vm.secret_env()["TOKEN"]
    seen = len(wss_server.paths)
    out = _ws(vm, "ws.test", "/chat", "hi", f"Authorization: Bearer {placeholder}", tls=True)
    assert out == ["403"]
    (exchange,) = recorder.requests
    assert exchange.decision == "denied" and "[rule: websocket]" in exchange.reason
    assert exchange.request_header("authorization") == f"Bearer {placeholder}"
    assert len(wss_server.paths) == seen and recorder.tcp_flows == []


def test_wss_to_a_port_not_allowed_is_denied(vm: VM, wss_server: EchoServer) -> None:
    # ws.test is known (so the guest resolves it) but only on port 80.
    policy = NetworkPolicy(
        allow_hosts=["ws.test:80"],
        resolve={"ws.test:80": f"127.0.0.1:{wss_server.port}"},
        upstream_ca=str(wss_server.ca_file),
    )
    recorder = vm.configure_network(policy)
    seen = len(wss_server.paths)
    assert _ws(vm, "ws.test", "/chat", "hi", tls=True) == ["403"]
    (exchange,) = recorder.requests
    assert exchange.decision == "denied" and "[rule: default-deny]" in exchange.reason
    assert len(wss_server.paths) == seen and recorder.tcp_flows == []


def test_wss_upstream_outside_the_trust_is_refused(vm: VM, wss_server: EchoServer) -> None:
    # Negative control for the upstream side: without upstream_ca the
    # server's certificate does not verify, and the guest gets a 502.
    recorder = vm.configure_network(_policy(wss_server.port))
    assert _ws(vm, "ws.test", "/chat", "hi", tls=True) == ["502"]
    (exchange,) = recorder.requests
    assert exchange.status == 502 and "certificate verification failed" in exchange.reason
    assert recorder.tcp_flows == []
