"""Recorder: filtering, assertion messages, stubs, bounds, thread safety, JSON."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Any

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.recorder import Exchange, Recorder, normalize_url
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore


def ex(
    method: str = "GET",
    url: str = "https://api.example.com/v1/items?page=2",
    *,
    status: int | None = 200,
    decision: str = "allowed",
    reason: str = "matches allow_hosts entry 'api.example.com'",
    request_body: bytes = b"",
    response_body: bytes = b"ok",
    **extra: Any,
) -> Exchange:
    scheme, rest = url.split("://", 1)
    authority, _, target = rest.partition("/")
    path, _, query = ("/" + target).partition("?")
    host, _, port = authority.partition(":")
    return Exchange(
        method=method,
        url=url,
        scheme=scheme,
        host=host,
        port=int(port) if port else (443 if scheme == "https" else 80),
        path=path,
        query=query,
        request_headers=(("Host", authority), ("Accept", "*/*")),
        request_body=request_body,
        status=status,
        response_headers=(("Content-Type", "text/plain"),),
        response_body=response_body,
        decision=decision,  # type: ignore[arg-type]
        reason=reason,
        **extra,
    )


@pytest.fixture
def rec() -> Recorder:
    r = Recorder()
    r.record(ex())
    r.record(ex("POST", "https://api.example.com/v1/items", status=201))
    r.record(ex("GET", "http://other.example/v1/items"))
    r.record(Exchange.connection_denied("evil.example", 22, "not HTTP/1.x or TLS"))
    return r


def test_exchange_has_exactly_the_public_fields() -> None:
    assert [f.name for f in dataclasses.fields(Exchange)] == [
        "method", "url", "scheme", "host", "port", "path", "query",
        "request_headers", "request_body", "status", "response_headers", "response_body",
        "decision", "reason",
        "request_body_truncated", "response_body_truncated", "started", "duration",
        "bodies_dropped", "http_version",
    ]  # fmt: skip


def test_exchange_is_frozen_and_headers_case_insensitive() -> None:
    e = ex()
    assert e.request_header("accept") == "*/*"
    assert e.header("HOST") == "api.example.com"
    assert e.response_header("content-type") == "text/plain"
    assert e.request_header("missing") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.status = 500  # type: ignore[misc]
    with pytest.raises(ValueError, match="decision must be one of"):
        ex(decision="maybe")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, 4),
        ({"method": "get"}, 2),
        ({"method": "POST"}, 1),
        ({"host": "API.example.com"}, 2),
        ({"host": "evil.example"}, 1),
        ({"path": "/v1/items"}, 3),
        ({"path": re.compile(r"^/v1/")}, 3),
        ({"url": "https://api.example.com/v1/items?page=2"}, 1),
        ({"url": "https://api.example.com/v1/items"}, 1),
        ({"url": re.compile(r"page=\d")}, 1),
        ({"method": "GET", "host": "other.example", "path": "/v1/items"}, 1),
        ({"method": "DELETE"}, 0),
        ({"method": ""}, 1),  # the denied non-HTTP connection
    ],
)
def test_get_requests_filters(rec: Recorder, filters: dict[str, Any], expected: int) -> None:
    assert len(rec.get_requests(**filters)) == expected


def test_denied_connection_record(rec: Recorder) -> None:
    (denied,) = rec.get_requests(host="evil.example")
    assert (denied.method, denied.port, denied.decision, denied.status) == ("", 22, "denied", None)
    assert "connection to evil.example:22" in denied.summary()


def test_assert_request_made_passes_and_returns_matches(rec: Recorder) -> None:
    assert len(rec.assert_request_made(method="POST", host="api.example.com")) == 1
    assert len(rec.assert_request_made(path="/v1/items", count=3)) == 3
    assert rec.assert_request_made(host="api.example.com", count=None)


def test_assert_request_made_lists_similar_requests(rec: Recorder) -> None:
    with pytest.raises(AssertionError) as info:
        rec.assert_request_made(method="DELETE", host="api.example.com")
    text = str(info.value)
    assert "expected 1 request(s) matching method='DELETE', host='api.example.com', found 0" in text
    assert "similar requests (same host or path):" in text
    assert "GET https://api.example.com/v1/items?page=2 -> 200 (allowed" in text
    assert "POST https://api.example.com/v1/items -> 201" in text
    assert "other.example" not in text  # not similar: other host, path not asked


def test_assert_request_made_similar_by_path_and_wrong_count(rec: Recorder) -> None:
    with pytest.raises(AssertionError) as info:
        rec.assert_request_made(host="nowhere.example", path="/v1/items")
    assert "http://other.example/v1/items" in str(info.value)
    with pytest.raises(AssertionError, match=r"expected 1 request.*found 2"):
        rec.assert_request_made(method="GET", path="/v1/items")


def test_assert_request_made_with_nothing_similar_lists_everything(rec: Recorder) -> None:
    with pytest.raises(AssertionError, match="no similar requests; 4 recorded in all") as info:
        rec.assert_request_made(host="nowhere.example")
    assert "connection to evil.example:22" in str(info.value)
    with pytest.raises(AssertionError, match="no requests were recorded at all"):
        Recorder().assert_request_made(host="x")


def test_requests_is_a_copy(rec: Recorder) -> None:
    rec.requests.clear()
    assert len(rec.requests) == 4
    rec.clear()
    assert rec.requests == []


def test_stub_matching_and_precedence() -> None:
    r = Recorder()
    first = r.stub("GET", "https://API.example.com:443/users", json={"users": []})
    assert first.url == "https://api.example.com/users"
    assert first.body == b'{"users": []}'
    assert ("Content-Type", "application/json") in first.headers
    assert r.find_stub("get", "https://api.example.com/users?page=3") is first
    assert r.find_stub("POST", "https://api.example.com/users") is None
    assert r.find_stub("GET", "http://api.example.com/users") is None
    assert r.find_stub("GET", "https://api.example.com/users/1") is None
    exact = r.stub("GET", "https://api.example.com/users?page=1", status=404, body="none")
    assert r.find_stub("GET", "https://api.example.com/users?page=1") is exact
    assert r.find_stub("GET", "https://api.example.com/users?page=2") is first
    anything = r.stub("*", "https://api.example.com/users", status=503)
    assert r.find_stub("DELETE", "https://api.example.com/users") is anything
    assert r.find_stub("GET", "not a url") is None
    r.clear()
    assert (
        r.find_stub("DELETE", "https://api.example.com/users") is anything
    )  # stubs survive clear()
    r.clear(stubs=True)
    assert r.find_stub("DELETE", "https://api.example.com/users") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "GET", "url": "ftp://x/"}, "not an absolute http"),
        ({"method": "GET", "url": "/relative"}, "not an absolute http"),
        ({"method": "GET", "url": "https://x:99999/"}, "not a valid URL"),
        ({"method": "GE T", "url": "https://x/"}, "not an HTTP method"),
        ({"method": "GET", "url": "https://x/", "status": 101}, "200..599"),
        ({"method": "GET", "url": "https://x/", "body": b"x", "json": {}}, "either body= or json="),
        ({"method": "GET", "url": "https://x/", "json": {1, 2}}, "not JSON-serialisable"),
        ({"method": "GET", "url": "https://x/", "headers": [("a", 1)]}, "string pairs"),
    ],
)
def test_stub_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recorder().stub(**kwargs)


def test_normalize_url() -> None:
    assert normalize_url("HTTP://Example.COM:80") == "http://example.com/"
    assert normalize_url("https://[::1]:8443/a?b=1#frag") == "https://[::1]:8443/a?b=1"
    assert normalize_url("https://Bücher.example/") == "https://xn--bcher-kva.example/"
    with pytest.raises(ConfigError, match="does not name a valid host"):
        normalize_url("https://exa_mple..com/")


def test_host_filter_is_idna_aware() -> None:
    r = Recorder()
    r.record(ex(url="https://xn--bcher-kva.example/"))
    assert len(r.get_requests(host="BÜCHER.example")) == 1
    r.stub("GET", "https://bücher.example/")
    assert r.find_stub("GET", "https://xn--bcher-kva.example/") is not None


def test_body_cap_truncates_and_flags() -> None:
    r = Recorder(body_limit=10)
    stored = r.record(ex(request_body=b"x" * 11, response_body=b"y" * 10))
    assert stored.request_body == b"x" * 10 and stored.request_body_truncated
    assert stored.response_body == b"y" * 10 and not stored.response_body_truncated
    assert Recorder().record(ex(response_body=b"z" * (2 << 20))).response_body_truncated


def test_max_exchanges_drops_oldest() -> None:
    r = Recorder(max_exchanges=3)
    for i in range(5):
        r.record(ex(url=f"https://a.example/{i}"))
    assert [e.path for e in r.requests] == ["/2", "/3", "/4"]
    assert r.dropped == 2


def test_redactor_applied_to_everything_recorded() -> None:
    store = SecretStore({"TOKEN": Secret("hunter2", ["a.example"])})
    ph = store.placeholder("TOKEN")
    r = Recorder(redactor=store)
    stored = r.record(
        dataclasses.replace(
            ex(url="https://a.example/?t=hunter2", reason="saw hunter2"),
            request_headers=(("Authorization", "Bearer hunter2"),),
            response_headers=(("X-Echo", "hunter2"),),
            request_body=b"pw=hunter2",
            response_body=b'{"token": "hunter2"}',
        )
    )
    assert "hunter2" not in r.to_json()
    assert stored.request_header("authorization") == f"Bearer {ph}"
    assert stored.response_body == f'{{"token": "{ph}"}}'.encode()
    assert ph in stored.url and ph in stored.query and ph in stored.reason


def test_to_json_round_trips_bodies(rec: Recorder) -> None:
    rec.record(ex(response_body=b"\xff\x00binary"))
    rec.stub("GET", "https://x.example/", body=b"stubbed")
    doc = json.loads(rec.to_json())
    assert len(doc["exchanges"]) == 5
    first = doc["exchanges"][0]
    assert first["method"] == "GET" and first["response_body"] == {"text": "ok"}
    assert first["request_headers"][0] == ["Host", "api.example.com"]
    assert doc["exchanges"][-1]["response_body"] == {"base64": "/wBiaW5hcnk="}
    assert doc["stubs"][0]["body"] == {"text": "stubbed"}


def test_exchange_json_helper() -> None:
    assert ex(response_body=b'{"a": 1}').json() == {"a": 1}


def test_thread_safety_smoke() -> None:
    """A network thread records while the test thread reads and filters."""
    r = Recorder(max_exchanges=100_000)
    writers = 4
    per_writer = 500
    start = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        start.wait()
        for i in range(per_writer):
            r.record(ex(url=f"https://w{n}.example/{i}"))

    def read() -> None:
        start.wait()
        try:
            while any(t.is_alive() for t in threads):
                snapshot = r.requests
                assert all(isinstance(e, Exchange) for e in snapshot)
                r.get_requests(method="GET")
                r.find_stub("GET", "https://w0.example/1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    reader = threading.Thread(target=read)
    for t in threads:
        t.start()
    reader.start()
    for t in threads:
        t.join(timeout=10)
    reader.join(timeout=10)
    assert not errors
    assert len(r.requests) == writers * per_writer
    assert len(r.get_requests(host="w3.example")) == per_writer
