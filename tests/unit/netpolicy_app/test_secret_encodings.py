"""A secret's value never comes back through a content-coded (or chunked) response body.

An upstream that echoes the request's headers echoes the substituted real
value; redaction compares bytes, so a gzip/deflate/br body would hide the
value from it. These tests drive the real pipeline (``plan_request`` ->
``run_upstream`` -> the interceptor's framing, a recorder, a cassette)
against a local echo server that compresses what it echoes, and scan
everything the guest or a record could see with :func:`exposes`, which
tries every decoding. Each case has its negative control: the upstream's
raw body, fetched without mediation, *does* hold the value once decoded
(and does not hold it as plain bytes, so byte redaction alone misses it).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import importlib
import json
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.cassette import CassettePlayer, open_cassette
from pytest_gondolin.netpolicy.http.cassette_file import Cassette
from pytest_gondolin.netpolicy.http.content_coding import (
    DECODABLE,
    ContentCodingError,
    accept_identity,
    content_codings,
    decode_content,
)
from pytest_gondolin.netpolicy.http.interceptor import HttpInterceptor
from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
    screen_response,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from pytest_gondolin.netpolicy.http.upstream import fetch_upstream

VALUE = "real-coded-secret-7f3a9c"

try:
    brotli: Any = importlib.import_module("brotli")
except ImportError:
    brotli = None


# --------------------------------------------------------------------------- leak scanner


def _decodings(data: bytes) -> Iterator[bytes]:
    """Every way a client might decode ``data`` (lenient: prefixes of broken streams too)."""
    for wbits in (16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS):
        try:
            yield zlib.decompressobj(wbits).decompress(data)
        except zlib.error:
            pass
    try:
        yield gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        pass
    if brotli is not None:
        try:
            yield brotli.decompress(data)
        except brotli.error:
            pass


def exposes(data: bytes | str, value: str = VALUE, depth: int = 3) -> bool:
    """Whether ``value`` is in ``data`` as is, or inside any (stacked) compression of it."""
    raw = data.encode("latin-1", "replace") if isinstance(data, str) else bytes(data)
    if value.encode() in raw:
        return True
    return depth > 0 and any(exposes(d, value, depth - 1) for d in _decodings(raw) if d)


def test_the_scanner_finds_a_value_in_every_coding() -> None:
    """The scanner itself has a negative control: it is not blind to codings."""
    plain = f'{{"Authorization": "Bearer {VALUE}"}}'.encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    samples = [
        plain,
        gzip.compress(plain),
        zlib.compress(plain),
        raw_deflate.compress(plain) + raw_deflate.flush(),
        zlib.compress(gzip.compress(plain)),
    ]
    for sample in samples:
        assert exposes(sample)
    assert not exposes(gzip.compress(b"nothing to see"))


# --------------------------------------------------------------------------- the echo upstream


@dataclass
class Echo:
    """What the echo upstream saw: request headers, in order."""

    port: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last(self) -> dict[str, str]:
        with self.lock:
            return self.seen[-1]


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _bomb() -> bytes:
    """gzip of 80 MiB of zeros (about 80 KiB), built without holding 80 MiB."""
    c = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(80)) + c.flush()


def _split_members(payload: bytes) -> bytes:
    """Two gzip members split in the middle of the value: neither alone holds it."""
    cut = payload.index(VALUE.encode()) + len(VALUE) // 2
    return gzip.compress(payload[:cut]) + gzip.compress(payload[cut:])


# path -> (Content-Encoding fields, encoder)
ROUTES: dict[str, tuple[tuple[str, ...], Callable[[bytes], bytes]]] = {
    "/identity": ((), lambda b: b),
    "/gzip": (("gzip",), gzip.compress),
    "/x-gzip": (("x-gzip",), gzip.compress),
    "/gzip-members": (("gzip",), _split_members),
    "/deflate": (("deflate",), zlib.compress),
    "/raw-deflate": (("deflate",), _raw_deflate),
    "/stacked": (("gzip, deflate",), lambda b: zlib.compress(gzip.compress(b))),
    "/stacked-fields": (("gzip", "Deflate"), lambda b: zlib.compress(gzip.compress(b))),
    "/compress": (("compress",), lambda b: b"\x1f\x9d" + b),
    "/zstd": (("zstd",), lambda b: b"\x28\xb5\x2f\xfd" + b),
    "/truncated": (("gzip",), lambda b: gzip.compress(b)[:-6]),  # the trailer cut short
    "/bomb": (("gzip",), lambda b: _bomb()),
    "/br": (("br",), (lambda b: brotli.compress(b)) if brotli else (lambda b: b"not brotli" + b)),
}


def _handler(echo: Echo) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, send_body: bool) -> None:
            headers = dict(self.headers.items())
            with echo.lock:
                echo.seen.append(headers)
                earlier = [h["Authorization"] for h in echo.seen[:-1] if "Authorization" in h]
            path, _, query = self.path.partition("?")
            payload = json.dumps({"path": self.path, "headers": headers}).encode()
            if path == "/last":  # a stateful upstream: what an earlier request sent
                payload = json.dumps({"earlier": earlier[-1] if earlier else ""}).encode()
                path = "/gzip"
            if path == "/304":
                self.send_response(304)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("ETag", '"abc"')
                self.end_headers()
                return
            chunked = query == "chunked"
            if path == "/honor":  # a well-behaved upstream: codes only what was accepted
                accepted = headers.get("Accept-Encoding", "")
                codings, encode = ROUTES["/gzip" if "gzip" in accepted else "/identity"]
            else:
                codings, encode = ROUTES[path]
            body = encode(payload)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            for coding in codings:
                self.send_header("Content-Encoding", coding)
            self.send_header("Content-MD5", base64.b64encode(b"x" * 16).decode())
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not send_body:
                return
            if chunked:  # 5-byte chunks: the stream and the value straddle chunk boundaries
                for i in range(0, len(body), 5):
                    part = body[i : i + 5]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(send_body=True)

        def do_HEAD(self) -> None:
            self._reply(send_body=False)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    state = Echo()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


# --------------------------------------------------------------------------- the pipeline


def context(echo: Echo, cassette: CassettePlayer | None = None) -> MediationContext:
    policy = NetworkPolicy(
        allow_hosts=["api.test"],
        resolve={"api.test:80": f"127.0.0.1:{echo.port}"},
        secrets={"TOKEN": Secret(value=VALUE, hosts=["api.test"])},
    )
    store = SecretStore(policy.secrets)
    return MediationContext(policy, store, Recorder(redactor=store), cassette)


def guest_request(
    ctx: MediationContext,
    target: str,
    *,
    method: str = "GET",
    secret: bool = True,
    accept: str | None = "gzip, deflate, br",
) -> HttpRequest:
    assert ctx.secrets is not None
    headers = [("Host", "api.test")]
    if accept is not None:
        headers.append(("Accept-Encoding", accept))
    if secret:
        headers.append(("Authorization", f"Bearer {ctx.secrets.placeholder('TOKEN')}"))
    path, _, query = target.partition("?")
    return HttpRequest(method, target, "http", "api.test", 80, path, query, tuple(headers), b"")


def mediate(ctx: MediationContext, request: HttpRequest) -> tuple[UpstreamJob, Mediated]:
    job = plan_request(request, 0.0, ctx)
    assert isinstance(job, UpstreamJob), job
    outcome = run_upstream(job, timeout=20.0)
    ctx.recorder.record(outcome.exchange)
    return job, outcome


def unmediated(echo: Echo, job: UpstreamJob, accept: str = "gzip, deflate, br") -> HttpResponse:
    """The negative control: what the upstream sends for the *substituted* request, raw."""
    headers = [(n, v) for n, v in job.outgoing.headers if n.lower() != "accept-encoding"]
    request = dataclasses.replace(job.outgoing, headers=(*headers, ("Accept-Encoding", accept)))
    return fetch_upstream(request, "127.0.0.1", echo.port, tls=False, server_hostname=None)


def on_the_wire(request: HttpRequest, response: HttpResponse) -> tuple[h11.Response, bytes]:
    """Frame ``response`` as the interceptor sends it to the guest, and parse it back."""
    icpt = HttpInterceptor("http", authority="api.test", port=80)
    wire = f"{request.method} {request.target} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode()
    (event,) = icpt.receive_data(wire)
    icpt.respond(response)
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(method=request.method, target=request.target, headers=[("Host", "api.test")])
    )
    client.send(h11.EndOfMessage())
    client.receive_data(icpt.data_to_send())
    head = client.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    return head, body


def assert_nothing_leaked(ctx: MediationContext, outcome: Mediated) -> None:
    assert not exposes(outcome.response.body)
    assert not any(exposes(v) for _, v in outcome.response.headers)
    assert not exposes(outcome.exchange.response_body)
    assert not exposes(ctx.recorder.to_json())


CODED = [
    "/gzip",
    "/x-gzip",
    "/gzip-members",
    "/deflate",
    "/raw-deflate",
    "/stacked",
    "/stacked-fields",
]


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("path", CODED)
def test_coded_echo_reaches_the_guest_decoded_and_redacted(
    echo: Echo, path: str, chunked: bool
) -> None:
    """The upstream ignores ``Accept-Encoding: identity``: the host decodes, redacts, re-frames."""
    ctx = context(echo)
    assert ctx.secrets is not None
    placeholder = ctx.secrets.placeholder("TOKEN")
    request = guest_request(ctx, path + ("?chunked" if chunked else ""))
    job, outcome = mediate(ctx, request)
    # negative control: the same upstream answer, unmediated, holds the value -- coded
    raw = unmediated(echo, job)
    assert content_codings(raw.headers) and exposes(raw.body) and VALUE.encode() not in raw.body
    # the guest: decoded JSON, the placeholder where the value was, no coding, right length
    assert outcome.response.status == 200, outcome.response.body
    assert_nothing_leaked(ctx, outcome)
    head, body = on_the_wire(request, outcome.response)
    names = {n.lower() for n, _ in head.headers}
    assert b"content-encoding" not in names and b"content-md5" not in names
    assert dict(head.headers)[b"content-length"] == str(len(body)).encode()
    echoed = json.loads(body)
    assert echoed["headers"]["Authorization"] == f"Bearer {placeholder}"
    assert outcome.exchange.decision == "allowed"


def test_a_value_split_across_chunks_is_redacted(echo: Echo) -> None:
    ctx = context(echo)
    job, outcome = mediate(ctx, guest_request(ctx, "/identity?chunked", accept=None))
    raw = unmediated(echo, job)
    assert VALUE.encode() in raw.body  # h11 dechunked it: the whole value, in one piece
    assert_nothing_leaked(ctx, outcome)
    assert b"GONDOLIN_SECRET_TOKEN_" in outcome.response.body
    # a digest of the body that held the value goes too; a clean body keeps its own
    assert outcome.response.header("Content-MD5") is None
    _, clean = mediate(ctx, guest_request(ctx, "/identity", secret=False))
    assert clean.response.header("Content-MD5") is not None


def test_a_transfer_coding_other_than_chunked_is_refused() -> None:
    """h11 only removes ``chunked``; ``Transfer-Encoding: gzip`` never reaches the guest."""
    body = gzip.compress(f"Bearer {VALUE}".encode())
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        ctx = context(Echo(port=port))
        _, outcome = mediate(ctx, guest_request(ctx, "/te"))
        thread.join(5)
    assert outcome.response.status == 502
    assert outcome.response.header("X-Gondolin-Error") == "upstream"
    assert_nothing_leaked(ctx, outcome)


def test_secret_carrying_requests_go_upstream_with_accept_encoding_identity(echo: Echo) -> None:
    ctx = context(echo)
    request = guest_request(ctx, "/honor", accept="gzip, br;q=0.9")
    job, outcome = mediate(ctx, request)
    assert job.carries_secret
    assert job.request.header("Accept-Encoding") == "gzip, br;q=0.9"  # what is recorded
    assert [v for n, v in job.outgoing.headers if n.lower() == "accept-encoding"] == ["identity"]
    assert echo.last()["Accept-Encoding"] == "identity"
    assert outcome.response.header("Content-Encoding") is None  # a well-behaved upstream obeys
    assert outcome.exchange.request_header("Accept-Encoding") == "gzip, br;q=0.9"
    assert_nothing_leaked(ctx, outcome)
    # also when the guest sent none (no Accept-Encoding means "anything", RFC 9110 §12.5.3)
    job, _ = mediate(ctx, guest_request(ctx, "/honor", accept=None))
    assert job.outgoing.header("Accept-Encoding") == "identity"
    # negative control: a request without a secret keeps its Accept-Encoding and coding
    job, outcome = mediate(ctx, guest_request(ctx, "/honor", secret=False, accept="gzip"))
    assert not job.carries_secret and job.outgoing.header("Accept-Encoding") == "gzip"
    assert echo.last()["Accept-Encoding"] == "gzip"
    assert outcome.response.header("Content-Encoding") == "gzip"


@pytest.mark.parametrize("path", ["/compress", "/zstd", "/truncated"])
def test_an_undecodable_coding_is_refused_never_passed_on(echo: Echo, path: str) -> None:
    ctx = context(echo)
    job, outcome = mediate(ctx, guest_request(ctx, path))
    assert exposes(unmediated(echo, job).body)  # negative control: the value was in there
    response = outcome.response
    assert response.status == 502
    assert response.header("X-Gondolin-Error") == "content-encoding"
    assert b"carrying a secret" in response.body and b"not passed on" in response.body
    assert outcome.exchange.decision == "allowed"  # the request did reach the upstream
    assert "response refused" in outcome.exchange.reason
    assert_nothing_leaked(ctx, outcome)
    # negative control: a request without a secret gets the upstream's bytes as they are
    _, plain = mediate(ctx, guest_request(ctx, path, secret=False))
    assert plain.response.status == 200 and plain.response.header("Content-Encoding")


def test_a_decompression_bomb_is_refused_with_a_clear_reason(echo: Echo) -> None:
    ctx = context(echo)
    _, outcome = mediate(ctx, guest_request(ctx, "/bomb"))
    assert outcome.response.status == 502
    assert outcome.response.header("X-Gondolin-Error") == "content-encoding"
    assert b"decompression bomb" in outcome.response.body
    assert "decompression bomb" in outcome.exchange.reason


def test_br_is_decoded_when_a_bounded_brotli_is_installed_and_refused_otherwise(echo: Echo) -> None:
    ctx = context(echo)
    job, outcome = mediate(ctx, guest_request(ctx, "/br"))
    if "br" in DECODABLE:
        assert exposes(unmediated(echo, job).body)  # negative control
        assert outcome.response.status == 200
        assert outcome.response.header("Content-Encoding") is None
        assert b"GONDOLIN_SECRET_TOKEN_" in outcome.response.body
    else:
        assert outcome.response.status == 502
        assert b"brotli" in outcome.response.body
    assert_nothing_leaked(ctx, outcome)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_head_and_304_have_no_body_to_decode(echo: Echo, method: str) -> None:
    ctx = context(echo)
    path = "/gzip" if method == "HEAD" else "/304"
    request = guest_request(ctx, path, method=method)
    _, outcome = mediate(ctx, request)
    assert outcome.response.status == (200 if method == "HEAD" else 304)
    assert outcome.response.body == b""
    head, body = on_the_wire(request, outcome.response)
    assert body == b"" and head.status_code == outcome.response.status


def test_a_stateful_upstream_cannot_return_the_value_coded_to_a_request_without_it(
    echo: Echo,
) -> None:
    """``/last`` answers (gzip) what the previous request sent; this request carries no secret."""
    ctx = context(echo)
    mediate(ctx, guest_request(ctx, "/identity"))  # sends the value
    request = guest_request(ctx, "/last", secret=False, accept="gzip")
    job, outcome = mediate(ctx, request)
    assert not job.carries_secret
    assert exposes(unmediated(echo, job, "gzip").body)  # negative control (the value, coded)
    assert_nothing_leaked(ctx, outcome)
    assert outcome.response.header("Content-Encoding") is None  # decoded, since it held a value
    # ... while a clean coded answer to a request without a secret is passed on byte for byte
    _, clean = mediate(ctx, guest_request(ctx, "/gzip", secret=False))
    assert clean.response.header("Content-Encoding") == "gzip"
    assert gzip.decompress(clean.response.body).startswith(b'{"path": "/gzip"')


# --------------------------------------------------------------------------- cassettes


def test_a_recorded_cassette_holds_no_value_in_any_coding(echo: Echo, tmp_path: Path) -> None:
    path = tmp_path / "coded.yaml"
    ctx = context(echo)
    ctx = MediationContext(
        ctx.policy, ctx.secrets, ctx.recorder, open_cassette(path, "once", secret_store=ctx.secrets)
    )
    for target in ("/gzip", "/deflate?chunked", "/stacked", "/identity"):
        job, outcome = mediate(ctx, guest_request(ctx, target))
        assert exposes(unmediated(echo, job).body)  # negative control: every answer held it
        assert outcome.response.status == 200
    assert ctx.cassette is not None and ctx.cassette.save()
    text = path.read_text()
    assert not exposes(text)
    interactions = Cassette.load(path).interactions
    assert len(interactions) == 4
    for interaction in interactions:
        response = interaction.response
        assert not exposes(response.body)
        assert not content_codings(response.headers)  # stored decoded
        assert b"GONDOLIN_SECRET_TOKEN" in response.body  # the echo was recorded, redacted


def test_an_old_cassette_with_a_coded_value_replays_redacted(echo: Echo, tmp_path: Path) -> None:
    """A cassette written before decoding existed (raw gzip body holding the value)."""
    path = tmp_path / "old.yaml"
    ctx = context(echo)
    request = guest_request(ctx, "/gzip")
    job = plan_request(request, 0.0, ctx)
    assert isinstance(job, UpstreamJob)
    writer = open_cassette(path, "once", secret_store=ctx.secrets)
    writer.record(request, unmediated(echo, job))  # what the old pipeline stored
    assert writer.save()
    stored = Cassette.load(path).interactions[0].response.body
    assert exposes(stored)  # negative control: that cassette does leak
    replay_ctx = MediationContext(
        ctx.policy, ctx.secrets, ctx.recorder, open_cassette(path, "none", secret_store=ctx.secrets)
    )
    outcome = plan_request(request, 0.0, replay_ctx)
    assert isinstance(outcome, Mediated)
    assert outcome.exchange.decision == "replayed"
    assert_nothing_leaked(ctx, outcome)
    assert outcome.response.header("Content-Encoding") is None


# --------------------------------------------------------------------------- sans-IO pieces


STORE = SecretStore({"TOKEN": Secret(value=VALUE, hosts=["api.test"])})


def coded(body: bytes, *codings: str) -> HttpResponse:
    return HttpResponse(200, tuple(("Content-Encoding", c) for c in codings), body)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["gzip"], ("gzip",)),
        (["X-GZIP"], ("gzip",)),
        (["gzip, deflate"], ("gzip", "deflate")),
        (["gzip", " br "], ("gzip", "br")),
        (["identity", ", ,"], ()),
        (["identity, gzip"], ("gzip",)),
        (["x-compress"], ("compress",)),
    ],
)
def test_content_codings(fields: list[str], expected: tuple[str, ...]) -> None:
    headers = [("Content-Type", "x"), *(("content-encoding", f) for f in fields)]
    assert content_codings(headers) == expected


def test_accept_identity_replaces_every_accept_encoding() -> None:
    headers = [("Accept-Encoding", "gzip"), ("X", "1"), ("accept-encoding", "br")]
    assert accept_identity(headers) == [("X", "1"), ("Accept-Encoding", "identity")]


def test_decode_cap_is_exact() -> None:
    data = b"a" * 1000
    for body, codings in ((gzip.compress(data), ["gzip"]), (zlib.compress(data), ["deflate"])):
        assert decode_content(body, codings, max_bytes=1000) == data
        with pytest.raises(ContentCodingError, match="decompression bomb") as info:
            decode_content(body, codings, max_bytes=999)
        assert info.value.bomb
    # the cap also holds for every intermediate of a stacked coding
    with pytest.raises(ContentCodingError, match="decompression bomb"):
        decode_content(zlib.compress(gzip.compress(data)), ["gzip", "deflate"], max_bytes=100)


@pytest.mark.parametrize(
    ("body", "codings", "message"),
    [
        # mtime=0: the parameters' ids hold the bytes, and xdist's workers
        # must collect the same ids (a gzip header holds the time).
        (gzip.compress(b"x", mtime=0) + b"junk", ["gzip"], "corrupt"),
        (zlib.compress(b"x") + b"junk", ["deflate"], "after the end"),
        (gzip.compress(b"x", mtime=0)[:-4], ["gzip"], "truncated"),
        (b"\x00\x01\x02", ["gzip"], "corrupt"),
        (b"x", ["compress"], "not a coding the host can decode"),
    ],
)
def test_bad_coded_bodies_raise_content_coding_error(
    body: bytes, codings: list[str], message: str
) -> None:
    with pytest.raises(ContentCodingError, match=message):
        decode_content(body, codings, max_bytes=1 << 20)


def test_screen_response() -> None:
    held = gzip.compress(f"token={VALUE}".encode())
    clean = gzip.compress(b"nothing here")
    # a secret-carrying request: always decoded (the value is redacted later, by _finish)
    out = screen_response(coded(held, "gzip"), STORE, carries_secret=True)
    assert out.body == f"token={VALUE}".encode() and out.header("Content-Encoding") is None
    out = screen_response(coded(clean, "gzip"), STORE, carries_secret=True)
    assert out.body == b"nothing here"
    # a request without: decoded only when the value is in there
    assert screen_response(coded(held, "gzip"), STORE, carries_secret=False).body.startswith(
        b"token="
    )
    same = coded(clean, "gzip")
    assert screen_response(same, STORE, carries_secret=False) is same
    undecodable = coded(b"??", "zstd")
    assert screen_response(undecodable, STORE, carries_secret=False) is undecodable
    with pytest.raises(ContentCodingError):
        screen_response(undecodable, STORE, carries_secret=True)
    # no secrets configured, or nothing to decode: untouched
    assert screen_response(same, None, carries_secret=True) is same
    empty = coded(b"", "zstd")
    assert screen_response(empty, STORE, carries_secret=True) is empty


@given(
    st.binary(max_size=300),
    st.lists(st.sampled_from(["gzip", "deflate", "br", "zstd", "compress"]), max_size=3),
)
def test_decode_content_never_fails_unexpectedly(body: bytes, codings: list[str]) -> None:
    """Hostile upstream bytes: decoded or ContentCodingError, never another exception."""
    try:
        out = decode_content(body, codings, max_bytes=4096)
    except ContentCodingError:
        return
    assert len(out) <= 4096


def test_br_cap_truncation_and_trailing_bytes() -> None:
    if "br" not in DECODABLE:
        pytest.skip("no brotli >= 1.2 importable here (br is refused then, see above)")
    data = b"b" * 100_000
    body = brotli.compress(data)
    assert decode_content(body, ["br"], max_bytes=100_000) == data
    with pytest.raises(ContentCodingError, match="decompression bomb"):
        decode_content(brotli.compress(bytes(50 << 20)), ["br"], max_bytes=1 << 20)
    with pytest.raises(ContentCodingError, match="truncated"):
        decode_content(body[:-2], ["br"], max_bytes=1 << 20)
    with pytest.raises(ContentCodingError, match="corrupt"):
        decode_content(body + b"junk", ["br"], max_bytes=1 << 20)
