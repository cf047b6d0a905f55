"""Bench section ``streams``: WebSocket echo latency (ws://, wss://) and TCP relay throughput.

Real parts only: a ``websockets`` echo server (plain and TLS with its own
test CA) and a TCP sink/source on the host's 127.0.0.1, a stdlib client in
the guest, the host's mediation between them. One VM, restored to its clean
snapshot, for all rows.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.warm import launch_clean

Row = tuple[str, str, str]

#: Megabytes sent each way through the TCP relay.
TCP_MB = 32

#: A stdlib WebSocket client: handshake, then ``n`` round trips of a small
#: masked frame; prints the median round trip in ms.
WS_CLIENT = r"""
import base64, os, socket, statistics, struct, sys, time
host, n, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
s = socket.create_connection((host, 443 if tls else 80), timeout=60)
if tls:
    import ssl
    s = ssl.create_default_context().wrap_socket(s, server_hostname=host)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
f = s.makefile("rb")
assert f.readline().split()[1] == b"101"
while f.readline() not in (b"\r\n", b""):
    pass
payload, mask = b"ping-0123456789", os.urandom(4)
frame = struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + bytes(
    b ^ mask[i % 4] for i, b in enumerate(payload))
samples = []
for _ in range(n + 1):
    t = time.perf_counter()
    s.sendall(frame)
    b1, b2 = f.read(2)
    f.read(b2 & 0x7F)
    samples.append((time.perf_counter() - t) * 1000)
print(f"{statistics.median(samples[1:]):.2f}")
"""

#: Send ``mb`` MiB to the service, half-close, read the answer; print both rates in MB/s.
TCP_CLIENT = r"""
import socket, sys, time
mb = int(sys.argv[1])
s = socket.create_connection(("sink.test", 9000), timeout=120)
chunk = b"x" * 65536
t = time.perf_counter()
for _ in range(mb * 16):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
ack = s.recv(16)
up = time.perf_counter() - t
t = time.perf_counter()
got = len(ack)
while data := s.recv(262144):
    got += len(data)
down = time.perf_counter() - t
assert ack.startswith(b"ok") and got == mb * 1048576, (ack, got)
print(f"{mb * 1.048576 / up:.1f} {mb * 1.048576 / down:.1f}")
"""


def _ws_server(context: ssl.SSLContext | None) -> int:
    def echo(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the client just goes away
            for message in ws:
                ws.send(message)

    server = serve(echo, "127.0.0.1", 0, ssl=context, compression=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.socket.getsockname()[1])


def _tcp_server(mb: int) -> int:
    """Reads to EOF, answers ``ok``, then sends ``mb`` MiB (minus the two bytes) and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def handle(conn: socket.socket) -> None:
        with conn:
            while conn.recv(262144):
                pass
            conn.sendall(b"ok")
            block = b"y" * 1048576
            for _ in range(mb - 1):
                conn.sendall(block)
            conn.sendall(block[:-2])

    def serve_forever() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_forever, daemon=True).start()
    return int(listener.getsockname()[1])


def streams_section(config: VMConfig, n: int) -> list[Row]:
    ca = CertificateAuthority.create("bench wss upstream CA")
    ca_file = Path(tempfile.mkdtemp(prefix="gondolin-bench-streams-")) / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    ws_port = _ws_server(None)
    wss_port = _ws_server(ca.ssl_context_for("ws.test"))
    tcp_port = _tcp_server(TCP_MB)
    policy = NetworkPolicy(
        allow_hosts=["ws.test"],
        resolve={"ws.test:80": f"127.0.0.1:{ws_port}", "ws.test:443": f"127.0.0.1:{wss_port}"},
        upstream_ca=str(ca_file),
        tcp={"sink.test:9000": f"127.0.0.1:{tcp_port}"},
    )
    rows: list[Row] = []
    vm = launch_clean(config, name="bench-streams")
    try:
        vm.configure_network(policy)
        rounds = max(50, n * 5)
        for label, tls in (("ws://", "0"), ("wss://", "1")):
            r = vm.exec(
                ["python3", "-c", WS_CLIENT, "ws.test", str(rounds), tls], timeout=600, check=True
            )
            rows.append(
                (
                    f"WebSocket echo round trip from the guest ({label}, mediated)",
                    f"{float(r.stdout):.1f} ms",
                    f"median of {rounds} small frames on one connection",
                )
            )
        r = vm.exec(["python3", "-c", TCP_CLIENT, str(TCP_MB)], timeout=600, check=True)
        up, down = (float(x) for x in r.stdout.split())
        rows.append(
            (
                "TCP service relay throughput (`tcp=`, guest to host / host to guest)",
                f"{up:.0f} / {down:.0f} MB/s",
                f"{TCP_MB} MiB each way, one connection, stdlib sockets in the guest",
            )
        )
    finally:
        vm.close()
    return rows
