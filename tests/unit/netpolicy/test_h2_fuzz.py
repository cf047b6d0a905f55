"""Property tests for the HTTP/2 server side: hostile frames cost the connection, never the host.

The invariant, h11's fuzz target's: whatever the guest sends, ``receive_data``
returns events (requests, or refusals with their records) and never raises;
the body budget stays within its limit and is all given back on close.
"""

from __future__ import annotations

import struct

import h2.connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import BodyBudget, RequestReceived, RequestRefused
from pytest_gondolin.netpolicy.http.messages import HttpResponse

from .h2_helpers import h2_client, request_fields

OK = HttpResponse(200, (("content-type", "text/plain"),), b"ok" * 100, trailers=(("x-t", "1"),))
BUDGET = 50_000


def _session() -> bytes:
    """A valid guest session: preface, streams with bodies, PING, SETTINGS, a reset."""
    client = h2_client()
    client.send_headers(1, request_fields("/a"), end_stream=True)
    client.send_headers(3, request_fields("/b", "POST", extra=[("content-type", "x/y")]))
    client.send_data(3, b"body" * 50, end_stream=True)
    client.ping(b"12345678")
    client.send_headers(5, request_fields("/c", "PUT"))
    client.send_data(5, b"z" * 300)
    client.reset_stream(5)
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    client.increment_flow_control_window(1000)
    client.send_headers(7, request_fields("/d", extra=[("te", "trailers")]), end_stream=True)
    return client.data_to_send()


SESSION = _session()
PREFACE = h2_client().data_to_send()


def run(chunks: list[bytes], *, max_body: int = 20_000) -> H2Interceptor:
    """Feed ``chunks``; answer every request; check the invariants after each step."""
    budget = BodyBudget(BUDGET)
    icpt = H2Interceptor(authority="api.test", port=443, max_body_bytes=max_body, budget=budget)
    for chunk in [*chunks, b""]:
        events = icpt.receive_data(chunk)
        assert all(isinstance(e, RequestReceived | RequestRefused) for e in events)
        for event in events:
            if isinstance(event, RequestReceived):
                assert event.request.http_version == "2" and event.request.host == "api.test"
                icpt.respond(event.request, OK)
            else:
                assert "[rule: " in event.exchange.reason
        icpt.produce(64 * 1024)
        icpt.data_to_send()
        assert 0 <= budget.held <= BUDGET
    icpt.close()
    assert budget.held == 0
    return icpt


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


def test_the_valid_session_is_served() -> None:
    icpt = H2Interceptor(authority="api.test", port=443)
    paths = [e.request.path for e in icpt.receive_data(SESSION) if isinstance(e, RequestReceived)]
    assert paths == ["/a", "/b", "/d"] and not icpt.closed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.booleans())
def test_random_bytes(data: bytes, with_preface: bool) -> None:
    run([PREFACE + data if with_preface else data])


_FRAME = st.tuples(
    st.integers(0, 12),  # frame type: the ten of RFC 9113, and unknown ones
    st.integers(0, 255),  # flags
    st.sampled_from([0, 1, 2, 3, 5, 7, 9, 2**31 - 1]),  # stream id
    st.binary(max_size=64),  # payload
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAME, max_size=25), st.lists(st.integers(0, 10_000), max_size=5))
def test_random_wellformed_frames(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    wire = PREFACE + b"".join(
        struct.pack(">I", len(p))[1:] + bytes([t, f]) + struct.pack(">I", sid) + p
        for t, f, sid, p in frames
    )
    run(_chunked(wire, cuts))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_sessions(data: st.DataObject) -> None:
    wire = bytearray(SESSION)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = data.draw(st.integers(0, len(wire) - 1)) if wire else 0
        if kind == "flip" and wire:
            wire[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del wire[at : at + data.draw(st.integers(1, 40))]
        elif kind == "insert":
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=20))
        else:
            wire[at:at] = wire[at : at + data.draw(st.integers(1, 60))]
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=5))
    run(_chunked(bytes(wire), cuts), max_body=data.draw(st.sampled_from([10, 250, 20_000])))
