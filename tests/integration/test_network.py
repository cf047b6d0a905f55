"""The mediated network end to end: real QEMU guests, real TLS, real local upstreams.

Upstreams are servers this module starts on 127.0.0.1: a plain HTTP one
and an HTTPS one whose certificate comes from a test CA (passed to the
policy as ``upstream_ca``). The guest reaches them only through
``resolve={"api.test:443": "127.0.0.1:<port>"}`` plus ``allow_hosts``.
Both echo what they received as JSON and remember it, so tests can check
what really arrived upstream.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.secrets import Secret
from pytest_gondolin.vm.machine import VM

REAL_TOKEN = "real-token-7c1e0f9a"  # must never reach the guest or a record
GATEWAY = "192.168.127.1"


# --------------------------------------------------------------------------- upstreams


@dataclass
class Upstream:
    port: int
    seen: list[dict[str, object]] = field(default_factory=list)

    def paths(self) -> list[object]:
        return [s["path"] for s in self.seen]


def _serve(server: http.server.ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _echo_handler(
    seen: list[dict[str, object]], name: str
) -> type[http.server.BaseHTTPRequestHandler]:
    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            record: dict[str, object] = {
                "server": name,
                "path": self.path,
                "headers": dict(self.headers.items()),
            }
            seen.append(record)
            body = json.dumps(record).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Echo


@dataclass
class Upstreams:
    http: Upstream
    https: Upstream
    ca_file: Path


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    test_ca = CertificateAuthority.create("upstream test CA")
    ca_file = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    ca_file.write_bytes(test_ca.ca_pem)
    plain_seen: list[dict[str, object]] = []
    tls_seen: list[dict[str, object]] = []
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _echo_handler(plain_seen, "http"))
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _echo_handler(tls_seen, "https"))
    tls.socket = test_ca.ssl_context_for("api.test").wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        _serve(server)
    yield Upstreams(
        Upstream(plain.server_address[1], plain_seen),
        Upstream(tls.server_address[1], tls_seen),
        ca_file,
    )
    for server in (plain, tls):
        server.shutdown()
        server.server_close()


def _resolve(up: Upstreams) -> dict[str, str]:
    return {
        "api.test:443": f"127.0.0.1:{up.https.port}",
        "api.test:80": f"127.0.0.1:{up.http.port}",
        "other.test:80": f"127.0.0.1:{up.http.port}",
    }


@pytest.fixture(scope="module")
def net_vm(vm_factory: VMFactory, upstreams: Upstreams) -> VM:
    """One guest for the module with a permissive-for-two-hosts policy and a secret."""
    return vm_factory(
        allow_hosts=["api.test", "other.test"],
        resolve=_resolve(upstreams),
        upstream_ca=str(upstreams.ca_file),
        secrets={"API_TOKEN": Secret(value=REAL_TOKEN, hosts=["api.test"])},
    )


@pytest.fixture
def http_log(net_vm: VM) -> VM:
    """``net_vm`` with an empty ``vm.http`` for this test (stubs kept off too)."""
    assert net_vm.http is not None
    net_vm.http.clear(stubs=True)
    return net_vm


def curl(vm: VM, args: str, timeout: float = 60) -> tuple[int, str, str]:
    r = vm.exec(f"curl -sS -m 20 {args}", timeout=timeout)
    return r.returncode, r.stdout, r.stderr


# --------------------------------------------------------------------------- allowed


def test_https_allowed_with_curl(http_log: VM, upstreams: Upstreams) -> None:
    code, out, err = curl(http_log, "https://api.test/curl?x=1")
    assert code == 0, err
    echoed = json.loads(out)
    assert echoed["server"] == "https" and echoed["path"] == "/curl?x=1"
    assert http_log.http is not None
    (ex,) = http_log.http.assert_request_made(method="GET", host="api.test", path="/curl")
    assert (ex.decision, ex.scheme, ex.status, ex.query) == ("allowed", "https", 200, "x=1")
    assert "[rule: resolve['api.test:443']]" in ex.reason


def test_https_allowed_with_python_urllib(http_log: VM) -> None:
    code = (
        "import json, urllib.request\n"
        "print(json.load(urllib.request.urlopen('https://api.test/urllib', timeout=20))['path'])\n"
    )
    r = http_log.exec(["python3", "-c", code], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/urllib"


def test_plain_http_allowed(http_log: VM, upstreams: Upstreams) -> None:
    code, out, err = curl(http_log, "http://api.test/plain")
    assert code == 0, err
    assert json.loads(out)["server"] == "http"
    assert "/plain" in upstreams.http.paths()


def test_wrong_upstream_ca_is_rejected(vm: VM, upstreams: Upstreams) -> None:
    # Negative control for upstream_ca: without it the test CA is not trusted.
    recorder = vm.configure_network(
        NetworkPolicy(allow_hosts=["api.test"], resolve=_resolve(upstreams))
    )
    code, out, _ = curl(vm, "-i https://api.test/untrusted")
    assert code == 0
    assert out.startswith("HTTP/2 502"), out  # curl offers h2 over TLS, and gets it
    assert "certificate verification failed" in out
    (ex,) = recorder.requests
    assert ex.status == 502 and "upstream failed" in ex.reason
    assert "/untrusted" not in upstreams.https.paths()


# --------------------------------------------------------------------------- denied


def test_denied_host_fails_and_is_recorded(vm: VM) -> None:
    # A name the policy does not know fails at the guest's DNS lookup.
    code, out, err = curl(vm, "https://denied.example/secret-path")
    assert code == 6 and "Could not resolve host: denied.example" in err, (out, err)
    assert vm.http is not None
    (lookup,) = vm.http.get_requests(host="denied.example")
    assert (lookup.decision, lookup.scheme) == ("denied", "dns") and "[rule: dns]" in lookup.reason
    # A name it knows, on a port it does not allow: the host's 403 names the rule.
    vm.configure_network(NetworkPolicy(allow_hosts=["denied.example:8443"]))
    code, out, err = curl(vm, "-f https://denied.example/secret-path")
    assert code == 22, (out, err)  # curl -f: HTTP error >= 400
    code, out, _ = curl(vm, "https://denied.example/secret-path")
    assert "rule: default-deny" in out
    assert vm.http is not None
    exchanges = vm.http.get_requests(host="denied.example")
    assert len(exchanges) == 2
    assert {ex.decision for ex in exchanges} == {"denied"}
    assert all(ex.status == 403 and "[rule: default-deny]" in ex.reason for ex in exchanges)


def _host_addresses() -> list[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        found.add(s.getsockname()[0])
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)


@pytest.fixture
def host_service() -> Iterator[tuple[int, list[object]]]:
    """A TCP service on every host address that notes any connection it gets."""
    hits: list[object] = []
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            hits.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    server.close()
    thread.join(2)


@pytest.mark.parametrize("policy", ["default", "allow-star"])
def test_host_services_unreachable_by_every_address(
    vm: VM, host_service: tuple[int, list[object]], policy: str
) -> None:
    port, hits = host_service
    if policy == "allow-star":
        vm.configure_network(NetworkPolicy(allow_hosts=["*"]))
    targets = [GATEWAY, "10.0.2.2", "169.254.169.254", *_host_addresses()]
    script = "; ".join(
        f"curl -s -m 10 -o /dev/null -w '{t} %{{http_code}}\\n' http://{t}:{port}/" for t in targets
    )
    script += (
        f"; curl -s -m 10 -o /dev/null -w 'localhost %{{http_code}}\\n' http://localhost:{port}/"
    )
    # Raw TCP too (no HTTP): it must be cut, never reach the host.
    raw = (
        "import socket, sys\n"
        f"for host in {targets!r}:\n"
        "    try:\n"
        f"        s = socket.create_connection((host, {port}), timeout=10)\n"
        "        s.sendall(b'\\x00raw bytes\\r\\n'); print(host, s.recv(100))\n"
        "    except OSError as exc:\n"
        "        print(host, type(exc).__name__)\n"
    )
    r = vm.exec(script, timeout=120)
    codes = dict(line.split() for line in r.stdout.splitlines())
    # Every address is mediated: the host answers 403 itself (block_internal
    # or default-deny); the guest's own 127.0.0.1 refuses (code 000).
    assert {codes[t] for t in targets} == {"403"}, r.stdout
    assert codes["localhost"] == "000"
    r2 = vm.exec(["python3", "-c", raw], timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert all(
        line.split()[1] in ("ConnectionResetError", "b''") for line in r2.stdout.splitlines()
    ), r2.stdout
    assert hits == []
    assert vm.http is not None
    internal = [ex for ex in vm.http.requests if ex.method == "GET"]
    assert internal and all(ex.decision == "denied" for ex in internal)


def test_hostname_resolving_to_internal_is_blocked(
    vm: VM, host_service: tuple[int, list[object]]
) -> None:
    port, hits = host_service
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        pytest.skip(f"the host name {hostname!r} does not resolve on this host")
    if not ipaddress.ip_address(address).is_private:
        pytest.skip(f"{hostname} resolves to a public address here")
    recorder = vm.configure_network(NetworkPolicy(allow_hosts=["*"]))
    _, out, _ = curl(vm, f"http://{hostname}:{port}/")
    assert "rule: block_internal" in out, out
    assert hits == []
    assert recorder.requests[0].decision == "denied"


def test_raw_tcp_without_http_is_cut_and_recorded(vm: VM) -> None:
    vm.configure_network(NetworkPolicy(allow_hosts=["api.test"]))  # allowed: still only HTTP
    raw = (
        "import socket\n"
        "for port in (80, 443):\n"
        "    s = socket.create_connection(('api.test', port), timeout=10)\n"
        "    s.sendall(b'SSH-2.0-OpenSSH_9.2\\r\\n')\n"
        "    try:\n"
        "        print(port, s.recv(100))\n"
        "    except ConnectionResetError:\n"
        "        print(port, 'reset')\n"
    )
    r = vm.exec(["python3", "-c", raw], timeout=60)
    assert r.stdout.split() == ["80", "reset", "443", "reset"], (r.stdout, r.stderr)
    assert vm.http is not None
    records = vm.http.get_requests(host="api.test")
    assert sorted(ex.port for ex in records) == [80, 443]
    assert all(ex.method == "" and ex.decision == "denied" for ex in records)
    assert all("not-http" in ex.reason for ex in records)


def test_connect_is_refused(vm: VM) -> None:
    vm.configure_network(NetworkPolicy(allow_hosts=["proxy.test"]))
    raw = (
        "import socket\n"
        "s = socket.create_connection(('proxy.test', 80), timeout=10)\n"
        "s.sendall(b'CONNECT api.test:443 HTTP/1.1\\r\\nHost: api.test:443\\r\\n\\r\\n')\n"
        "print(s.recv(4096).decode())\n"
    )
    r = vm.exec(["python3", "-c", raw], timeout=60)
    assert r.stdout.startswith("HTTP/1.1 405"), (r.stdout, r.stderr)
    assert vm.http is not None
    (ex,) = vm.http.requests
    assert ex.method == "CONNECT" and ex.decision == "denied" and "[rule: connect]" in ex.reason


# --------------------------------------------------------------------------- secrets, stubs


def test_secrets_substituted_only_for_their_hosts(
    http_log: VM, upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pytest_gondolin")
    placeholder = http_log.exec('printf %s "$API_TOKEN"').stdout
    assert placeholder.startswith("GONDOLIN_SECRET_API_TOKEN_") and REAL_TOKEN not in placeholder

    r = http_log.exec('curl -sS -m 20 -H "Authorization: Bearer $API_TOKEN" https://api.test/echo')
    assert r.returncode == 0, r.stderr
    arrived = upstreams.https.seen[-1]
    assert arrived["path"] == "/echo"
    # Field names compare case-insensitively: an HTTP/2 guest (curl's default) sends them lower-case.
    headers = {k.lower(): v for k, v in arrived["headers"].items()}  # type: ignore[attr-defined]
    assert headers["authorization"] == f"Bearer {REAL_TOKEN}"
    # The upstream echoed the value back; the guest sees the placeholder instead.
    assert REAL_TOKEN not in r.stdout and placeholder in r.stdout

    before = len(upstreams.http.seen)
    r2 = http_log.exec(
        'curl -sS -m 20 -H "Authorization: Bearer $API_TOKEN" http://other.test/leak'
    )
    assert "rule: secrets" in r2.stdout, r2.stdout
    assert len(upstreams.http.seen) == before  # never left the host

    assert http_log.http is not None
    (leak,) = http_log.http.get_requests(host="other.test")
    assert leak.decision == "denied" and "[rule: secrets]" in leak.reason
    (ok,) = http_log.http.get_requests(host="api.test", path="/echo")
    assert ok.request_header("Authorization") == f"Bearer {placeholder}"
    everything = http_log.http.to_json() + r.stdout + r.stderr + r2.stdout + r2.stderr
    assert REAL_TOKEN not in everything
    assert REAL_TOKEN not in caplog.text


def test_stub_answers_without_upstream(http_log: VM, upstreams: Upstreams) -> None:
    assert http_log.http is not None
    http_log.http.stub("GET", "https://api.test/stubbed", json={"stubbed": True})
    code, out, err = curl(http_log, "https://api.test/stubbed")
    assert code == 0, err
    assert json.loads(out) == {"stubbed": True}
    assert "/stubbed" not in upstreams.https.paths()
    (ex,) = http_log.http.requests
    assert ex.decision == "stubbed" and ex.status == 200


def test_stub_needs_no_allow_rule(vm: VM) -> None:
    assert vm.http is not None
    vm.http.stub("GET", "http://stub-only.test/", body="from the stub")
    assert curl(vm, "http://stub-only.test/")[1] == "from the stub"


def test_assert_request_made_lists_similar_requests(vm: VM) -> None:
    vm.configure_network(NetworkPolicy(allow_hosts=["similar.test:8080"]))  # known, port 80 denied
    curl(vm, "http://similar.test/actual-path")
    assert vm.http is not None
    with pytest.raises(AssertionError) as info:
        vm.http.assert_request_made(host="similar.test", path="/expected-path")
    message = str(info.value)
    assert "similar requests" in message
    assert "GET http://similar.test/actual-path -> 403 (denied" in message


# --------------------------------------------------------------------------- DNS, ping, isolation


def test_dns_answers_any_name_with_a_synthetic_address(vm: VM) -> None:
    vm.configure_network(NetworkPolicy(allow_hosts=["*"]))  # "*": every name is known
    r = vm.exec(
        "getent hosts api.test some-name.example.org; "
        "python3 -c \"import socket; print(socket.gethostbyname('x.y.z.invalid'))\""
    )
    addresses = [line.split()[0] for line in r.stdout.splitlines()]
    assert len(addresses) == 3, r.stdout
    pool = ipaddress.ip_network("198.18.0.0/15")
    assert all(ipaddress.ip_address(a) in pool for a in addresses)
    assert len(set(addresses)) == 3


def test_ping_gateway(vm: VM) -> None:
    r = vm.exec(f"busybox ping -c 2 -W 5 {GATEWAY}", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 packets received" in r.stdout


@pytest.mark.parametrize("round_", [1, 2])
def test_vm_http_is_fresh_for_each_test(vm: VM, round_: int) -> None:
    # Whichever runs second would see the first one's record or stub.
    assert vm.http is not None
    assert vm.http.requests == [] and vm.http.stubs == []
    vm.http.stub("GET", f"http://fresh.test/{round_}", body="x")
    assert curl(vm, f"http://fresh.test/{round_}")[1] == "x"
    assert len(vm.http.requests) == 1
    assert vm.network is not None and vm.network.policy == NetworkPolicy()


# Fills the synthetic resolver from one guest command: raw A queries over one
# UDP socket, in batches (a few seconds under TCG, where 4,000 getaddrinfo
# calls would take minutes). Then one name through the guest's own resolver,
# and a raw TCP connection to the synthetic address of name 4000.
GUEST_FILL = r"""
import json, socket, struct, sys
tag, count, late = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.connect(("192.168.127.1", 53))
s.settimeout(10)
def wire(i):
    labels = [b"n%d-%s" % (i, tag.encode()), b"test"]
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
answers, rcodes = {}, {}
for start in range(0, count, 200):
    ids = range(start, min(count, start + 200))
    for i in ids:
        s.send(struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + wire(i) + b"\0\1\0\1")
    for _ in ids:
        data = s.recv(512)
        qid, flags, _, an = struct.unpack("!HHHH", data[:8])
        rcodes[qid] = flags & 15
        if an:
            answers[qid] = socket.inet_ntoa(data[-4:])
