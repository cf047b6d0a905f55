"""HTTP/2 from a real guest (Debian's curl, built with nghttp2) through the mediation.

The upstreams are real TLS servers on the host's 127.0.0.1 with a test CA
(given to the policy as ``upstream_ca``): one speaking HTTP/2 only (the h2
library over an ssl socket, ``tests/unit/netpolicy/h2_helpers.py``), one an
HTTP/1.1-only ``http.server``. One VM for the module; each test sets its
own policy host-side (no reboot).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_gondolin import Secret
from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.netpolicy import NetworkPolicy
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.vm.machine import VM
from tests.unit.netpolicy.h2_helpers import Fields, H2Upstream, echo_handler, h2_upstream

REAL_TOKEN = "h2-real-token-value-0042"
#: How long the upstream holds each /slow request: two of them served one
#: after the other would arrive at least this far apart.
SLOW = 3.0
#: When each /slow request reached the upstream (time.monotonic()).
SLOW_ARRIVALS: list[float] = []


def _handler(
    method: str, path: str, headers: Fields, body: bytes
) -> tuple[int, Fields, bytes, Fields]:
    if path.startswith("/slow"):
        SLOW_ARRIVALS.append(time.monotonic())
        time.sleep(SLOW)
    return echo_handler(method, path, headers, body)


@dataclass
class Upstreams:
    h2: H2Upstream
    h1_port: int
    ca_file: Path


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"h1": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    ca = CertificateAuthority.create("h2 integration upstream CA")
    ca_file = tmp_path_factory.mktemp("h2-ca") / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    h1 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    h1.socket = ca.ssl_context_for("old.test").wrap_socket(h1.socket, server_side=True)
    threading.Thread(target=h1.serve_forever, daemon=True).start()
    with h2_upstream(ca, "api.test", _handler) as h2:
        yield Upstreams(h2, h1.server_address[1], ca_file)
    h1.shutdown()
    h1.server_close()


@pytest.fixture(scope="module")
def h2_vm(vm_factory: VMFactory) -> VM:
    return vm_factory()


@pytest.fixture
def vm2(h2_vm: VM, upstreams: Upstreams) -> VM:
    """The module's VM with a fresh recorder, allowing api.test (h2) and old.test (h1)."""
    upstreams.h2.seen.clear()
    h2_vm.configure_network(
        NetworkPolicy.from_options(
            allow_hosts=["api.test:443", "old.test:443"],
            resolve={
                "api.test:443": f"127.0.0.1:{upstreams.h2.port}",
                "old.test:443": f"127.0.0.1:{upstreams.h1_port}",
            },
            upstream_ca=str(upstreams.ca_file),
            secrets={"API_TOKEN": Secret(value=REAL_TOKEN, hosts=["api.test"])},
        )
    )
    return h2_vm


def curl(vm: VM, args: str) -> tuple[str, str]:
    r = vm.exec(f"curl -sS -m 30 --http2 {args}", timeout=90)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout, r.stderr


def test_guest_curl_speaks_http2_to_an_allowed_host(vm2: VM, upstreams: Upstreams) -> None:
    out, _ = curl(vm2, "-i https://api.test/hello?x=1")
    assert out.startswith("HTTP/2 200"), out
    assert out.endswith("GET /hello?x=1 accept=*/* body=0"), out
    (ex,) = vm2.http.get_requests(host="api.test")
    assert (ex.http_version, ex.status, ex.decision, ex.query) == ("2", 200, "allowed", "x=1")
    assert upstreams.h2.protocols[-1] == "h2"  # the upstream leg was HTTP/2 too


def test_denied_request_gets_403_on_its_stream(vm2: VM) -> None:
    # The name resolves (the policy knows it) but not on this port: denied by policy.
    out, _ = curl(vm2, "-i https://api.test:8443/nope")
    assert out.startswith("HTTP/2 403"), out
    assert "pytest-gondolin denied this request" in out
    (ex,) = vm2.http.get_requests(path="/nope")
    assert (ex.decision, ex.http_version, ex.port) == ("denied", "2", 8443)


def test_secret_placeholder_is_replaced_on_the_h2_path(vm2: VM, upstreams: Upstreams) -> None:
    placeholder = vm2.secret_env()["API_TOKEN"]
    out, err = curl(vm2, '-H "Authorization: Bearer $API_TOKEN" https://api.test/auth')
    (_, _, headers, _) = upstreams.h2.seen[-1]
    assert ("authorization", f"Bearer {REAL_TOKEN}") in headers  # the upstream got the value
    assert REAL_TOKEN not in out + err and f"authorization=Bearer {placeholder}" in out
    (ex,) = vm2.http.get_requests(path="/auth")
    assert ex.request_header("Authorization") == f"Bearer {placeholder}"
    assert ex.http_version == "2"


