"""What one test's traffic can make the recorder hold: bodies, records and stubs, all bounded.

A guest chooses every byte the recorder keeps, so each bound is checked
at its edge with a control just inside it, and the recorder's size
estimate is checked against what Python really allocates.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.guest.recording import body_json, exchange_from_dict
from pytest_gondolin.netpolicy.http.recorder import (
    DEFAULT_BODY_BUDGET,
    DEFAULT_BODY_LIMIT,
    DEFAULT_MAX_RECORDED_BYTES,
    MAX_STUB_BODY_BYTES,
    MAX_STUB_BYTES,
    MAX_STUBS,
    Exchange,
    Recorder,
    record_size,
)
from pytest_gondolin.sandbox.queries import answer_query

MiB = 1 << 20


def post(i: int = 0, body: bytes = b"", *, path: str = "/x", **extra: Any) -> Exchange:
    url = f"http://flood.test{path}"
    return Exchange(
        method="POST",
        url=url,
        scheme="http",
        host="flood.test",
        port=80,
        path=path,
        query="",
        request_headers=(("Host", "flood.test"), ("Content-Length", str(len(body)))),
        request_body=body,
        status=200,
        response_headers=(("Content-Length", "2"),),
        response_body=b"ok",
        decision="stubbed",
        reason=f"matched stub * {url} #{i}",
        **extra,
    )


# --------------------------------------------------------------------------- bodies and records


def test_bodies_are_kept_until_the_budget_then_dropped_and_flagged() -> None:
    r = Recorder()
    stored = [r.record(post(i, bytes([i % 251]) * MiB)) for i in range(60)]
    whole = [e for e in stored if not e.bodies_dropped]
    # Control: the first ones are whole, bodies included.
    assert 28 <= len(whole) <= 32 and whole == stored[: len(whole)]
    assert all(e.request_body == bytes([i % 251]) * MiB for i, e in enumerate(whole))
    for e in stored[len(whole) :]:
        assert e.bodies_dropped and e.request_body == b"" and e.response_body == b""
        assert e.request_body_truncated and e.response_body_truncated
        # Everything else is recorded as usual.
        assert (e.method, e.url, e.status, e.decision) == (
            "POST",
            "http://flood.test/x",
            200,
            "stubbed",
        )
        assert e.request_header("content-length") == str(MiB)
    assert len(r.requests) == 60 and r.dropped == 0
    assert r.assert_request_made(method="POST", url="http://flood.test/x", count=60)
    assert r.held_bytes <= DEFAULT_BODY_BUDGET + 60 * 4096


def test_once_the_budget_is_spent_small_bodies_are_dropped_too_until_clear() -> None:
    r = Recorder(body_budget=3 * MiB // 2, max_bytes=4 * MiB)
    assert not r.record(post(0, b"a" * MiB)).bodies_dropped
    assert r.record(post(1, b"b" * MiB)).bodies_dropped
    # Monotonic: a later small body does not reappear (the budget is per test).
    assert r.record(post(2, b"tiny")).bodies_dropped
    assert not r.record(post(3)).request_body_truncated  # nothing to drop: no flag
    r.clear()
    assert r.record(post(4, b"c" * MiB)).request_body == b"c" * MiB


def test_each_body_is_capped_before_the_budget_counts_it() -> None:
    r = Recorder()
    e = r.record(post(0, b"x" * (5 * MiB)))
    assert len(e.request_body) == DEFAULT_BODY_LIMIT and e.request_body_truncated
    assert not e.bodies_dropped and r.held_bytes < 2 * MiB


@pytest.mark.parametrize(
    ("shape", "make"),
    [
        ("huge URL", lambda i: post(i, path="/" + "u" * 60_000)),
        ("many tiny headers", lambda i: dataclasses.replace(
            post(i), request_headers=tuple((f"h{j}", "v") for j in range(5_000))
        )),
        ("1 MiB bodies", lambda i: post(i, b"z" * MiB)),
    ],
)  # fmt: skip
def test_records_never_hold_more_than_max_bytes_whatever_their_shape(
    shape: str, make: Callable[[int], Exchange]
) -> None:
    r = Recorder()
    for i in range(400):
        r.record(make(i))
    assert r.held_bytes <= DEFAULT_MAX_RECORDED_BYTES
    kept = r.requests
    assert kept[-1].reason.endswith("#399")  # the newest is always there
    assert len(kept) + r.dropped == 400
    assert actual_size(kept) <= r.held_bytes, shape


def test_count_cap_still_drops_the_oldest() -> None:
    r = Recorder(max_exchanges=5)
    for i in range(8):
        r.record(post(i))
    assert [e.reason[-2:] for e in r.requests] == ["#3", "#4", "#5", "#6", "#7"]
    assert r.dropped == 3


def actual_size(exchanges: list[Exchange]) -> int:
    """Bytes Python allocates for independent copies of ``exchanges`` (tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        copies = [exchange_from_dict(e.to_dict()) for e in exchanges]
        size = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(copies) == len(exchanges)
    return size


@pytest.mark.parametrize(
    "exchange",
    [
        post(0),
        post(0, b"b" * 100_000),
        post(0, path="/" + "p" * 50_000),
        dataclasses.replace(
            post(0), request_headers=tuple((f"n{j}", "v" * 3) for j in range(3000))
        ),
        Exchange.connection_denied("evil.test", 22, "not HTTP [rule: not-http]"),
    ],
    ids=["ordinary", "body", "long-url", "many-headers", "connection"],
)
def test_size_estimate_is_never_below_what_python_allocates(exchange: Exchange) -> None:
    # Negative control of the measurement: it sees a body it copies.
    assert actual_size([exchange]) >= len(exchange.request_body)
    assert actual_size([exchange] * 50) <= 50 * record_size(exchange)


def test_bodies_dropped_crosses_to_the_guest_and_old_records_still_parse() -> None:
    r = Recorder(body_budget=0)
    stored = r.record(post(0, b"body"))
    data = json.loads(json.dumps(stored.to_dict()))
    assert data["bodies_dropped"] is True
    assert exchange_from_dict(data) == stored
    del data["bodies_dropped"]  # as an older host sends it
    assert exchange_from_dict(data).bodies_dropped is False
    data["unknown_future_field"] = 1  # as a newer host may send it
    assert exchange_from_dict(data).request_body == b""
    with pytest.raises(ValueError, match="bodies_dropped"):
        exchange_from_dict({**data, "bodies_dropped": "yes"})


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"plain text\twith\r\nlines", "text"),
        ("ünïcode".encode(), "text"),
        (b"\x00" * 64, "base64"),  # JSON would write each NUL as six characters
        (b"ok\x1b[0m", "base64"),
        (b"\xff\xfe", "base64"),
    ],
)
def test_body_json_uses_base64_where_escaping_would_cost_more(body: bytes, kind: str) -> None:
    encoded = body_json(body)
    assert list(encoded) == [kind]
    value = encoded[kind]
    assert (base64.b64decode(value) if kind == "base64" else value.encode()) == body
    assert len(json.dumps(encoded)) <= 2 * len(body) + 20


