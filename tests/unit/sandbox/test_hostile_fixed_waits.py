"""A guest that stops reading holds the host no longer than the test's own timeout.

Three of the host's waits on the guest kept fixed bounds whatever the test's
``timeout`` (red team round 3): the stack-dump request after a timeout (10 s,
then a 2 s grace for a dump that was never asked for), pdb's answers (the
transport's 30 s) and a ping's send (the transport's 30 s). A scripted
transport plays the guest here: each wait on it lasts exactly the bound it is
given, like ``VMTransport`` over a channel whose reader was stopped; a wait
with no bound raises at once (standing for the 30 s it would have held). The
attack through a real guest is ``tests/plugin/test_hostile_stack_dump.py``
(and ``test_hostile_stops_reading.py`` for the run's own sends).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from pytest_gondolin.errors import AgentError, AgentTimeout
from pytest_gondolin.sandbox.client import WorkerClient, WorkerState
from pytest_gondolin.sandbox.json_checks import JSONObject
from pytest_gondolin.sandbox.stack_dump import STACK_DUMP_GRACE
from pytest_gondolin.sandbox.transports import (
    INTERRUPT_TIMEOUT,
    MIN_INTERRUPT_TIMEOUT,
    VMTransport,
)
from tests.unit.sandbox._wire import COLLECTED, DONE, NODEID, FakeTransport, line, started

PDB_READ = line({"t": "pdb_read"})


class DeafTransport(FakeTransport):
    """Takes the ``run`` command, then nothing: every later send and the stack-dump
    request wait out the bound they are given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.deadlines: list[float | None] = []
        self.takes = 1

    def send(self, data: bytes, timeout: float | None = None) -> None:
        self.deadlines.append(timeout)
        if self.takes > 0:
            self.takes -= 1
            self.sent.append(data)
            return
        if timeout is None:  # would have held the transport's own 30 s
            raise BrokenPipeError("held the transport's own bound, then gave up")
        time.sleep(timeout)
        raise TimeoutError("sandbox1: guest not reading the channel")

    def interrupt(self, timeout: float) -> str | None:
        self.interrupted = True
        self.interrupt_timeouts.append(timeout)
        time.sleep(timeout)
        return f"the guest did not take the request for a stack dump within {timeout:g} s"


def _deaf(script: Sequence[bytes | BaseException]) -> tuple[WorkerClient, DeafTransport]:
    transport = DeafTransport([COLLECTED, *script])
    client = WorkerClient(transport, max_line=4096)
    client.start(1.0)
    return client, transport


def test_a_deaf_guest_s_stack_dump_costs_at_most_the_test_s_timeout() -> None:
    client, transport = _deaf([TimeoutError("no line")])
    began = time.monotonic()
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    elapsed = time.monotonic() - began
    assert outcome.failure is not None and outcome.failure.kind == "timeout", outcome.failure
    assert outcome.failure.headline == "Timeout > 0.5s"
    assert "the guest did not take the request for a stack dump" in outcome.failure.detail
    assert transport.interrupt_timeouts == [0.5]
    # No grace for a dump never asked for: before, 2 s more were waited whatever happened.
    assert elapsed < STACK_DUMP_GRACE, elapsed
    assert transport.killed and client.state is WorkerState.DEAD


def test_negative_control_a_guest_that_takes_the_request_gives_its_dump() -> None:
    client, transport = started([TimeoutError("no line")], dump="Thread 0x1 (most recent call)\n")
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    assert outcome.failure is not None and outcome.failure.kind == "timeout"
    assert "stack dump of the worker (SIGUSR1):\nThread 0x1" in outcome.failure.detail
    assert transport.interrupt_timeouts == [0.5]


class _Proc:
    pid = 4242


class _FailingVM:
    """A VM whose agent answers every exec with a timeout error at once."""

    name = "sandbox1"

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def exec(self, argv: list[str], *, timeout: float | None = None) -> object:
        self.timeouts.append(timeout)
        raise AgentTimeout(f"sandbox1: no answer to {argv!r} within {timeout} s")


