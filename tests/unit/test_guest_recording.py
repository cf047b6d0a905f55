"""``http_traffic`` in the guest answers like ``vm.http`` on the host.

The exchange queries live once, in :mod:`pytest_gondolin.guest.recording`;
the host's :class:`Recorder` and the guest's :class:`GuestTraffic` both use
them. Host names are compared by :func:`recording.host_key`, built on
:func:`recording.canonical_host`, the one copy of the host-name rules that
the host's ``normalize_host`` uses too: a property test holds the two
comparisons together.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.guest import hostquery, recording
from pytest_gondolin.guest.recording import Exchange, exchange_from_dict
from pytest_gondolin.guest.traffic import GuestTraffic
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.rules import normalize_host


def _policy_key(host: str) -> str:
    """What the host recorder compared hosts by before the queries moved to the guest."""
    try:
        return normalize_host(host)
    except NetworkPolicyError:
        return host.lower().rstrip(".")


@pytest.mark.parametrize(
    "host",
    [
        "API.Example.com",
        "example.com.",
        " example.com ",
        "Bücher.example",
        "xn--bcher-kva.example",
        "bücher.123",
        "1.2.3.999",
        "127.1",
        "10.0.0.1",
        "[2001:DB8::1]",
        "2001:db8:0:0::1",
        "fe80::1%eth0",
        "[fe80::1%eth0]",
        "[not-v6]",
        "exa_mple.com",
        "a..b",
        "",
        ".",
        "x" * 64 + ".com",
        "a." * 127 + "com",
        "sp ace.example",
    ],
)
def test_host_key_is_the_policys_host_comparison(host: str) -> None:
    assert recording.host_key(host) == _policy_key(host)


hosts = (
    st.text(max_size=30)
    | st.from_regex(r"\A\[?[A-Za-z0-9_.:%\-üß]{0,40}\]?\.?\Z")
    | st.ip_addresses().map(str)
    | st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
)


@settings(max_examples=300)
@given(hosts)
def test_host_key_agrees_with_the_policy_on_any_text(host: str) -> None:
    assert recording.host_key(host) == _policy_key(host)


def _exchange(method: str, url: str, status: int | None = 200) -> Exchange:
    scheme, rest = url.split("://", 1)
    authority, _, target = rest.partition("/")
    path, _, query = ("/" + target).partition("?")
    host, _, port = authority.partition(":")
    return Exchange(
        method=method,
        url=url,
        scheme=scheme,
        host=host,
        port=int(port) if port else 443,
        path=path,
        query=query,
        request_headers=(("Host", authority),),
        request_body=b"",
        status=status,
        response_headers=(),
        response_body=b"\xff\x00 binary",
        decision="allowed",
        reason="allowed by test",
    )


class _FakeWorkerChannel:
    """The worker's channel as host_query sees it, answered by a host-side recorder."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def recv(self) -> dict[str, Any] | None:
        query = self.sent[-1]
        assert query["t"] == "query" and query["kind"] == "http"
        if query["args"]["op"] == "list":
            data = [ex.to_dict() for ex in self.recorder.requests]
            return {"t": "answer", "ok": True, "data": data}
        return {"t": "answer", "ok": False, "error": "not in this fake"}


@pytest.fixture
def recorder() -> Recorder:
    r = Recorder()
    r.record(_exchange("GET", "https://API.example.com/v1/items?page=2"))
    r.record(_exchange("POST", "https://api.example.com/v1/items", status=201))
    r.record(_exchange("GET", "https://xn--bcher-kva.example/v1/items"))
    r.record(Exchange.connection_denied("evil.example", 22, "not HTTP/1.x or TLS"))
    return r


@pytest.mark.parametrize(
    "match",
    [
        {},
        {"method": "get"},
        {"host": "api.EXAMPLE.com."},
        {"host": "Bücher.example"},
        {"path": re.compile(r"^/v1/")},
        {"url": "https://api.example.com/v1/items"},
        {"method": ""},
    ],
)
def test_guest_traffic_filters_like_the_host(recorder: Recorder, match: dict[str, Any]) -> None:
    with hostquery.active(_FakeWorkerChannel(recorder)):
        in_guest = GuestTraffic().get_requests(**match)
    assert in_guest == recorder.get_requests(**match)
    assert in_guest  # every filter above matches something


@pytest.mark.parametrize(
    "match",
    [
        {"method": "DELETE", "host": "api.example.com"},
        {"host": "nowhere.example"},
        {"path": "/v1/items"},
        {"path": "/v1/items", "count": 2},
    ],
)
def test_guest_assertion_messages_are_the_hosts(recorder: Recorder, match: dict[str, Any]) -> None:
    with pytest.raises(AssertionError) as on_host:
        recorder.assert_request_made(**match)
    with hostquery.active(_FakeWorkerChannel(recorder)), pytest.raises(AssertionError) as in_guest:
        GuestTraffic().assert_request_made(**match)
    assert str(in_guest.value) == str(on_host.value)


def test_guest_traffic_reads_the_host_once_per_call(recorder: Recorder) -> None:
    channel = _FakeWorkerChannel(recorder)
    with hostquery.active(channel):
        assert len(GuestTraffic().assert_request_made(host="api.example.com", count=2)) == 2
        with pytest.raises(AssertionError):
            GuestTraffic().assert_request_made(host="nowhere.example")
    assert [m["args"]["op"] for m in channel.sent] == ["list", "list"]


def test_exchanges_survive_the_trip_across_the_boundary(recorder: Recorder) -> None:
    for ex in recorder.requests:
        assert exchange_from_dict(ex.to_dict()) == ex


def test_host_query_needs_a_run_and_reports_refusals(recorder: Recorder) -> None:
    with pytest.raises(RuntimeError, match="only works inside a test run"):
        hostquery.host_query("http", {"op": "list"})
    with (
        hostquery.active(_FakeWorkerChannel(recorder)),
        pytest.raises(hostquery.HostQueryError, match="not in this fake"),
    ):
        GuestTraffic().clear()
    assert not hostquery._ACTIVE


def test_bad_exchange_headers_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="request_headers: expected"):
        Exchange(
            **{**_exchange("GET", "https://a.example/").__dict__, "request_headers": [("a", 1)]}
        )