def test_two_parallel_streams_are_both_recorded(vm2: VM) -> None:
    # Without --parallel-immediate curl waits to learn the first connection
    # multiplexes, then puts both transfers on it: one connect in all.
    out, _ = curl(
        vm2,
        "--parallel -w '\\n%{http_version} %{num_connects}\\n' "
        "https://api.test/one https://api.test/two",
    )
    assert "GET /one" in out and "GET /two" in out
    summary = sorted(line for line in out.splitlines() if line.startswith("2 "))
    assert summary == ["2 0", "2 1"], out  # both HTTP/2, the second on the first's connection
    paths = sorted(ex.path for ex in vm2.http.get_requests(host="api.test"))
    assert paths == ["/one", "/two"]
    assert {ex.http_version for ex in vm2.http.requests} == {"2"}


def test_parallel_streams_reach_the_upstream_concurrently(vm2: VM) -> None:
    SLOW_ARRIVALS.clear()
    out, _ = curl(vm2, "--parallel https://api.test/slow-a https://api.test/slow-b")
    assert "GET /slow-a" in out and "GET /slow-b" in out
    first, second = SLOW_ARRIVALS
    # Served one after the other, the second would arrive SLOW seconds after the first.
    assert second - first < SLOW / 2, SLOW_ARRIVALS


def test_grpc_style_trailers_pass_end_to_end(vm2: VM) -> None:
    # curl prints trailers with the headers (-D -) once the body is done.
    out, _ = curl(
        vm2,
        "-D - -o /dev/null -X POST -H 'content-type: application/grpc' -H 'te: trailers' "
        "--data-binary @/dev/null https://api.test/grpc.Echo/Say",
    )
    assert "grpc-status: 0" in out and "grpc-message: OK" in out, out
    (ex,) = vm2.http.get_requests(path="/grpc.Echo/Say")
    assert (ex.status, ex.http_version) == (200, "2")


def test_http11_upstream_behind_an_http2_guest(vm2: VM) -> None:
    out, _ = curl(vm2, "-i https://old.test/legacy")
    assert out.startswith("HTTP/2 200") and out.endswith('{"h1": "/legacy"}'), out
    (ex,) = vm2.http.get_requests(host="old.test")
    assert ex.http_version == "2" and ex.status == 200


def test_http11_client_still_gets_http11(vm2: VM) -> None:
    out, _ = curl(vm2, "--http1.1 -i https://old.test/old-client")
    assert out.startswith("HTTP/1.1 200") and out.endswith('{"h1": "/old-client"}'), out
    (ex,) = vm2.http.get_requests(path="/old-client")
    assert ex.http_version == "1.1"


HOSTILE = r"""
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2"])

def connect():
    raw = socket.create_connection(("api.test", 443), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="api.test")
    assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\4\0\0\0\0\0")
    return s

if sys.argv[1] == "ping-flood":  # PINGs, never reading the ACKs
    s = connect()
    s.settimeout(3)
    ping = b"\0\0\x08\x06\0\0\0\0\0" + b"12345678"
    sent = 0
    try:
        while sent < 1_000_000:
            s.sendall(ping * 1000)
            sent += 1000
    except OSError:
        pass
    print("stalled-after", sent)
else:  # HPACK bomb: one 4000-byte header, then 40 references to it (160 KB decoded)
    s = connect()
    literal = b"\x40\x05x-big\x7f\xa1\x1e" + b"v" * 4000
    block = b"\x82\x87\x84\x41\x08api.test" + literal + b"\xbe" * 40
    s.sendall(len(block).to_bytes(3, "big") + b"\x01\x05\0\0\0\x01" + block)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    frames, i = [], 0
    while i + 9 <= len(got):
        n = int.from_bytes(got[i:i + 3], "big")
        frames.append(got[i + 3])
        i += 9 + n
    print("frame-types", sorted(set(frames)))
"""


def test_hostile_h2_guests_cost_only_their_connection(vm2: VM) -> None:
    vm2.write_file("/tmp/hostile_h2.py", HOSTILE)
    flood = vm2.exec(["python3", "/tmp/hostile_h2.py", "ping-flood"], timeout=180)
    assert flood.returncode == 0, flood.stderr
    sent = int(flood.stdout.split()[-1])
    assert sent < 1_000_000, flood.stdout  # the host stopped reading: the guest's send stalled
    bomb = vm2.exec(["python3", "/tmp/hostile_h2.py", "bomb"], timeout=120)
    assert bomb.returncode == 0, bomb.stderr
    assert "7" in bomb.stdout.split("frame-types")[-1], bomb.stdout  # GOAWAY, then EOF
    (record,) = [ex for ex in vm2.http.requests if "protocol error" in ex.reason]
    assert record.method == "" and "[rule: http-protocol]" in record.reason
    # The host is fine: an ordinary HTTP/2 request right after.
    out, _ = curl(vm2, "-i https://api.test/after")
    assert out.startswith("HTTP/2 200"), out
