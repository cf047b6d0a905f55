"""Queries a sandboxed test sends to the host (``http_traffic``) are hostile input too.

The worker's query lines are parsed by ``sandbox.messages.parse_message``
(fuzzed in ``test_messages.py``); what that lets through reaches
``sandbox.queries.answer_query``. Its contract: return a JSON-serialisable answer or
raise a :class:`GondolinError` (which becomes an error answer for the
guest) -- never anything else, which would escape into pytest as an
internal error and end the host session.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import GondolinError
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.sandbox.queries import answer_query


def _answer(recorder: Recorder | None, kind: Any, args: Any) -> tuple[str, Any]:
    try:
        data = answer_query(recorder, kind, args)
    except GondolinError as exc:
        return "error", str(exc)
    json.dumps(data)  # the answer travels back to the guest as JSON
    return "ok", data


# What the worker protocol can carry: JSON values (finite floats only: the
# parser rejects NaN/Infinity).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)

stub_args = st.fixed_dictionaries(
    {"op": st.just("stub")},
    optional={
        "method": st.sampled_from(["GET", "post", "*", "", "G E T", "x" * 40]) | json_values,
        "url": st.sampled_from(
            ["http://a.test/", "https://b.test/x?y=1", "ftp://c/", "http://[::1/"]
        )
        | json_values,
        "status": st.integers(-5, 1000) | st.text(max_size=6) | json_values,
        "body": st.sampled_from(["", "aGVsbG8=", "not base64!", "YQ"]) | json_values,
        "json": st.sampled_from(["[1, 2]", "{", '"s"', "[" * 5000, "[" * 100_000]) | json_values,
        "headers": st.dictionaries(st.text(max_size=8), json_values, max_size=3)
        | st.lists(st.lists(json_values, max_size=3), max_size=3)
        | json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["http", "other"]) | json_values, args=json_values)
def test_any_query_is_answered_or_refused(kind: Any, args: Any) -> None:
    if not isinstance(args, dict):
        args = {"op": args}
    _answer(Recorder(), kind, args)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=stub_args)
def test_any_stub_query_is_answered_or_refused(args: dict[str, Any]) -> None:
    recorder = Recorder()
    outcome, _ = _answer(recorder, "http", args)
    assert (outcome == "ok") == (len(recorder.stubs) == 1)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"op": "list"}, ("ok", [])),
        ({"op": "clear"}, ("ok", None)),
        ({"op": "stub", "method": "GET", "url": "http://a.test/"}, ("ok", None)),
        ({"op": "stub", "method": "GET", "url": "http://a.test/", "json": "[" * 100_000}, "error"),
        ({"op": "stub", "method": "GET"}, "error"),
        ({"op": "drop-tables"}, "error"),
    ],
)
def test_examples(args: dict[str, Any], expected: Any) -> None:
    outcome = _answer(Recorder(), "http", args)
    assert outcome == expected if expected != "error" else outcome[0] == "error"


def test_no_recorder_is_an_error_answer() -> None:
    assert _answer(None, "http", {"op": "list"})[0] == "error"


def _stub(payload: str) -> dict[str, Any]:
    return {"op": "stub", "method": "GET", "url": "http://x.test/", "json": payload}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("[" + ",".join(["[[]]"] * 200_000) + "]", "JSON values"),  # ~1 MiB of tiny lists
        ("[" * 65 + "]" * 65, "deep"),
        ('"' + "x" * (1024 * 1024) + '"', "bytes"),
    ],
    ids=["many-values", "too-deep", "too-big"],
)
def test_a_stub_json_is_checked_on_its_bytes_before_it_is_built(payload: str, reason: str) -> None:
    """The red team's flood: 4 MiB of nested lists as json= once cost the host ~140 MiB."""
    recorder = Recorder()
    with pytest.raises(GondolinError, match="bad stub from the guest") as info:
        answer_query(recorder, "http", _stub(payload))
    assert reason in str(info.value)
    assert not recorder.stubs


def test_a_modest_stub_json_still_works() -> None:
    """Negative control: a realistic nested document is accepted and served."""
    recorder = Recorder()
    doc = {
        "items": [{"id": i, "tags": ["a", "b"], "meta": {"x": [1, [2, [3]]]}} for i in range(500)]
    }
    answer_query(recorder, "http", _stub(json.dumps(doc)))
    assert len(recorder.stubs) == 1
