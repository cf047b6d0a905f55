"""The worker's lines as messages (``sandbox/messages.py``), sans-IO: bytes in, a message out.

Whatever the worker sends, the host gets a validated message or a
``WorkerProtocolError``, and a report that passes validation is one pytest
can rebuild and print.  The hostile lines the issue-14 reports describe are
in ``test_worker_hostile.py``; the client's handling of them in
``test_client.py``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from _pytest.reports import pytest_report_from_serializable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox.messages import (
    Collected,
    DoneMessage,
    PongMessage,
    QueryMessage,
    ReportMessage,
    WarningRecord,
    parse_message,
)
from pytest_gondolin.sandbox.report_checks import check_test_report
from tests.unit.sandbox._wire import NODEID, line, serialized_report

#: One valid line of each kind and the message it parses to.
VALID_LINES = {
    "collected": (
        line({"t": "collected", "nodeids": [NODEID], "errors": []}),
        Collected((NODEID,), ()),
    ),
    "done": (line({"t": "done", "nodeid": NODEID}), DoneMessage(NODEID)),
    "pong": (line({"t": "pong", "nonce": "n1"}), PongMessage("n1")),
    "query": (
        line({"t": "query", "kind": "http", "args": {"op": "list"}}),
        QueryMessage("http", {"op": "list"}),
    ),
    "warning": (
        line(
            {
                "t": "warning",
                "message": "w",
                "category": "builtins.UserWarning",
                "nodeid": NODEID,
                "filename": "f.py",
                "lineno": 3,
            }
        ),
        WarningRecord("w", "builtins.UserWarning", NODEID, "f.py", 3),
    ),
}


@pytest.mark.parametrize("raw, expected", VALID_LINES.values(), ids=VALID_LINES.keys())
def test_each_message_kind_parses_to_its_value(raw: bytes, expected: object) -> None:
    assert parse_message(raw) == expected
    assert parse_message(raw.rstrip(b"\n")) == expected  # the terminator is optional


def test_lone_surrogates_are_replaced_not_passed_on() -> None:
    msg = parse_message(b'{"t":"error","message":"a\\ud800b"}\n')
    assert msg == parse_message(b'{"t":"error","message":"a?b"}\n')


def test_subtest_reports_are_accepted() -> None:
    data = serialized_report()
    del data["$report_type"]
    data["_report_type"] = "SubTestReport"
    data["_subtest.context"] = {"msg": "case", "kwargs": {"i": "1"}}
    msg = parse_message(line({"t": "report", "data": data}))
    assert isinstance(msg, ReportMessage)
    assert msg.data["_subtest.context"] == {"msg": "case", "kwargs": {"i": "1"}}


# Hypothesis: whatever the worker sends, the host gets a message or a
# WorkerProtocolError, and a report that passes validation is one pytest can
# rebuild and print.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_message_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(WorkerProtocolError):
        parse_message(data)


MESSAGE_SKELETONS: list[dict[str, Any]] = [
    {"t": "collected", "nodeids": [NODEID], "errors": []},
    {
        "t": "warning",
        "message": "w",
        "category": "builtins.UserWarning",
        "nodeid": NODEID,
        "filename": "f",
        "lineno": 1,
    },
    {"t": "done", "nodeid": NODEID},
    {"t": "pong", "nonce": "n"},
    {"t": "error", "message": "m"},
]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_message_on_mutated_messages(data: st.DataObject) -> None:
    skeleton = data.draw(st.sampled_from(MESSAGE_SKELETONS))
    key = data.draw(st.sampled_from(sorted(skeleton)))
    with contextlib.suppress(WorkerProtocolError):
        parse_message(line({**skeleton, key: data.draw(json_values)}))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


FAILED_REPORT = serialized_report(outcome="failed")
REPORT_PATHS = _paths(FAILED_REPORT)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REPORT_PATHS), json_values)
def test_a_validated_report_always_deserializes_and_renders(
    path: tuple[Any, ...], value: Any
) -> None:
    data = json.loads(json.dumps(FAILED_REPORT))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        checked = check_test_report(json.loads(json.dumps(data)))
    except WorkerProtocolError:
        return
    report = pytest_report_from_serializable(checked)
    assert isinstance(report, pytest.TestReport)
    assert isinstance(report.longreprtext, str)
    assert isinstance(report.head_line, str | None)
    _ = (report.capstdout, report.capstderr, report.caplog, report.outcome, report.location[0])