@pytest.mark.parametrize(
    ("test_timeout", "asked"),
    [(3.0, 3.0), (600.0, INTERRUPT_TIMEOUT), (0.01, MIN_INTERRUPT_TIMEOUT)],
)
def test_the_vm_transport_asks_within_the_test_s_timeout(test_timeout: float, asked: float) -> None:
    vm = _FailingVM()
    transport = VMTransport(vm, _Proc())  # type: ignore[arg-type]
    refused = transport.interrupt(test_timeout)
    assert vm.timeouts == [asked]
    assert refused is not None
    assert refused.startswith("the guest did not take the request for a stack dump (")
    assert "kill" in refused  # the agent's own error says what was asked


class _DeafVM(_FailingVM):
    """A VM whose agent takes nothing: exec would wait out its own host-side grace."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def exec(self, argv: list[str], *, timeout: float | None = None) -> object:
        self.timeouts.append(timeout)
        self.release.wait(60)  # exec's own deadline: timeout + EXEC_GRACE
        raise AgentTimeout("sandbox1: given up")


def test_the_vm_transport_does_not_wait_for_exec_s_own_grace() -> None:
    vm = _DeafVM()
    transport = VMTransport(vm, _Proc())  # type: ignore[arg-type]
    began = time.monotonic()
    try:
        refused = transport.interrupt(0.01)
    finally:
        vm.release.set()
    assert time.monotonic() - began < MIN_INTERRUPT_TIMEOUT + 1.0
    assert refused == (
        f"the guest did not take the request for a stack dump within {MIN_INTERRUPT_TIMEOUT:g} s"
    )


class _HearingVM(_FailingVM):
    def exec(self, argv: list[str], *, timeout: float | None = None) -> object:
        self.timeouts.append(timeout)
        return None


def test_negative_control_the_vm_transport_asks_a_hearing_guest() -> None:
    vm = _HearingVM()
    transport = VMTransport(vm, _Proc())  # type: ignore[arg-type]
    assert transport.interrupt(3.0) is None
    assert vm.timeouts == [3.0]


class _User:
    """A user at the terminal who takes ``typing`` seconds to answer pdb."""

    def __init__(self, typing: float) -> None:
        self.typing = typing

    def show(self, text: str) -> None:
        pass

    def read_line(self) -> str | None:
        time.sleep(self.typing)
        return "c"

    def ended(self, nodeid: str, *, quit: bool, reports: int = 0) -> None:
        pass

    def begin(self, nodeid: str, reports: Sequence[JSONObject]) -> None:
        pass

    def run_env(self) -> dict[str, str]:
        return {}


def test_pdb_s_answer_to_a_deaf_guest_is_bounded_by_the_run_s_timeout() -> None:
    client, transport = _deaf([PDB_READ, DONE])
    # The user types for longer than the run's whole timeout: that time is not counted.
    client.debugger = _User(typing=0.6)
    began = time.monotonic()
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    elapsed = time.monotonic() - began
    assert outcome.failure is not None, outcome
    assert outcome.failure.kind == "timeout", outcome.failure
    assert outcome.failure.headline == "Timeout > 0.5s: the guest stopped reading"
    answer_bound = transport.deadlines[-1]
    assert answer_bound is not None and 0.3 < answer_bound <= 0.5, transport.deadlines
    assert elapsed < 0.6 + 0.5 + 1.5, elapsed


def test_negative_control_pdb_s_answer_reaches_a_guest_that_reads() -> None:
    client, transport = started([PDB_READ, DONE])
    client.debugger = _User(typing=0.0)
    outcome = client.run(NODEID, seed=1, timeout=5)
    assert outcome.failure is None, outcome
    assert any(b'"data":"c"' in sent for sent in transport.sent), transport.sent


def test_a_ping_s_send_to_a_deaf_guest_is_bounded_by_the_ping_s_timeout() -> None:
    client, transport = _deaf([])
    transport.takes = 0
    began = time.monotonic()
    with pytest.raises(AgentError, match=r"did not answer a ping within 0\.3s"):
        client.ping(timeout=0.3)
    assert time.monotonic() - began < 2.0
    assert transport.deadlines and transport.deadlines[-1] is not None, transport.deadlines
    assert 0 < transport.deadlines[-1] <= 0.3
    assert client.state is WorkerState.DEAD


def test_negative_control_a_guest_that_reads_answers_the_ping() -> None:
    def pong(sent: list[bytes]) -> bytes:
        import json

        return line({"t": "pong", "nonce": json.loads(sent[-1])["nonce"]})

    client, _ = started([pong])
    client.ping(timeout=1.0)
    assert client.state is WorkerState.READY
