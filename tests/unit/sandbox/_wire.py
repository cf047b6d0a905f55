"""A scripted worker for the client tests: lines in, commands recorded, no process.

:class:`FakeTransport` implements the transport contract of
:mod:`pytest_gondolin.sandbox.client` by playing back a script; the
helpers build the lines a real worker sends (reports made by pytest itself).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from _pytest.reports import pytest_report_to_serializable

from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.messages import Collected

Script = bytes | BaseException | None | Callable[[list[bytes]], bytes]


class FakeTransport:
    """Plays back *script*: lines, exceptions to raise, ``None`` for EOF.

    A callable entry is called with the commands sent so far (to echo a nonce).
    """

    def __init__(
        self, script: Iterable[Script], *, exit_code: int | None = 3, dump: str = ""
    ) -> None:
        self.script: deque[Script] = deque(script)
        self.sent: list[bytes] = []
        self.exit_code = exit_code
        self.dump = dump
        self.tail = "worker stderr line\n"
        self.interrupted = False
        self.interrupt_timeouts: list[float] = []
        self.killed = False
        self.broken_pipe = False

    def send(self, data: bytes, timeout: float | None = None) -> None:
        if self.broken_pipe:
            raise BrokenPipeError("gone")
        self.sent.append(data)

    def recv_line(self, timeout: float) -> bytes | None:
        if not self.script:
            return None
        entry = self.script.popleft()
        if isinstance(entry, BaseException):
            raise entry
        if callable(entry):
            return entry(self.sent)
        return entry

    def wait(self, timeout: float) -> int | None:
        return self.exit_code

    def interrupt(self, timeout: float) -> str | None:
        self.interrupted = True
        self.interrupt_timeouts.append(timeout)
        self.tail += self.dump
        return None

    def kill(self) -> None:
        self.killed = True

    def stderr_tail(self) -> str:
        return self.tail


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


NODEID = "test_m.py::test_f"
COLLECTED = line({"t": "collected", "nodeids": [NODEID], "errors": []})
DONE = line({"t": "done", "nodeid": NODEID})


def serialized_report(when: str = "call", outcome: str = "passed", **extra: Any) -> dict[str, Any]:
    """A report as the worker would send it, made by pytest itself."""
    longrepr: Any = None
    if outcome == "failed":
        try:
            raise ValueError("boom")
        except ValueError as exc:
            longrepr = pytest.ExceptionInfo.from_exception(exc).getrepr(style="short")
    rep = pytest.TestReport(
        NODEID,
        ("test_m.py", 0, "test_f"),
        {"test_f": 1},
        outcome,  # type: ignore[arg-type]
        longrepr,
        when,  # type: ignore[arg-type]
        sections=[("Captured stdout call", "out\n")],
        user_properties=[("k", [1, 2])],
        **extra,
    )
    data = pytest_report_to_serializable(rep)
    assert data is not None
    jsonable: dict[str, Any] = json.loads(json.dumps(data))
    return jsonable


def report_line(**kwargs: Any) -> bytes:
    return line({"t": "report", "data": serialized_report(**kwargs)})


def started(script: Iterable[Script], **kwargs: Any) -> tuple[WorkerClient, FakeTransport]:
    transport = FakeTransport([COLLECTED, *script], **kwargs)
    client = WorkerClient(transport, max_line=4096)
    assert client.start(1.0) == Collected((NODEID,), ())
    return client, transport


def mutated(path: tuple[str | int, ...], value: Any, **kwargs: Any) -> bytes:
    data = serialized_report(**kwargs)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return line({"t": "report", "data": data})


def without(key: str) -> bytes:
    data = serialized_report()
    del data[key]
    return line({"t": "report", "data": data})
