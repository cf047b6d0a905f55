"""A secret's value never reaches the guest in pieces, nor as a digest.

An honest upstream that echoes a header and supports ``Range`` (RFC 9110
§14) lets a guest read the value a few bytes at a time -- several 8-byte
ranges joined in the guest, or one multi-range request whose
``multipart/byteranges`` answer splits the value across parts. No piece
holds the whole value, so redaction cannot recognise any. The host
therefore strips ``Range``, ``If-Range`` (and the other fields of
:data:`~.mediation.SLICING_REQUEST_FIELDS`) from requests carrying a
secret, and refuses a partial answer to them all the same (502, ``range``).

Every test drives the real pipeline against :mod:`secret_echo`'s echo
server; every negative control sends the substituted request with the
field directly and shows the leak it would be.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gondolin.netpolicy.http.cassette import open_cassette
from pytest_gondolin.netpolicy.http.mediation import (
    SLICING_REQUEST_FIELDS,
    Mediated,
    MediationContext,
    PartialContentError,
    UpstreamJob,
    plan_request,
    screen_response,
    secret_request_headers,
)
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from tests.unit.netpolicy_app.secret_echo import (
    EchoServer,
    context,
    echo_server,
    mediate,
    request,
    unmediated,
)

VALUE = "tok_Abc123SECRETvalue789"  # the red team's repro: "echo:<value>:end"


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with echo_server() as server:
        yield server


def placeholder(ctx: MediationContext) -> str:
    assert ctx.secrets is not None
    return ctx.secrets.placeholder("TOK")


def parts_of(response: HttpResponse) -> list[bytes]:
    """The bodies of a ``multipart/byteranges`` response (or the one body of a single range)."""
    kind = response.header("Content-Type") or ""
    if not kind.startswith("multipart/byteranges"):
        return [response.body]
    boundary = kind.partition("boundary=")[2].encode()
    out = []
    for part in response.body.split(b"--" + boundary)[1:-1]:
        out.append(part.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n"))
    return out


def test_single_ranges_are_not_forwarded_with_a_secret(echo: EchoServer) -> None:
    """Eight bytes at a time: each guest request gets the whole body, redacted."""
    ctx = context(echo, TOK=VALUE)
    body_size = len(f"echo:{VALUE}:end")
    pieces, leaked = [], []
    for first in range(0, body_size, 8):
        spec = f"bytes={first}-{first + 7}"
        job, outcome = mediate(
            ctx, request("/echo", [("X-Tok", placeholder(ctx)), ("Range", spec)])
        )
        assert job.outgoing.header("Range") is None
        assert "range" not in echo.last()
        assert job.request.header("Range") == spec  # what the guest sent is what is recorded
        assert outcome.response.status == 200
        assert outcome.response.header("Content-Range") is None
        assert VALUE.encode() not in outcome.response.body
        pieces.append(outcome.response.body)
        # negative control: the substituted request with its Range, sent directly
        raw = unmediated(echo, job, (("Range", spec),))
        assert raw.status == 206 and len(raw.body) <= 8
        leaked.append(raw.body)
    joined = b"".join(leaked)
    assert VALUE.encode() in joined  # the pieces, joined, are the value ...
    assert not any(VALUE.encode() in piece for piece in leaked)  # ... none alone holds it
    assert ctx.secrets is not None
    assert [ctx.secrets.redact(piece) for piece in leaked] == leaked  # redaction is blind to them
    assert VALUE.encode() not in b"".join(pieces)
    assert all(placeholder(ctx).encode() in body for body in pieces)
    assert all(r.request_header("Range") for r in ctx.recorder.requests)
    assert VALUE not in ctx.recorder.to_json()


def test_a_multi_range_answer_cannot_split_the_value(echo: EchoServer) -> None:
    """``bytes=5-14,15-60``: two parts, ``tok_Abc123`` and ``SECRETvalue789:end``."""
    ctx = context(echo, TOK=VALUE)
    spec = "bytes=5-14,15-60"
    job, outcome = mediate(ctx, request("/echo", [("X-Tok", placeholder(ctx)), ("Range", spec)]))
    assert "range" not in echo.last()  # the upstream never saw the Range
    # negative control: directly, the upstream answers 206 multipart, the value split
    raw = unmediated(echo, job, (("Range", spec),))
    assert raw.status == 206
    assert (raw.header("Content-Type") or "").startswith("multipart/byteranges")
    assert parts_of(raw) == [b"tok_Abc123", b"SECRETvalue789:end"]
    assert VALUE.encode() not in raw.body  # so byte redaction alone would miss it
    assert ctx.secrets is not None and ctx.secrets.redact(raw.body) == raw.body
    # mediated: the whole body, redacted
    response = outcome.response
    assert response.status == 200
    assert not (response.header("Content-Type") or "").startswith("multipart")
    assert response.body == f"echo:{placeholder(ctx)}:end".encode()
    for part in (b"tok_Abc123", b"SECRETvalue789"):
        assert part not in response.body
        assert part.decode() not in ctx.recorder.to_json()


@pytest.mark.parametrize(
    "field",
    [
        ("If-Range", '"abc"'),
        ("Want-Digest", "sha-256"),
        ("Want-Repr-Digest", "sha-256=1"),
        ("Want-Content-Digest", "sha-256=1"),
        ("Accept-Charset", "cp500"),
        ("TE", "gzip"),
    ],
)
def test_fields_that_slice_or_transform_the_body_are_not_forwarded_with_a_secret(
    echo: EchoServer, field: tuple[str, str]
) -> None:
    ctx = context(echo, TOK=VALUE)
    job, outcome = mediate(ctx, request("/echo", [("X-Tok", placeholder(ctx)), field]))
    assert field[0].lower() in SLICING_REQUEST_FIELDS
    assert job.outgoing.header(field[0]) is None
    assert field[0].lower() not in echo.last()
    assert job.request.header(field[0]) == field[1]  # recorded as the guest sent it
    assert outcome.response.status == 200
    assert outcome.response.body == f"echo:{placeholder(ctx)}:end".encode()
    # negative control: a request without a secret keeps them (a Range is honoured)
    plain, _ = mediate(ctx, request("/echo", [field, ("Range", "bytes=0-3")]))
    assert not plain.carries_secret
    assert plain.outgoing.header(field[0]) == field[1]
    assert plain.outgoing.header("Range") == "bytes=0-3"


def test_an_ebcdic_answer_would_hide_the_value_from_redaction(echo: EchoServer) -> None:
    """Why Accept-Charset goes: an honest server transcodes into a charset nobody searches."""
    ctx = context(echo, TOK=VALUE)
    job, outcome = mediate(ctx, request("/echo", [("X-Tok", placeholder(ctx))]))
    raw = unmediated(echo, job, (("Accept-Charset", "cp500"),))
    assert "cp500" in (raw.header("Content-Type") or "")
    assert ctx.secrets is not None
    assert VALUE in codecs.decode(ctx.secrets.redact(raw.body), "cp500")  # control: a leak
    assert "utf-8" in (outcome.response.header("Content-Type") or "")
    assert VALUE.encode() not in outcome.response.body


@pytest.mark.parametrize("path", ["/always-206", "/content-range"])
def test_a_partial_answer_to_a_secret_carrying_request_is_refused(
    echo: EchoServer, path: str
) -> None:
    """An upstream that answers 206 (or labels a body with Content-Range) all the same."""
    ctx = context(echo, TOK=VALUE)
    job, outcome = mediate(ctx, request(path, [("X-Tok", placeholder(ctx))]))
    assert "range" not in echo.last()
    raw = unmediated(echo, job)
    assert raw.header("Content-Range") is not None  # control: it did answer partially
    response = outcome.response
    assert response.status == 502
    assert response.header("X-Gondolin-Error") == "range"
    assert b"not passed on" in response.body and b"Range" in response.body
    assert VALUE.encode() not in response.body
    (record,) = ctx.recorder.requests
    assert record.decision == "allowed"  # it did reach the upstream
    assert "response refused" in record.reason and "[rule: " in record.reason
    # negative control: a request without a secret gets the partial answer as it is
    _, plain = mediate(ctx, request(path, []))
    assert plain.response.status == raw.status
    assert plain.response.header("Content-Range") is not None


def test_digests_never_reach_the_guest_for_a_secret_carrying_request(echo: EchoServer) -> None:
    """A digest of a body that held the value lets the guest test guesses; HEAD included."""
    ctx = context(echo, TOK=VALUE)
    for method in ("HEAD", "GET"):
        job, outcome = mediate(ctx, request("/echo", [("X-Tok", placeholder(ctx))], method))
        # negative control: the upstream's Content-MD5 is the MD5 of the body with the value
        raw = unmediated(echo, job)
        md5 = base64.b64encode(hashlib.md5(f"echo:{VALUE}:end".encode()).digest()).decode()
        assert raw.header("Content-MD5") == md5
        assert outcome.response.header("Content-MD5") is None
        assert outcome.response.header("Repr-Digest") is None
    # negative control: a request without a secret keeps its digests
    _, plain = mediate(ctx, request("/echo", [], "HEAD"))
    assert plain.response.header("Content-MD5") is not None


def test_a_replayed_partial_answer_is_refused_too(echo: EchoServer, tmp_path: Path) -> None:
    """A cassette recorded before this check may hold a piece of the value."""
    path = tmp_path / "ranges.yaml"
    ctx = context(echo, TOK=VALUE)
    guest = request("/echo", [("X-Tok", placeholder(ctx)), ("Range", "bytes=5-14")])
    job = plan_request(guest, 0.0, ctx)
    assert isinstance(job, UpstreamJob)
    writer = open_cassette(path, "once", secret_store=ctx.secrets)
    writer.record(guest, unmediated(echo, job, (("Range", "bytes=5-14"),)))  # the old answer
    assert writer.save()
    assert "tok_Abc123" in path.read_text()  # control: that cassette holds a piece
    replay = MediationContext(
        ctx.policy, ctx.secrets, ctx.recorder, open_cassette(path, "none", secret_store=ctx.secrets)
    )
    outcome = plan_request(guest, 0.0, replay)
    assert isinstance(outcome, Mediated)
    assert outcome.response.status == 502
    assert outcome.response.header("X-Gondolin-Error") == "range"
    assert b"tok_Abc123" not in outcome.response.body
    assert "replayed" in outcome.exchange.reason and "response refused" in outcome.exchange.reason


# --------------------------------------------------------------------------- sans-IO


def test_secret_request_headers() -> None:
    headers = [
        ("Range", "bytes=0-1"),
        ("X-Tok", "v"),
        ("if-range", "x"),
        ("Accept-Encoding", "gzip"),
        ("want-repr-digest", "sha-256=1"),
        ("If-None-Match", '"e"'),  # conditions stay: If-Match guards writes
    ]
    assert secret_request_headers(headers) == [
        ("X-Tok", "v"),
        ("If-None-Match", '"e"'),
        ("Accept-Encoding", "identity"),
    ]


@pytest.mark.parametrize(
    ("status", "headers", "refused"),
    [
        (206, (), True),
        (200, (("Content-Range", "bytes 0-1/2"),), True),
        (416, (("content-range", "bytes */20"),), True),
        (200, (("Accept-Ranges", "bytes"),), False),
    ],
)
def test_screen_response_refuses_partial_answers_only_with_a_secret(
    status: int, headers: tuple[tuple[str, str], ...], refused: bool
) -> None:
    store = SecretStore({"TOK": Secret(VALUE, ["api.test"])})
    response = HttpResponse(status, headers, b"echo")
    if refused:
        with pytest.raises(PartialContentError, match=re.escape(str(status))) as info:
            screen_response(response, store, carries_secret=True)
        assert info.value.status == status
    else:
        assert screen_response(response, store, carries_secret=True) is response
    # without a secret in the request (or without secrets at all) nothing is refused
    assert screen_response(response, store, carries_secret=False) is response
    assert screen_response(response, None, carries_secret=True) is response
