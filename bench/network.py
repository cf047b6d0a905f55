"""Network benchmarks: request latency through the mediation, download throughput, replay.

Upstreams are local servers on 127.0.0.1 (plain and TLS with a test CA),
reached from the guest through ``resolve`` entries, as the tests do.
"""

from __future__ import annotations

import http.server
import socketserver
import ssl
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.cassette import open_cassette
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.warm import launch_clean

Row = tuple[str, str, str]
BIG = 50 * 1024 * 1024
_BIG_BODY = b"\0" * BIG


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = _BIG_BODY if self.path.startswith("/big") else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


# Runs in the guest: N sequential requests (new connection each), prints the median in ms.
GUEST_LATENCY = r"""
import ssl, statistics, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
samples = []
for i in range(n + 1):
    t = time.perf_counter()
    urllib.request.urlopen(url, timeout=30, context=ctx if url.startswith("https") else None).read()
    samples.append((time.perf_counter() - t) * 1000)
print(statistics.median(samples[1:]))
"""

GUEST_LOOPBACK = r"""
import http.server, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers(); self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 8099), H)
s.serve_forever()
"""


def _guest_median(vm: VM, url: str, n: int) -> float:
    vm.write_file("/tmp/lat.py", GUEST_LATENCY)
    r = vm.exec(["python3", "/tmp/lat.py", url, str(n)], timeout=600, check=True)
    return float(r.stdout.strip())


def network_section(config: VMConfig, n: int) -> list[Row]:
    ca = CertificateAuthority.create("bench upstream CA")
    tmp = Path(tempfile.mkdtemp(prefix="gondolin-bench-net-"))
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    plain = _Server(("127.0.0.1", 0), _Handler)
    tls = _Server(("127.0.0.1", 0), _Handler)
    tls.socket = ca.ssl_context_for("api.test").wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    resolve = {
        "api.test:80": f"127.0.0.1:{plain.server_address[1]}",
        "api.test:443": f"127.0.0.1:{tls.server_address[1]}",
    }
    policy = NetworkPolicy(allow_hosts=["api.test"], resolve=resolve, upstream_ca=str(ca_file))
    rows: list[Row] = []

    def host_median(url: str, context: ssl.SSLContext | None = None) -> float:
        samples = []
        for _ in range(n + 1):
            t = time.perf_counter()
            urllib.request.urlopen(url, timeout=30, context=context).read()
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples[1:])

    host_http = host_median(f"http://127.0.0.1:{plain.server_address[1]}/small")
    vm = launch_clean(config, name="bench-net")
    try:
        vm.configure_network(policy)
        vm.spawn(["python3", "-c", GUEST_LOOPBACK])
        time.sleep(1.5)
        loop_ms = _guest_median(vm, "http://127.0.0.1:8099/small", n)
        http_ms = _guest_median(vm, "http://api.test/small", n)
        https_ms = _guest_median(vm, "https://api.test/small", max(5, n // 2))
        rows.append(
            (
                "small HTTP request from the guest, mediated (new connection each)",
                f"{http_ms:.1f} ms",
                f"median of {n}; the same request to a server on the guest's own loopback takes "
                f"{loop_ms:.1f} ms (the emulated guest, not the mediation, sets the pace); "
                f"host to upstream directly: {host_http:.1f} ms",
            )
        )
        rows.append(
            (
                "small HTTPS request from the guest, mediated (TLS handshake in the guest)",
                f"{https_ms:.0f} ms",
                f"median of {max(5, n // 2)}; the emulated guest's own TLS dominates",
            )
        )
        downloads = (
            ("HTTP", "http", "--http1.1"),
            ("HTTPS, HTTP/1.1", "https", "--http1.1"),
            ("HTTPS, HTTP/2", "https", "--http2"),
        )
        for label, scheme, version in downloads:
            r = vm.exec(
                f"curl -sS {version} -o /dev/null -w '%{{speed_download}}' {scheme}://api.test/big",
                timeout=600,
                check=True,
            )
            mbps = float(r.stdout) / 1e6
            rows.append(
                (
                    f"50 MB download through the mediation ({label}, curl)",
                    f"{mbps:.0f} MB/s",
                    "one run",
                )
            )
        # Replay: record once, then answer from the cassette with the upstream untouched.
        cassette = tmp / "bench.yaml"
        driver = vm.network
        assert driver is not None
        recorder = vm.configure_network(policy)
        player = open_cassette(cassette, "all", secret_store=None)
        driver.configure(policy, None, recorder, player)
        _guest_median(vm, "http://api.test/small", n)
        player.save()
        recorder = vm.configure_network(policy)
        player = open_cassette(cassette, "none", secret_store=None, allow_playback_repeats=True)
        driver.configure(policy, None, recorder, player)
        replay_ms = _guest_median(vm, "http://api.test/small", n)
        assert recorder.requests and recorder.requests[-1].decision == "replayed"
        rows.append(
            ("small HTTP request replayed from a cassette", f"{replay_ms:.1f} ms", f"median of {n}")
        )
    finally:
        vm.close()
        for server in (plain, tls):
            server.shutdown()
            server.server_close()
    return rows
