"""Load in the default suite (short): many concurrent flows from one guest.

The long runs (hundreds of sandboxed tests, resource growth) are in
``tests/soak`` behind the ``soak`` marker; ``-n 2`` on two cores is in
``tests/plugin/test_sandboxed.py::test_xdist_workers_each_run_their_own_vm``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.vm.machine import VM
from tests.integration.hostile_upstreams import CountingServer, counting_server

FLOWS = 50

#: Each guest thread opens its connection, waits until all FLOWS are open
#: (a barrier: proof they were concurrent), then sends one request.
GUEST_FLOWS = r"""
import json, socket, ssl, sys, threading, time
n = int(sys.argv[1])
barrier = threading.Barrier(n, timeout=120)
ctx = ssl.create_default_context()
results = [None] * n

def flow(i):
    tls = i % 2 == 1
    sock = socket.create_connection(("api.test", 443 if tls else 80), timeout=120)
    if tls:
        sock = ctx.wrap_socket(sock, server_hostname="api.test")
    barrier.wait()
    sock.sendall(f"GET /flow-{i} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    results[i] = data.split(b"\r\n", 1)[0].decode()

threads = [threading.Thread(target=flow, args=(i,)) for i in range(n)]
started = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"statuses": results, "seconds": time.monotonic() - started}))
"""


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[CountingServer, CountingServer, Path]]:
    ca = CertificateAuthority.create("load test upstream CA")
    ca_file = tmp_path_factory.mktemp("load-ca") / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    with (
        counting_server("plain") as plain,
        counting_server("tls", tls=ca.ssl_context_for("api.test")) as tls,
    ):
        yield plain, tls, ca_file


def test_fifty_concurrent_flows_from_one_guest(
    vm: VM, servers: tuple[CountingServer, CountingServer, Path]
) -> None:
    """50 flows (half TLS) open at once all complete; each is mediated and recorded once."""
    plain, tls, ca_file = servers
    recorder = vm.configure_network(
        NetworkPolicy.from_options(
            allow_hosts=["api.test"],
            resolve={
                "api.test:80": f"127.0.0.1:{plain.port}",
                "api.test:443": f"127.0.0.1:{tls.port}",
            },
            upstream_ca=str(ca_file),
        )
    )
    threads_before = threading.active_count()
    vm.write_file("/tmp/flows.py", GUEST_FLOWS)
    r = vm.exec(["python3", "/tmp/flows.py", str(FLOWS)], timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["statuses"] == ["HTTP/1.1 200 OK"] * FLOWS, out
    paths = sorted(plain.tally.paths() + tls.tally.paths())
    assert paths == sorted(f"/flow-{i}" for i in range(FLOWS))
    assert len(recorder.requests) == FLOWS
    assert {ex.decision for ex in recorder.requests} == {"allowed"}
    assert {ex.scheme for ex in recorder.requests} == {"http", "https"}
    # The driver's fixed worker pool served them: no thread per flow on the host
    # (the local upstreams' per-connection threads end with their connections).
    limit = threads_before + DriverLimits().upstream_workers
    deadline = time.monotonic() + 10
    while threading.active_count() > limit and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= limit