out = {"answered": len(answers), "refused": sum(r == 5 for r in rcodes.values())}
try:
    out["over"] = socket.gethostbyname("over-%s.test" % tag)
except OSError as exc:
    out["over"] = "error: %s" % exc
out["late"] = answers.get(late)
if out["late"]:
    c = socket.create_connection((out["late"], 80), timeout=10)
    c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    try:
        c.recv(100)
    except OSError:
        pass
print(json.dumps(out))
"""

GUEST_AFTER = r"""
import json, socket, sys
tag, late = sys.argv[1], sys.argv[2]
out = {"after": socket.gethostbyname("after-%s.test" % tag)}
c = socket.create_connection((late, 80), timeout=10)
c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
try:
    c.recv(100)
except OSError:
    pass
print(json.dumps(out))
"""


def test_dns_and_traffic_state_do_not_survive_a_restore(vm: VM) -> None:
    """The restore between two tests gives the next one a fresh network.

    One guest command resolves 4,096 names + 64 more. Negative control,
    before the restore: the cap is hit (REFUSED, "Temporary failure in name
    resolution"), and connecting to a synthetic address tells the recorder
    which name it stood for. After the same restore the pool does between
    tests (``CLEAN_TAG``): names resolve again, that address names nothing,
    and neither ``vm.http`` nor the counters keep anything from before.
    """
    import uuid

    from pytest_gondolin.netpolicy.stack.dns import DEFAULT_MAX_NAMES
    from pytest_gondolin.vm.warm import CLEAN_TAG

    vm.configure_network(NetworkPolicy(allow_hosts=["*.test"]))  # kept by the restore below
    tag = "t" + uuid.uuid4().hex[:10]
    r = vm.exec(
        ["python3", "-c", GUEST_FILL, tag, str(DEFAULT_MAX_NAMES + 64), "4000"], timeout=180
    )
    assert r.returncode == 0, r.stderr
    before = json.loads(r.stdout.strip().splitlines()[-1])
    # The whole cap was this test's: the restore before it emptied the resolver.
    assert before["answered"] == DEFAULT_MAX_NAMES, before
    assert before["refused"] == 64 and before["over"].startswith("error"), before
    late = before["late"]
    assert late is not None and ipaddress.ip_address(late) in ipaddress.ip_network("198.18.0.0/15")
    assert vm.http is not None
    assert [ex.host for ex in vm.http.requests] == [f"n4000-{tag}.test"]

    vm.load_internal(CLEAN_TAG)

    assert vm.http is not None and vm.http.requests == []
    assert vm.network is not None and vm.network.counters.get("dns.queries", 0) == 0
    r = vm.exec(["python3", "-c", GUEST_AFTER, tag, late], timeout=120)
    assert r.returncode == 0, r.stderr  # resolution works again
    after = json.loads(r.stdout.strip().splitlines()[-1])
    assert ipaddress.ip_address(after["after"]) in ipaddress.ip_network("198.18.0.0/15")
    hosts = [ex.host for ex in vm.http.requests]
    assert hosts == [late], hosts  # the bare address: the old name is gone
    assert not any(tag in str(ex.to_dict()) for ex in vm.http.requests)


def test_name_resolving_to_an_address_of_the_host_is_blocked(
    vm: VM, host_service: tuple[int, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``allow_hosts=["*"]`` a name the host resolves to one of its own
    addresses (public or not) is denied by ``block_internal``.

    Negative control: the same address named in ``resolve=`` is reached
    (the host service sees the connection), so the denial is the rule's.
    """
    import time

    from pytest_gondolin.netpolicy.http import policy as policy_module
    from pytest_gondolin.netpolicy.http.hostaddrs import read_host_addresses
    from pytest_gondolin.netpolicy.http.policy import is_internal

    port, hits = host_service
    own = sorted(
        str(net.network_address)
        for net in read_host_addresses()
        if net.version == 4 and net.num_addresses == 1 and not is_internal(net.network_address)
    )
    if not own:
        pytest.skip("every IPv4 address of this host is in an internal range already")
    address = own[0]

    def host_dns(host: str, port: int, *args: object) -> list[tuple[object, ...]]:
        assert host == "myself.test", host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(policy_module.resolve_upstream, "__defaults__", (host_dns,))
    recorder = vm.configure_network(NetworkPolicy(allow_hosts=["*"]))
    _, out, _ = curl(vm, f"http://myself.test:{port}/")
    assert "rule: block_internal" in out and "an address of this host" in out, out
    assert hits == []
    assert recorder.requests[0].decision == "denied"

    recorder = vm.configure_network(
        NetworkPolicy(resolve={f"myself.test:{port}": f"{address}:{port}"})
    )
    curl(vm, f"http://myself.test:{port}/")
    assert recorder.requests[0].decision == "allowed"
    deadline = time.monotonic() + 5  # the service notes the connection on its own thread
    while not hits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hits, f"the host service on {address}:{port} was not reached"
