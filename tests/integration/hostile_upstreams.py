"""Local upstream servers that count everything they receive, for the adversarial tests.

A :class:`CountingServer` listens on 127.0.0.1 (or every host address),
counts every TCP connection it accepts and records every HTTP request it
parses (method, path, headers, body). Tests that say "nothing reached the
upstream" assert on ``connections`` -- a smuggled request cannot hide in a
connection that was never opened. ``/redirect?to=<url>`` answers 302 to
``<url>``; every other path echoes the request as JSON.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Seen:
    """One request as the upstream parsed it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Tally:
    """What one server received (appended to from its handler threads)."""

    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]

    def snapshot(self) -> tuple[int, int]:
        """``(connections, requests)`` so far."""
        with self.lock:
            return self.connections, len(self.requests)

    def everything(self) -> str:
        """Every byte the upstream saw, as text (to search for leaked values)."""
        with self.lock:
            return "\n".join(
                f"{r.method} {r.path} {json.dumps(r.headers)} {r.body.decode('latin-1')}"
                for r in self.requests
            )


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _handler(tally: Tally, name: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Counting(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            body = _read_body(self)
            seen = Seen(self.command, self.path, dict(self.headers.items()), body)
            with tally.lock:
                tally.requests.append(seen)
            parts = urlsplit(self.path)
            if parts.path == "/redirect":
                target = parse_qs(parts.query)["to"][0]
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = json.dumps(
                {"server": name, "method": self.command, "path": self.path, "body": len(body)}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Counting


class CountingServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that counts accepted connections in ``tally``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], tally: Tally, name: str) -> None:
        self.tally = tally
        super().__init__(address, _handler(tally, name))

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.tally.lock:
            self.tally.connections += 1
        super().process_request(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextmanager
def counting_server(
    name: str, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Iterator[CountingServer]:
    """Serve a :class:`CountingServer` on ``host`` (TLS with ``tls``) until the block ends."""
    server = CountingServer((host, 0), Tally(), name)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def udp_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP socket on every host address; yields its port and the datagrams it got."""
    got: list[bytes] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                got.append(sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], got
    finally:
        stop.set()
        thread.join(2)
        sock.close()
