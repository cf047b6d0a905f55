"""A guest that stops reading holds the host's send no longer than the test's own timeout.

The attack through a real guest is ``tests/plugin/test_hostile_stops_reading.py``;
here a scripted transport plays a guest that takes the run command, asks a
question, then reads nothing more: its ``send`` blocks until the deadline it
is given, like ``VMTransport`` over a channel whose reader was stopped. Before
the fix the client gave no deadline (the transport's own 30 s applied) and
the test ended as a crash ("worker connection lost").
"""

from __future__ import annotations

import time

from pytest_gondolin.sandbox.client import WorkerClient, WorkerState
from tests.unit.sandbox._wire import COLLECTED, DONE, NODEID, FakeTransport, line

#: What the transport stands for when the client gives no deadline (STDIN_TIMEOUT's role).
OWN_BOUND = 30.0

QUERY = line({"t": "query", "kind": "http", "args": {}})


class StallingTransport(FakeTransport):
    """Takes the ``run`` command, then nothing: every later send waits out its deadline."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.deadlines: list[float | None] = []

    def send(self, data: bytes, timeout: float | None = None) -> None:
        self.deadlines.append(timeout)
        if not self.sent or b'"run"' in data:
            self.sent.append(data)
            return
        wait = OWN_BOUND if timeout is None else timeout
        if wait > 2.0:  # the scripted guest will not hold a unit test for 30 s
            raise BrokenPipeError(f"held {wait:g} s, then the channel was given up")
        time.sleep(wait)
        raise TimeoutError("sandbox1: guest not reading the channel")


def _started(script: list[bytes]) -> tuple[WorkerClient, StallingTransport]:
    transport = StallingTransport([COLLECTED, *script])
    client = WorkerClient(transport, max_line=4096)
    client.start(1.0)
    return client, transport


def test_a_guest_that_stops_reading_fails_at_the_run_s_timeout() -> None:
    client, transport = _started([QUERY, DONE])
    client.on_query = lambda kind, args: {"requests": []}
    began = time.monotonic()
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    elapsed = time.monotonic() - began
    assert outcome.failure is not None
    assert outcome.failure.kind == "timeout", outcome.failure
    assert outcome.failure.headline == "Timeout > 0.5s: the guest stopped reading"
    assert "guest not reading the channel" in outcome.failure.detail
    # The answer's send got what was left of the run's 0.5 s, never the transport's own bound.
    answer_deadline = transport.deadlines[-1]
    assert answer_deadline is not None and 0 <= answer_deadline <= 0.5, transport.deadlines
    assert elapsed < 5.0
    assert transport.killed and client.state is WorkerState.DEAD


def test_negative_control_a_guest_that_reads_gets_its_answer() -> None:
    transport = FakeTransport([COLLECTED, QUERY, DONE])
    client = WorkerClient(transport, max_line=4096)
    client.start(1.0)
    client.on_query = lambda kind, args: {"requests": []}
    outcome = client.run(NODEID, seed=1, timeout=5)
    assert outcome.failure is None
    assert any(b'"answer"' in sent for sent in transport.sent), transport.sent
    assert client.state is WorkerState.READY
