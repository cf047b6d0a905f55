"""Hostile worker lines, sans-IO: each one is a WorkerProtocolError or a bounded, valid message.

Issue 14 items 1 and 3.  Everything here runs without a VM or a worker
process: :func:`parse_message`, :func:`check_line_shape`, the report
checks and :class:`RunTally` take bytes / parsed JSON in and give messages
out, and a scripted transport drives :class:`WorkerClient` for the
run-level bounds.  What the host's *reporters* make of the surviving
reports is proved in ``test_worker_reporters.py``; real host memory under a
flood in ``tests/plugin/test_worker_flood.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.guest import worker
from pytest_gondolin.guest.worker import MAX_JSON_DEPTH, MAX_WORKER_LINE
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.json_checks import MAX_KEPT_TEXT, MAX_REPORT_KEPT, Keep
from pytest_gondolin.sandbox.messages import (
    MAX_JSON_VALUES,
    ErrorMessage,
    ReportMessage,
    WarningRecord,
    check_line_shape,
    parse_message,
)
from pytest_gondolin.sandbox.outcome import MAX_KEPT_PER_TEST, MAX_WARNINGS_PER_RUN, RunTally
from pytest_gondolin.sandbox.report_checks import check_collect_report, check_test_report
from tests.unit.sandbox._worker_reports import (
    SCENARIOS,
    collect_error,
    line,
    scenario,
    serialized,
)

NODEID = "test_m.py::test_f"
MARK = re.compile(r"\[\.\.\. truncated by pytest-gondolin: (\d+) (\w[\w ]*)\]")


def report_line(data: dict[str, Any]) -> bytes:
    return line({"t": "report", "data": data})


def call_report(**changes: Any) -> dict[str, Any]:
    data = serialized(NODEID, "call", "passed")
    data.update(changes)
    return data


def parsed(data: dict[str, Any]) -> dict[str, Any]:
    msg = parse_message(report_line(data))
    assert isinstance(msg, ReportMessage)
    return msg.data


def nest(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# --------------------------------------------------------------------------
# item 1: one forged line never escapes as anything but WorkerProtocolError
# --------------------------------------------------------------------------

#: Field values that crashed the host (issue 14.1) or would crash a reporter.
HOSTILE_REPORTS: dict[str, Callable[[], dict[str, Any]]] = {
    "duration-10**400": lambda: call_report(duration=10**400),
    "duration-negative": lambda: call_report(duration=-1.0),
    "duration-huge-float": lambda: call_report(duration=1e300),
    "start-10**400": lambda: call_report(start=-(10**400)),
    "stop-beyond-datetime": lambda: call_report(stop=1e12),
    "lineno-10**400": lambda: call_report(location=["test_m.py", 10**400, "test_f"]),
    "skip-lineno-10**400": lambda: call_report(
        outcome="skipped", longrepr=["test_m.py", 10**400, "Skipped"]
    ),
    "skip-longrepr-str": lambda: call_report(outcome="skipped", longrepr="Skipped: x"),
    "skip-longrepr-none": lambda: call_report(outcome="skipped", longrepr=None),
    "failed-longrepr-none": lambda: call_report(outcome="failed", longrepr=None),
    "keywords-not-names": lambda: call_report(keywords=[1]),
    "shadows-property": lambda: call_report(passed=True),
    "private-attr": lambda: call_report(_id="x"),
}


@pytest.mark.parametrize("make", HOSTILE_REPORTS.values(), ids=HOSTILE_REPORTS.keys())
def test_forged_report_fields_are_protocol_errors(make: Callable[[], dict[str, Any]]) -> None:
    with pytest.raises(WorkerProtocolError):
        parse_message(report_line(make()))


def test_extra_attributes_are_dropped_not_passed_on() -> None:
    # "node" is what junitxml and -v read as an xdist worker node: it crashed both.
    # (pytest-rerunfailures' "rerun" is allow-listed: test_rerunfailures.py.)
    data = parsed(call_report(node={"x": 1}, execution_count=2, gondolin_guest=False))
    assert not {"node", "execution_count", "gondolin_guest"} & data.keys()
    # negative control: the same report without extras keeps every real field
    assert data == parsed(call_report())


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"t":"report","data":{"duration":1e400}}\n', "not finite"),
        (b'{"t":"done","nodeid":"' + b"\xc3\xa9" + b'"}\n', "not ASCII"),
        (b'{"t":"done","nodeid":"\\"}\n', "unterminated"),
        (b'{"t":"done","nodeid":' + b"9" * 5000 + b"}\n", "not JSON"),
        (b"[" * 65 + b"]" * 65 + b"\n", "deeper than 64"),
        (b"[" * 3 + b"]" * 2 + b"\n", "unbalanced"),
        (b"[" + b"0," * MAX_JSON_VALUES + b"0]\n", "JSON values"),
        (b"[" + b'"",' * MAX_JSON_VALUES + b'""]\n', "JSON values"),
        (b"x" * (MAX_WORKER_LINE + 1), "bytes"),
    ],
    ids=[
        "inf",
        "non-ascii",
        "unterminated",
        "int-digits",
        "deep",
        "unbalanced",
        "many-values",
        "many-strings",
        "oversized",
    ],
)
def test_lines_are_bounded_before_json_builds_them(raw: bytes, match: str) -> None:
    with pytest.raises(WorkerProtocolError, match=match):
        parse_message(raw)


def test_the_deepest_line_the_worker_writes_is_accepted() -> None:
    # Negative control for the depth bound: the worker flattens a report
    # (to_jsonable) to one level less than the limit, the message object
    # adds one, and the host accepts exactly that depth -- one more is refused.
    data = worker.to_jsonable({"user_properties": [["k", nest(500)]]})
    encoded = worker.encode_line({"t": "report", "data": data})
    assert _depth(json.loads(encoded)) == MAX_JSON_DEPTH
    check_line_shape(encoded)
    check_line_shape(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(WorkerProtocolError):
        check_line_shape(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('["[[[[", "]]]"]', 1),
        ('{"a\\"[[": ["\\\\", "\\\\\\"{"]}', 2),
        ('"\\\\\\\\"', 0),
        ("[[], {}, [[{}]]]", 4),
    ],
)
def test_brackets_in_strings_and_escapes_do_not_count(text: str, depth: int) -> None:
    raw = text.encode()
    json.loads(raw)  # the table holds valid JSON
    check_line_shape(raw, max_depth=depth)
    if depth:
        with pytest.raises(WorkerProtocolError):
            check_line_shape(raw, max_depth=depth - 1)


def _count(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + _count(v) for v in value.values())
    return 1


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab"\\[]{},:\n\u00e9\ud800'), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from('k"\\[]{'), max_size=6), inner, max_size=4
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_line_shape_bounds_what_json_builds(value: Any) -> None:
    raw = json.dumps(value, ensure_ascii=True).encode()
    count, depth = _count(value), _depth(value)
    check_line_shape(raw, max_values=3 * count, max_depth=max(depth, 1))
    with pytest.raises(WorkerProtocolError):
        check_line_shape(raw, max_values=count - 1)
    if depth:
        with pytest.raises(WorkerProtocolError):
            check_line_shape(raw, max_depth=depth - 1)


def test_unforeseen_exceptions_in_checks_are_protocol_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pytest_gondolin.sandbox.messages as wm

    def explode(msg: Any) -> Any:
        raise RecursionError("a check nobody foresaw")

    monkeypatch.setitem(wm._PARSERS, "done", explode)
    with pytest.raises(WorkerProtocolError, match="RecursionError"):
        parse_message(line({"t": "done", "nodeid": NODEID}))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_value_anywhere_in_a_real_report_is_a_report_or_a_protocol_error(
    data: st.DataObject,
) -> None:
    name = data.draw(st.sampled_from(SCENARIOS))
    reports = scenario(name, NODEID)
    report = reports[data.draw(st.integers(0, len(reports) - 1))]
    paths = _paths(report)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(
        json_values | st.sampled_from([10**400, -(10**400), 2**64, 1e308, nest(70), {"x": 1}])
    )
    target = report
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with contextlib.suppress(WorkerProtocolError):
        msg = parse_message(report_line(report))
        assert isinstance(msg, ReportMessage)
        assert 0 < msg.kept <= MAX_REPORT_KEPT + 64 * 1024


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        found.append((*prefix, "node"))  # a new key too
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


# --------------------------------------------------------------------------
# item 3: what one line and one test may keep of host memory
# --------------------------------------------------------------------------


def _marks(text: str) -> list[tuple[int, str]]:
    return [(int(n), what) for n, what in MARK.findall(text)]


def test_valid_reports_are_kept_unchanged() -> None:
    for name in SCENARIOS:
        for report in scenario(name, NODEID):
            data = parsed(report)
            assert "truncated by pytest-gondolin" not in json.dumps(data)
            assert data["sections"] == [tuple(s) for s in report["sections"]]
            assert data["user_properties"] == [tuple(p) for p in report["user_properties"]]


def test_a_long_text_is_cut_in_the_middle_with_a_marker() -> None:
    content = "HEAD" + "x" * (3 * MAX_KEPT_TEXT) + "TAIL"
    data = parsed(call_report(sections=[["Captured stdout call", content]]))
    kept = data["sections"][0][1]
    assert kept.startswith("HEAD") and kept.endswith("TAIL")
    ((count, what),) = _marks(kept)
    assert what == "characters"
    assert len(kept) - len(MARK.search(kept).group(0)) == MAX_KEPT_TEXT  # type: ignore[union-attr]
    assert count == len(content) - MAX_KEPT_TEXT


def test_many_sections_are_cut_at_the_report_budget() -> None:
    sections = [[f"section {i}", "y" * 1000] for i in range(5000)]
    keep = Keep()
    data = check_test_report(call_report(sections=sections), keep=keep)
    kept = data["sections"]
    assert len(kept) < len(sections)
    assert kept[-1][0] == "pytest-gondolin"
    assert _marks(kept[-1][1]) == [(len(sections) - len(kept) + 1, "sections")]
    assert keep.used <= MAX_REPORT_KEPT + 64 * 1024


def test_a_long_traceback_keeps_its_innermost_entries() -> None:
    report = scenario("failed", NODEID)[1]
    tb = report["longrepr"]["reprtraceback"]
    entries = [json.loads(json.dumps(tb["reprentries"][0])) for _ in range(5000)]
    entries[-1]["data"]["lines"] = ["E   the innermost frame"] + ["z" * 200] * 4
    tb["reprentries"] = entries
    kept = check_test_report(report)["longrepr"]["reprtraceback"]["reprentries"]
    assert len(kept) < len(entries)
    assert kept[0]["type"] == "ReprEntryNative"
    assert _marks(kept[0]["data"]["lines"][0]) == [
        (len(entries) - len(kept) + 1, "traceback entries")
    ]
    assert kept[-1]["data"]["lines"][0] == "E   the innermost frame"


def test_a_large_user_property_is_kept_as_truncated_json_text() -> None:
    big = [[i, "v" * 100] for i in range(20_000)]
    props = check_test_report(call_report(user_properties=[["big", big], ["small", 1]]))[
        "user_properties"
    ]
    name, value = props[0]
    assert name == "big" and isinstance(value, str) and value.startswith("[[0, ")
    assert _marks(value)[0][1] == "characters"
    assert props[1] == ("small", 1)


def test_collect_errors_share_one_report_budget() -> None:
    error = collect_error("test_bad.py")
    error["sections"] = [["Captured stdout", "c" * MAX_KEPT_TEXT]]
    errors = [json.loads(json.dumps(error)) for _ in range(6)]
    keep = Keep()
    checked = [check_collect_report(e, keep=keep) for e in errors]
    assert keep.used <= MAX_REPORT_KEPT + 64 * 1024
    assert "truncated by pytest-gondolin" in checked[-1]["sections"][0][1]


def test_one_test_keeps_at_most_its_budget_then_fails() -> None:
    tally = RunTally(NODEID)
    content = "w" * (MAX_KEPT_TEXT - 100)
    sent = 0
    budget = f"would keep more than {MAX_KEPT_PER_TEST // 2**20} MiB"
    with pytest.raises(WorkerProtocolError, match=budget):
        for i in range(100):
            msg = parse_message(report_line(call_report(sections=[["out", f"{i:08d}{content}"]])))
            tally.add(msg)
            sent += 1
    assert tally.kept <= MAX_KEPT_PER_TEST
    assert MAX_KEPT_PER_TEST // MAX_KEPT_TEXT - 6 <= sent < MAX_KEPT_PER_TEST // MAX_KEPT_TEXT


def test_warnings_and_errors_past_the_budget_are_dropped_and_counted() -> None:
    tally = RunTally(NODEID)
    text = "m" * MAX_KEPT_TEXT
    for _ in range(MAX_WARNINGS_PER_RUN + 10):
        tally.add(WarningRecord(text, "builtins.UserWarning", NODEID, "f.py", 1))
    for _ in range(5):
        tally.add(ErrorMessage(text))
    assert tally.kept <= MAX_KEPT_PER_TEST
    assert len(tally.warnings) + tally.dropped_warnings == MAX_WARNINGS_PER_RUN + 10
    assert tally.dropped_warnings > 0 and tally.dropped_errors == 5
    outcome = tally.outcome(None, 1.0)
    assert outcome.failure is not None
    assert _marks(outcome.failure.detail) == [(5, "error messages")]
    assert _marks(outcome.warnings[-1].message) == [(tally.dropped_warnings, "warnings")]


def test_warning_and_error_texts_are_cut_per_message() -> None:
    text = "q" * (2 * MAX_KEPT_TEXT)
    warning = parse_message(
        line(
            {
                "t": "warning",
                "message": text,
                "category": "builtins.UserWarning",
                "nodeid": NODEID,
                "filename": "f.py",
                "lineno": 1,
            }
        )
    )
    error = parse_message(line({"t": "error", "message": text}))
    assert isinstance(warning, WarningRecord) and isinstance(error, ErrorMessage)
    for kept in (warning.message, error.message):
        assert _marks(kept) == [(MAX_KEPT_TEXT, "characters")]


# --------------------------------------------------------------------------
# time: linear, and the run's timeout holds while lines keep coming
# --------------------------------------------------------------------------

_M = MAX_WORKER_LINE - 64
#: Shapes that would be quadratic for a naive regex or a recursive scanner.
SLOW_SHAPES: dict[str, bytes] = {
    "escaped-quotes": b'{"t":"error","message":"' + b'\\"' * (_M // 2 - 20) + b"\n",
    "quotes": b'{"t":"error","message":[' + b'"",' * (_M // 3 - 20) + b"]}\n",
    "backslashes": b'{"t":"error","message":"' + b"\\\\" * (_M // 2 - 20) + b'"}\n',
    "unicode-escapes": b'{"t":"error","message":"' + b"\\u00e9" * (_M // 6 - 10) + b'"}\n',
    "nested-lists": b'{"t":"report","data":' + b"[]," * (_M // 3 - 10) + b"}\n",
    "deep": b"[" * (_M // 2) + b"]" * (_M // 2) + b"\n",
    "deep-within-the-value-count": b"[" * (MAX_JSON_VALUES // 2 - 1)
    + b"]" * (MAX_JSON_VALUES // 2 - 1)
    + b"\n",
    "commas": b"[" + b"," * _M + b"]\n",
    "surrogates": b'{"t":"error","message":"' + b"\\ud800" * (_M // 6 - 10) + b'"}\n',
}


@pytest.mark.parametrize("raw", SLOW_SHAPES.values(), ids=SLOW_SHAPES.keys())
def test_parsing_a_hostile_line_is_quick(raw: bytes) -> None:
    assert len(raw) <= MAX_WORKER_LINE
    started = time.process_time()
    with contextlib.suppress(WorkerProtocolError):
        parse_message(raw)
    # Measured ~0.01-0.3 s CPU for 4 MiB; a quadratic scan of 4 MiB would take hours.
    assert time.process_time() - started < 3.0


class EndlessTransport:
    """A worker whose next line is always ready (it never lets recv time out)."""

    def __init__(self, first: bytes, each: bytes) -> None:
        self.first: bytes | None = first
        self.each = each
        self.killed = False

    def send(self, data: bytes, timeout: float | None = None) -> None:
        pass

    def recv_line(self, timeout: float) -> bytes | None:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        time.sleep(0.002)
        return self.each

    def wait(self, timeout: float) -> int | None:
        return None

    def interrupt(self, timeout: float) -> str | None:
        return None

    def kill(self) -> None:
        self.killed = True

    def stderr_tail(self) -> str:
        return ""


def test_a_flood_of_lines_cannot_outlast_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pytest_gondolin.sandbox.stack_dump.STACK_DUMP_GRACE", 0.1)
    query = line({"t": "query", "kind": "k", "args": {}})
    collected = line({"t": "collected", "nodeids": [NODEID], "errors": []})
    transport = EndlessTransport(collected, query)
    client = WorkerClient(transport)
    client.start(1.0)
    started = time.monotonic()
    outcome = client.run(NODEID, seed=0, timeout=0.3)
    assert time.monotonic() - started < 5.0
    assert outcome.failure is not None and outcome.failure.kind == "timeout"
    assert transport.killed
