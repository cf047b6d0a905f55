"""FlowProxy and the request pipeline, sans-IO: bytes in, bytes / requests / records out."""

from __future__ import annotations

import socket
import ssl
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.mitm import SNIFF_TIMEOUT, FlowProxy
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore

DST = IPv4Address("198.18.0.5")
CA = CertificateAuthority.create("mitm test CA")


def proxy(port: int = 80, name: str | None = "api.test") -> FlowProxy:
    return FlowProxy(dst_ip=DST, dst_port=port, dns_name=name, ca=CA, now=0.0)


def drain(p: FlowProxy) -> bytes:
    out = b""
    while data := p.pending_output(1 << 20):
        p.consume_output(len(data))
        out += data
    return out


def get(path: str, host: str = "api.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


OK = HttpResponse(200, (("Content-Type", "text/plain"),), b"fine")


# --------------------------------------------------------------------------- plain HTTP


def test_http_request_response_keep_alive() -> None:
    p = proxy()
    p.receive(get("/a"))
    (req,) = p.take_requests()
    assert (req.request.url, p.read_limit) == ("http://api.test/a", 0)  # backpressure
    p.respond(OK)
    assert drain(p).startswith(b"HTTP/1.1 200 ") and p.verdict is None
    p.receive(get("/b"))
    assert [r.request.path for r in p.take_requests()] == ["/b"]


def test_pipelined_requests_come_one_at_a_time() -> None:
    p = proxy()
    p.receive(get("/1") + get("/2"))
    assert [r.request.path for r in p.take_requests()] == ["/1"]
    p.respond(OK)
    assert [r.request.path for r in p.take_requests()] == ["/2"]


def test_eof_while_a_response_is_owed_closes_after_it() -> None:
    p = proxy()
    p.receive(get("/x"))
    p.receive(b"")
    assert p.verdict is None  # the response still goes out
    p.respond(OK)
    assert p.verdict == "close" and not p.finished
    assert drain(p).endswith(b"fine")
    assert p.finished


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not HTTP/1.x or TLS"),
        (b"\x16\x03\x01\x00\x05hello", "not a valid TLS ClientHello"),
        (b"", "without sending anything"),
    ],
)
def test_non_http_is_aborted_and_recorded(data: bytes, reason: str) -> None:
    p = proxy(443)
    if data:
        p.receive(data)
    p.receive(b"")
    assert p.verdict == "abort"
    (ex,) = p.take_records()
    assert (ex.method, ex.decision, ex.host, ex.port) == ("", "denied", "api.test", 443)
    assert reason in ex.reason and "[rule: not-http]" in ex.reason
    assert drain(p) == b""


def test_silent_flow_times_out() -> None:
    p = proxy()
    p.receive(b"GE")
    p.on_timer(SNIFF_TIMEOUT - 1)
    assert p.verdict is None and p.deadline == SNIFF_TIMEOUT
    p.on_timer(SNIFF_TIMEOUT)
    assert p.verdict == "abort"
    assert "sniff-timeout" in p.take_records()[0].reason


def test_interceptor_refusal_is_recorded() -> None:
    p = proxy()
    p.receive(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
    (ex,) = p.take_records()
    assert ex.decision == "denied" and "[rule: connect]" in ex.reason
    assert drain(p).startswith(b"HTTP/1.1 405 ") and p.finished


_FRAGMENTS = [
    b"GET / HTTP/1.1\r\n",
    b"POST /x HTTP/1.0\r\n",
    b"Host: api.test\r\n",
    b"Host: other.test:80\r\n",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01",
]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=300), st.sampled_from(_FRAGMENTS)), max_size=10),
    st.sampled_from([80, 443]),
)
def test_any_guest_bytes_never_raise(chunks: list[bytes], port: int) -> None:
    p = proxy(port)
    for chunk in [*chunks, b""]:
        if p.read_limit > 0 or not chunk:
            p.receive(chunk[: max(p.read_limit, 0)] if chunk else b"")
        for req in p.take_requests():
            p.respond(OK if req.request.method != "HEAD" else HttpResponse(204))
    drain(p)
    if p.verdict == "abort":
        assert p.output_bytes == 0


# --------------------------------------------------------------------------- TLS


class TlsClient:
    """A guest TLS client over memory BIOs, pumped against a FlowProxy."""

    def __init__(self, p: FlowProxy, context: ssl.SSLContext, sni: str | None) -> None:
        self.p = p
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.inc, self.out, server_hostname=sni)

    def pump(self) -> None:
        if self.out.pending:
            self.p.receive(self.out.read())
        data = drain(self.p)
        if data:
            self.inc.write(data)

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.pump()
        raise AssertionError("handshake did not finish")

    def request(self, raw: bytes) -> None:
        self.tls.write(raw)
        self.pump()

    def read(self) -> bytes:
        self.pump()
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return out
            if not chunk:
                return out
            out += chunk