# --------------------------------------------------------------------------- stubs


def test_stub_body_is_capped() -> None:
    r = Recorder()
    r.stub_from_guest(
        "GET", "http://a.test/ok", body=b"x" * MAX_STUB_BODY_BYTES
    )  # control: at the limit
    with pytest.raises(
        ConfigError, match=r"exceeds the limit of 1048576 bytes per stub \(MAX_STUB_BODY_BYTES\)"
    ):
        r.stub_from_guest("GET", "http://a.test/big", body=b"x" * (MAX_STUB_BODY_BYTES + 1))
    with pytest.raises(ConfigError, match="MAX_STUB_BODY_BYTES"):
        r.stub_from_guest("GET", "http://a.test/big", json="x" * MAX_STUB_BODY_BYTES)
    assert [s.url for s in r.stubs] == ["http://a.test/ok"]


def test_stub_count_is_capped_and_the_same_url_replaces() -> None:
    r = Recorder()
    for i in range(MAX_STUBS):
        r.stub_from_guest("GET", f"http://a.test/{i}")
    # Re-registering a method and URL replaces the old stub: no growth, latest wins.
    r.stub_from_guest("GET", "http://a.test/0", status=404)
    assert len(r.stubs) == MAX_STUBS
    found = r.find_stub("GET", "http://a.test/0")
    assert found is not None and found.status == 404
    with pytest.raises(ConfigError, match=r"at most 256 stubs at once \(MAX_STUBS\)"):
        r.stub_from_guest("GET", "http://a.test/one-more")
    r.clear(stubs=True)
    r.stub_from_guest("GET", "http://a.test/one-more")


def test_stub_bytes_are_capped_in_total() -> None:
    r = Recorder()
    for i in range(15):
        r.stub_from_guest("GET", f"http://a.test/{i}", body=b"x" * MAX_STUB_BODY_BYTES)
    with pytest.raises(ConfigError, match=r"over the limit of 16777216 \(MAX_STUB_BYTES\)"):
        r.stub_from_guest("GET", "http://a.test/16", body=b"x" * MAX_STUB_BODY_BYTES)
    assert len(r.stubs) == 15
    assert sum(len(s.body) for s in r.stubs) <= MAX_STUB_BYTES
    # Replacing one by a smaller one frees its bytes.
    r.stub_from_guest("GET", "http://a.test/0", body=b"small")
    r.stub_from_guest("GET", "http://a.test/16", body=b"x" * MAX_STUB_BODY_BYTES)


def test_host_stubs_are_trusted_and_not_limited() -> None:
    """A host-side test's ``vm.http.stub`` may serve a big download (control for the caps above)."""
    r = Recorder()
    r.stub("GET", "http://a.test/big", body=b"x" * (4 * MAX_STUB_BODY_BYTES))
    for i in range(MAX_STUBS + 1):
        r.stub("GET", f"http://a.test/{i}")
    assert len(r.stubs) == MAX_STUBS + 2


def test_stub_limits_reach_the_guest_as_an_error_answer() -> None:
    """``http_traffic.stub`` from the guest is a host query: a limit is a clear error there."""
    r = Recorder()
    big = base64.b64encode(b"x" * (MAX_STUB_BODY_BYTES + 1)).decode()
    with pytest.raises(ConfigError, match="MAX_STUB_BODY_BYTES"):
        answer_query(r, "http", {"op": "stub", "method": "*", "url": "http://f.test/", "body": big})
    for i in range(MAX_STUBS):
        answer_query(r, "http", {"op": "stub", "method": "GET", "url": f"http://f.test/{i}"})
    with pytest.raises(ConfigError, match="MAX_STUBS"):
        answer_query(r, "http", {"op": "stub", "method": "GET", "url": "http://f.test/x"})
