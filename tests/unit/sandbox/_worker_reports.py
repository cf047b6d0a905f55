"""Real serialized reports -- made by pytest itself, as the worker sends them.

Shared by the hostile-input tests: each scenario is the list of reports one
run of a test produces (setup, call, teardown), in the JSON form that
crosses the wire, for any node id.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from _pytest.reports import pytest_report_to_serializable

Report = dict[str, Any]


def _chained_failure(style: str) -> Any:
    def inner(value: int) -> None:
        items = [value] * 3
        raise ValueError(f"inner {items}")

    try:
        try:
            inner(1)
        except ValueError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        info = pytest.ExceptionInfo.from_exception(exc)
        return info.getrepr(style=style, showlocals=True, funcargs=True, chain=True)  # type: ignore[arg-type]


def serialized(nodeid: str, when: str, outcome: str, longrepr: Any = None, **extra: Any) -> Report:
    """One report as the worker would send it (JSON round-tripped, tuples now lists)."""
    path, _, name = nodeid.partition("::")
    rep = pytest.TestReport(
        nodeid,
        (path, 0, name),
        {name: 1, path: 1, "remote_local": 1},
        outcome,  # type: ignore[arg-type]
        longrepr,
        when,  # type: ignore[arg-type]
        sections=[(f"Captured stdout {when}", f"out of {when}\n")],
        user_properties=[("k", [1, 2]), ("s", "text")],
        duration=0.01,
        start=1_700_000_000.0,
        stop=1_700_000_000.01,
        **extra,
    )
    data = pytest_report_to_serializable(rep)
    assert data is not None
    jsonable: Report = json.loads(json.dumps(data))
    return jsonable


def _subtest(nodeid: str) -> Report:
    data = serialized(nodeid, "call", "failed", _chained_failure("short"))
    del data["$report_type"]
    data["_report_type"] = "SubTestReport"
    data["_subtest.context"] = {"msg": "case", "kwargs": {"i": "1"}}
    return data


def scenario(name: str, nodeid: str) -> list[Report]:
    """The reports of one run of *nodeid* for scenario *name* (see SCENARIOS)."""
    path = nodeid.partition("::")[0]
    setup = serialized(nodeid, "setup", "passed")
    teardown = serialized(nodeid, "teardown", "passed")
    if name == "setup-error":
        return [serialized(nodeid, "setup", "failed", _chained_failure("long")), teardown]
    calls: dict[str, list[Report]] = {
        "passed": [serialized(nodeid, "call", "passed")],
        "failed": [serialized(nodeid, "call", "failed", _chained_failure("long"))],
        "failed-short": [serialized(nodeid, "call", "failed", _chained_failure("short"))],
        "failed-native": [serialized(nodeid, "call", "failed", _chained_failure("native"))],
        "skipped": [serialized(nodeid, "call", "skipped", (path, 3, "Skipped: not today"))],
        "xfail": [
            serialized(
                nodeid, "call", "skipped", _chained_failure("long"), wasxfail="reason: known"
            )
        ],
        "xpass": [serialized(nodeid, "call", "passed", wasxfail="")],
        "xpass-strict": [serialized(nodeid, "call", "failed", "[XPASS(strict)] fixed")],
        "subtest": [_subtest(nodeid), serialized(nodeid, "call", "passed")],
    }
    return [setup, *calls[name], teardown]


SCENARIOS = (
    "passed",
    "failed",
    "failed-short",
    "failed-native",
    "skipped",
    "xfail",
    "xpass",
    "xpass-strict",
    "subtest",
    "setup-error",
)


def collect_error(nodeid: str) -> Report:
    """A failed collect report (what ``collected.errors`` carries)."""
    rep = pytest.CollectReport(nodeid, "failed", _chained_failure("short"), None)
    data = pytest_report_to_serializable(rep)
    assert data is not None
    jsonable: Report = json.loads(json.dumps(data))
    return jsonable


def line(obj: Any) -> bytes:
    """One protocol line as the worker encodes it."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