def trusting() -> ssl.SSLContext:
    return ssl.create_default_context(cadata=CA.ca_pem.decode())


def test_tls_is_terminated_for_the_sni() -> None:
    p = proxy(443)
    client = TlsClient(p, trusting(), "api.test")
    client.handshake()
    client.request(get("/secure"))
    (req,) = p.take_requests()
    assert req.request.url == "https://api.test/secure"
    p.respond(OK)
    assert client.read().endswith(b"fine")
    assert p.kind == "https"


def test_tls_without_sni_gets_a_certificate_for_the_address() -> None:
    context = trusting()
    context.check_hostname = False  # no SNI: verify the chain; the IP SAN is ours
    p = proxy(443, name=None)
    client = TlsClient(p, context, None)
    client.handshake()
    cert = client.tls.getpeercert()
    assert cert is not None and ("IP Address", str(DST)) in cert["subjectAltName"]
    client.request(get("/", host=str(DST)))
    assert p.take_requests()[0].request.host == str(DST)


def test_tls_host_must_match_sni() -> None:
    p = proxy(443)
    client = TlsClient(p, trusting(), "api.test")
    client.handshake()
    client.request(get("/", host="other.test"))
    assert client.read().startswith(b"HTTP/1.1 421 ")
    assert "[rule: misdirected]" in p.take_records()[0].reason


def test_tls_client_not_trusting_the_ca_is_recorded() -> None:
    p = proxy(443)
    client = TlsClient(p, ssl.create_default_context(), "api.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        client.handshake()
    client.pump()  # deliver the client's alert
    (ex,) = p.take_records()
    assert ex.scheme == "https" and "[rule: tls-handshake]" in ex.reason
    assert p.verdict == "close"


# --------------------------------------------------------------------------- pipeline


def request(host: str = "api.test", headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest(
        method="GET",
        target="/p",
        scheme="https",
        host=host,
        port=443,
        path="/p",
        query="",
        headers=(("Host", host), *headers),
        body=b"",
    )


def context(policy: NetworkPolicy, recorder: Recorder | None = None) -> MediationContext:
    store = SecretStore(policy.secrets) if policy.secrets else None
    return MediationContext(policy, store, recorder or Recorder(redactor=store))


def test_stub_wins_over_policy() -> None:
    ctx = context(NetworkPolicy())
    ctx.recorder.stub("GET", "https://api.test/p", status=201, body=b"stub")
    outcome = plan_request(request(), 0.0, ctx)
    assert isinstance(outcome, Mediated)
    assert outcome.response.status == 201 and outcome.exchange.decision == "stubbed"


def test_denied_by_policy_names_the_rule() -> None:
    outcome = plan_request(
        request("nope.test"), 0.0, context(NetworkPolicy(allow_hosts=["x.test"]))
    )
    assert isinstance(outcome, Mediated)
    assert outcome.response.status == 403
    assert outcome.response.header("X-Gondolin-Rule") == "default-deny"
    assert outcome.exchange.decision == "denied"


def test_secrets_substituted_for_upstream_but_recorded_as_placeholders() -> None:
    policy = NetworkPolicy(
        allow_hosts=["api.test", "other.test"],
        secrets={"TOKEN": Secret(value="v4lue", hosts=["api.test"])},
    )
    ctx = context(policy)
    assert ctx.secrets is not None
    ph = ctx.secrets.placeholder("TOKEN")
    job = plan_request(request(headers=(("Authorization", f"Bearer {ph}"),)), 0.0, ctx)
    assert isinstance(job, UpstreamJob)
    assert job.outgoing.header("Authorization") == "Bearer v4lue"
    assert job.request.header("Authorization") == f"Bearer {ph}"
    leak = plan_request(request("other.test", (("X-Key", ph),)), 0.0, ctx)
    assert isinstance(leak, Mediated)
    assert leak.exchange.decision == "denied" and "[rule: secrets]" in leak.exchange.reason


def test_unreachable_upstream_is_a_502() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = NetworkPolicy(resolve={"api.test:443": f"127.0.0.1:{port}"})
    job = plan_request(request(), 0.0, context(policy))
    assert isinstance(job, UpstreamJob)
    outcome = run_upstream(job, timeout=5.0)
    assert outcome.response.status == 502
    assert outcome.response.header("X-Gondolin-Error") == "upstream"
    assert outcome.exchange.decision == "allowed" and "upstream failed" in outcome.exchange.reason
