"""A guest flooding the host's HTTP path costs the host a bounded amount of memory.

The flood runs the production path in-process (stack -> relay -> proxy ->
interceptor -> stub -> recorder, see :mod:`.flood_guest`); the memory is
read from ``/proc/self/status`` of a fresh interpreter, so nothing else
this session allocated blurs it. Every measurement has a negative
control: memory the flood script holds, and a recorder without a budget,
both show up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.netpolicy.http.interceptor import (
    BodyBudget,
    HttpInterceptor,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.recorder import DEFAULT_MAX_RECORDED_BYTES, Recorder
from pytest_gondolin.netpolicy.relay import ANSWER_BACKLOG

from .flood_guest import URL_HOST, FloodGuest, count_responses, make_path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[3]
#: 1 MiB POSTs the flood sends: well past the recorder's 48 MiB.
FLOOD_REQUESTS = 150
#: What the flood may cost the host: the recorder's whole budget plus 16 MiB
#: for the bodies in flight (a request is buffered, then copied once).
FLOOD_PEAK_BUDGET_KIB = (DEFAULT_MAX_RECORDED_BYTES + 16 * MiB) // 1024


def run_flood(*args: str) -> dict[str, Any]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.netpolicy_app.flood_guest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_a_post_flood_to_a_stub_costs_the_host_a_bounded_amount() -> None:
    r = run_flood("--requests", str(FLOOD_REQUESTS))
    assert r["ok"] == r["recorded"] == FLOOD_REQUESTS, r  # every request answered and recorded
    assert 28 <= r["with_body"] <= 32 and r["bodies_dropped"] == FLOOD_REQUESTS - r["with_body"]
    assert r["held_bytes"] <= DEFAULT_MAX_RECORDED_BYTES
    assert r["peak_growth_kib"] < FLOOD_PEAK_BUDGET_KIB, r
    assert r["kept_growth_kib"] < FLOOD_PEAK_BUDGET_KIB, r


def test_negative_control_the_measurement_sees_memory_held() -> None:
    """The same flood, the script holding 96 MiB itself: the growth shows it."""
    r = run_flood("--requests", "20", "--hold", "96")
    assert r["peak_growth_kib"] >= 96 * 1024, r


def test_negative_control_a_recorder_without_budget_fails_the_bound() -> None:
    """The flood against a recorder with no budget: what the bound above catches."""
    r = run_flood("--requests", "100", "--unbounded")
    assert r["with_body"] == 100 and r["bodies_dropped"] == 0
    assert r["kept_growth_kib"] >= 95 * 1024 > FLOOD_PEAK_BUDGET_KIB, r


# --------------------------------------------------------------------------- pipelining


def test_pipelined_requests_for_a_big_stub_wait_for_the_guest_to_read() -> None:
    """40 GETs of a 1 MiB stub sent at once by a guest that never reads: the host
    answers one at a time as the guest reads, never holding all 40 MiB."""
    recorder = Recorder()
    recorder.stub("GET", f"http://{URL_HOST}/big", body=b"B" * MiB)
    stack, relay = make_path(recorder)
    conn = FloodGuest(stack, relay).connection()
    conn.send(f"GET /big HTTP/1.1\r\nHost: {URL_HOST}\r\n\r\n".encode() * 40, read=False)
    for _ in range(5):
        relay.process_events()
        conn._absorb(read=False)
    assert relay.output_backlog() <= ANSWER_BACKLOG + MiB
    assert len(recorder.requests) <= 2
    # Control: once the guest reads, every answer arrives, in order.
    data = conn.read_until(lambda got: count_responses(got) == 40)
    assert data.count(b"B" * 1024) >= 40 * 1024 - 40
    assert [e.decision for e in recorder.requests] == ["stubbed"] * 40


# --------------------------------------------------------------------------- bodies held across flows


def _post(length: int, *, chunked: bool = False) -> bytes:
    if chunked:
        return (
            f"POST /u HTTP/1.1\r\nHost: {URL_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
    return f"POST /u HTTP/1.1\r\nHost: {URL_HOST}\r\nContent-Length: {length}\r\n\r\n".encode()


def _flow(budget: BodyBudget) -> HttpInterceptor:
    return HttpInterceptor("http", authority=URL_HOST, port=80, budget=budget)


def test_bodies_held_across_flows_are_bounded() -> None:
    budget = BodyBudget(3 * MiB)
    a, b, c = _flow(budget), _flow(budget), _flow(budget)
    assert a.receive_data(_post(2 * MiB) + b"a" * MiB) == []  # half a body: held
    # Control: a body that fits is taken.
    (got,) = b.receive_data(_post(MiB) + b"b" * MiB)
    assert isinstance(got, RequestReceived) and budget.held == 3 * MiB
    # Refused on its head, before the body arrives.
    (refused,) = c.receive_data(_post(10))
    assert isinstance(refused, RequestRefused)
    assert refused.exchange.status == 503 and refused.exchange.reason.endswith("[rule: limits]")
    assert "max_request_body_bytes" in refused.exchange.reason
    # Answering and closing give the budget back.
    b.respond(HttpResponse(200, body=b"ok"))
    assert budget.held == 2 * MiB
    a.close()
    a.close()
    assert budget.held == 0
    (ok,) = _flow(budget).receive_data(_post(10) + b"x" * 10)
    assert isinstance(ok, RequestReceived)


def test_a_chunked_body_is_counted_as_it_arrives() -> None:
    budget = BodyBudget(MiB)
    flow = _flow(budget)
    assert flow.receive_data(_post(0, chunked=True)) == []
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"c" * 64 * 1024)
    for _ in range(15):
        assert flow.receive_data(chunk) == []
    assert budget.held == 15 * 64 * 1024
    (refused,) = flow.receive_data(chunk * 2)
    assert isinstance(refused, RequestRefused) and refused.exchange.status == 503
    assert budget.held == 0 and len(refused.exchange.request_body) == MiB  # the 16th fitted


def _feed_seconds(size: int, piece: int) -> float:
    best = float("inf")
    for _ in range(3):
        flow = HttpInterceptor("http", authority=URL_HOST, port=80, max_body_bytes=64 * MiB)
        data = _post(size) + b"p" * size
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        start = time.process_time()
        events: list[Any] = []
        for p in pieces:
            events += flow.receive_data(p)
        best = min(best, time.process_time() - start)
        assert len(events) == 1 and isinstance(events[0], RequestReceived)
        assert len(events[0].request.body) == size
    return best


def test_a_body_arriving_in_small_pieces_is_not_copied_quadratically() -> None:
    """4x the bytes in the same small pieces takes about 4x the time (quadratic: 16x)."""
    small = _feed_seconds(4 * MiB, 4096)
    large = _feed_seconds(16 * MiB, 4096)
    assert large < 8 * max(small, 0.005), (small, large)
