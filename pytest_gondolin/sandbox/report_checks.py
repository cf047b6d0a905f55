"""Check a serialized pytest report from the worker and bound what the host keeps of it.

Sans-IO: a parsed JSON value in, a normalized copy (or
:class:`~pytest_gondolin.errors.WorkerProtocolError`) out.  The worker is hostile,
so a report is accepted only in the exact shape pytest produces
(``_report_to_json`` in ``_pytest/reports.py``) *and* only with what
pytest's own consumers rely on:

* the terminal reporter folds skips assuming a skipped report without
  ``wasxfail`` carries a ``(path, lineno, reason)`` longrepr, and junitxml
  asserts that every failed report has a longrepr;
* durations are finite and at most :data:`MAX_DURATION`, ``start``/``stop``
  are epoch seconds in ``[0, MAX_TIMESTAMP]``;
* ``user_properties`` are ``(str, JSON value)`` pairs, ``sections`` are
  ``(str, str)`` pairs, keywords are names;
* attributes pytest does not define are dropped: a plugin-added ``node``
  (which junitxml and ``-v`` read as an xdist worker node) or any other
  extra never reaches the host's reporters -- except the few the host's
  plugins read, each validated (pytest-rerunfailures' ``rerun``, an
  attempt number).

Everything a report keeps is charged to a :class:`~.json_checks.Keep`
budget (one text at most ``MAX_KEPT_TEXT`` characters, one report about
``MAX_REPORT_KEPT`` bytes).  Longer texts are cut in the middle, and lists
where they matter least (sections and properties at the end, a traceback
and its lines at the start: the innermost frames stay), each with a
visible marker, so a report that is too large still arrives, readable,
with its outcome intact.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Final

import pytest

from pytest_gondolin.sandbox.json_checks import (
    VALUE_COST,
    JSONObject,
    Keep,
    bad_message,
    expect,
    expect_int,
    expect_keys,
    expect_list,
    expect_number,
    expect_pair,
    expect_str,
    expect_triple,
    truncation_mark,
)

__all__ = [
    "MAX_DURATION",
    "MAX_NODEID_CHARS",
    "MAX_TIMESTAMP",
    "check_collect_report",
    "check_test_report",
]

#: Largest node id accepted from or sent to the worker.
MAX_NODEID_CHARS: Final = 64 * 1024
#: Longest duration accepted, in seconds (~116 days; sandboxed runs time out
#: long before).  Also keeps ``float()`` from overflowing on a huge integer.
MAX_DURATION: Final = 10_000_000.0
#: Latest ``start``/``stop`` accepted (epoch seconds, year 2286): anything a
#: ``datetime.fromtimestamp`` in a reporting plugin can format.
MAX_TIMESTAMP: Final = 10_000_000_000.0
#: Most distinct keywords on one report (a real item has tens).
MAX_KEYWORDS: Final = 100_000

#: What an attribute name looks like; extras with other names (private,
#: dunder, dotted) are a protocol violation rather than silently dropped.
_EXTRA_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_MAX_EXTRA_KEYS: Final = 32
_OUTCOMES: Final = frozenset({"passed", "failed", "skipped"})
_WHENS: Final = frozenset({"setup", "call", "teardown"})
_TB_STYLES: Final = frozenset({"long", "short", "line", "no", "native", "value", "auto"})


# --------------------------------------------------------------------------
# longrepr
# --------------------------------------------------------------------------


def _lines(value: object, where: str, keep: Keep) -> list[str]:
    return keep.bounded(
        expect_list(value, where),
        keep.text,
        where,
        lambda n: truncation_mark(n, "lines"),
        keep_last=True,
    )


def _fileloc(value: object, where: str, keep: Keep) -> JSONObject | None:
    if value is None:
        return None
    loc = expect_keys(value, frozenset({"path", "lineno", "message"}), where)
    keep.charge()
    return {
        "path": keep.text(loc["path"], f"{where}.path"),
        "lineno": expect_int(loc["lineno"], f"{where}.lineno"),
        "message": keep.text(loc["message"], f"{where}.message"),
    }


def _style(value: object, where: str) -> str:
    style = expect_str(value, where)
    if style not in _TB_STYLES:
        raise bad_message(where, f"unknown traceback style {style[:50]!r}")
    return style


def _scalar_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _entry(value: object, where: str, keep: Keep) -> JSONObject:
    entry = expect_keys(value, frozenset({"type", "data"}), where)
    kind = entry["type"]
    keep.charge()
    if kind == "ReprEntryNative":
        data = expect_keys(entry["data"], frozenset({"lines"}), f"{where}.data")
        return {"type": kind, "data": {"lines": _lines(data["lines"], f"{where}.lines", keep)}}
    if kind != "ReprEntry":
        raise bad_message(f"{where}.type", f"unknown traceback entry type {str(kind)[:50]!r}")
    keys = frozenset({"lines", "reprfuncargs", "reprlocals", "reprfileloc", "style"})
    data = expect_keys(entry["data"], keys, f"{where}.data")
    style = _style(data["style"], f"{where}.style")
    funcargs = data["reprfuncargs"]
    if funcargs is not None:
        args = expect_keys(funcargs, frozenset({"args"}), f"{where}.reprfuncargs")["args"]

        def arg(pair: object, at: str) -> list[str]:
            name, val = expect_pair(pair, at)
            return [keep.text(name, f"{at}[0]"), keep.text(_scalar_text(val), f"{at}[1]")]

        funcargs = {
            "args": keep.bounded(
                expect_list(args, f"{where}.reprfuncargs.args"),
                arg,
                f"{where}.reprfuncargs.args",
                lambda n: ["...", truncation_mark(n, "arguments")],
            )
        }
    reprlocals = data["reprlocals"]
    if reprlocals is not None:
        lines = expect_keys(reprlocals, frozenset({"lines"}), f"{where}.reprlocals")["lines"]
        reprlocals = {"lines": _lines(lines, f"{where}.reprlocals.lines", keep)}
    return {
        "type": kind,
        "data": {
            "lines": _lines(data["lines"], f"{where}.lines", keep),
            "reprfuncargs": funcargs,
            "reprlocals": reprlocals,
            "reprfileloc": _fileloc(data["reprfileloc"], f"{where}.reprfileloc", keep),
            "style": style,
        },
    }


def _entry_marker(count: int) -> JSONObject:
    return {
        "type": "ReprEntryNative",
        "data": {"lines": [truncation_mark(count, "traceback entries") + "\n"]},
    }


def _traceback(value: object, where: str, keep: Keep) -> JSONObject:
    tb = expect_keys(value, frozenset({"reprentries", "extraline", "style"}), where)
    style = _style(tb["style"], f"{where}.style")
    extraline = tb["extraline"]
    keep.charge()
    return {
        # The innermost entries say where it failed: keep those.
        "reprentries": keep.bounded(
            expect_list(tb["reprentries"], f"{where}.reprentries"),
            lambda e, at: _entry(e, at, keep),
            f"{where}.reprentries",
            _entry_marker,
            keep_last=True,
        ),
        "extraline": None if extraline is None else keep.text(extraline, f"{where}.extraline"),
        "style": style,
    }


def _longrepr(value: object, where: str, keep: Keep) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return keep.text(value, where)
    if isinstance(value, list):
        # A skip: (path, lineno, reason); pytest's reporters insist on a tuple.
        path, lineno, reason = expect_triple(value, where)
        return (
            keep.text(path, f"{where}[0]"),
            expect_int(lineno, f"{where}[1]"),
            keep.text(reason, f"{where}[2]"),
        )
    keys = frozenset({"reprcrash", "reprtraceback", "sections", "chain"})
    exc = expect_keys(value, keys, where)
    keep.charge()
    out: JSONObject = {
        "reprcrash": _fileloc(exc["reprcrash"], f"{where}.reprcrash", keep),
        "reprtraceback": _traceback(exc["reprtraceback"], f"{where}.reprtraceback", keep),
    }

    def section(item: object, at: str) -> tuple[str, ...]:
        return tuple(keep.text(p, at) for p in expect_triple(item, at))

    out["sections"] = keep.bounded(
        expect_list(exc["sections"], f"{where}.sections"),
        section,
        f"{where}.sections",
        lambda n: ("pytest-gondolin", truncation_mark(n, "sections"), "-"),
    )
    chain = exc["chain"]
    if chain is not None:

        def link(item: object, at: str) -> tuple[Any, ...]:
            tb, crash, description = expect_triple(item, at)
            return (
                _traceback(tb, f"{at}[0]", keep),
                _fileloc(crash, f"{at}[1]", keep),
                None if description is None else keep.text(description, f"{at}[2]"),
            )

        # The last link is the exception that was raised: keep the end.
        chain = keep.bounded(
            expect_list(chain, f"{where}.chain"), link, f"{where}.chain", None, keep_last=True
        )
        if not chain:
            chain = None
    out["chain"] = chain
    return out


# --------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------


def _sections(value: object, where: str, keep: Keep) -> list[tuple[str, str]]:
    def section(item: object, at: str) -> tuple[str, str]:
        name, content = expect_pair(item, at)
        return keep.text(name, f"{at}[0]"), keep.text(content, f"{at}[1]")

    return keep.bounded(
        expect_list(value, where),
        section,
        where,
        lambda n: ("pytest-gondolin", truncation_mark(n, "sections")),
    )


def _user_properties(value: object, where: str, keep: Keep) -> list[tuple[str, Any]]:
    def prop(item: object, at: str) -> tuple[str, Any]:
        name, val = expect_pair(item, at)
        return keep.text(name, f"{at}[0]"), keep.json(val)

    return keep.bounded(
        expect_list(value, where),
        prop,
        where,
        lambda n: ("pytest-gondolin", truncation_mark(n, "user properties")),
    )


def _keywords(value: object, where: str, keep: Keep) -> dict[str, int]:
    names = list(expect(value, dict, where))
    if len(names) > MAX_KEYWORDS:
        raise bad_message(where, f"more than {MAX_KEYWORDS} keywords")
    # No marker: a made-up keyword would be matched by ``-k`` plugins.
    kept = keep.bounded(names, lambda k, at: expect_str(k, at), where, None)
    keep.charge(sum(sys.getsizeof(k) for k in kept))
    return dict.fromkeys(kept, 1)


def _reject_bad_extras(
    data: JSONObject, known: frozenset[str], report_cls: type, where: str
) -> None:
    """Reject extras no real report could carry; all others are dropped (never copied).

    ``TestReport(**extra)`` would set them as instance attributes: one named
    like a method or property would shadow it, and any other (``node``, say)
    is read by reporters that expect a plugin's object, not JSON.
    """
    extras = [k for k in data if k not in known]
    if len(extras) > _MAX_EXTRA_KEYS:
        raise bad_message(where, f"more than {_MAX_EXTRA_KEYS} extra attributes")
    for key in extras:
        if not _EXTRA_KEY.fullmatch(key) or hasattr(report_cls, key):
            raise bad_message(where, f"attribute {key[:64]!r} is not allowed")


def _check_longrepr_for(outcome: str, longrepr: Any, wasxfail: bool, where: str) -> None:
    # junitxml asserts a failed report has a longrepr; the terminal's skip
    # folding and junitxml's <skipped> unpack a skip's (path, lineno, reason).
    if outcome == "failed" and longrepr is None:
        raise bad_message(f"{where}.longrepr", "a failed report needs a longrepr")
    if outcome == "skipped" and not wasxfail and not isinstance(longrepr, tuple):
        raise bad_message(f"{where}.longrepr", "a skip needs a (path, lineno, reason) longrepr")


#: Report attributes of plugins the host's reporters read, copied when valid:
#: pytest-rerunfailures' attempt number (its summary sorts by it).
_ALLOWED_EXTRAS: Final = ("rerun",)
#: Highest attempt number accepted (pytest-rerunfailures counts from 0).
MAX_RERUN_ATTEMPT: Final = 10_000

_TEST_REPORT_KEYS: Final = frozenset(
    {
        "$report_type",
        "_report_type",
        "_subtest.context",
        "nodeid",
        "location",
        "keywords",
        "outcome",
        "longrepr",
        "when",
        "sections",
        "duration",
        "start",
        "stop",
        "user_properties",
        "wasxfail",
        *_ALLOWED_EXTRAS,
    }
)
_COLLECT_REPORT_KEYS: Final = frozenset(
    {"$report_type", "nodeid", "outcome", "longrepr", "result", "sections"}
)


def check_test_report(value: object, where: str = "report", keep: Keep | None = None) -> JSONObject:
    """Validate a serialized ``TestReport``; return a normalized, bounded copy.

    The copy has the tuples pytest's reporters expect (``location``, skip
    ``longrepr``, ``sections``, ``user_properties``), keeps what *keep*
    allows (texts and lists beyond it are truncated with a marker), has no
    attribute pytest does not define, and is safe to hand to
    ``pytest_report_from_serializable`` and then to every reporter.
    Subtest reports (pytest's ``SubtestReport``) are accepted too.  Raises
    ``WorkerProtocolError``.
    """
    keep = Keep() if keep is None else keep
    data: JSONObject = expect(value, dict, where)
    subtest = data.get("_report_type") == "SubTestReport"
    if not subtest and data.get("$report_type") != "TestReport":
        raise bad_message(where, "not a TestReport")
    for key in ("nodeid", "location", "keywords", "outcome", "longrepr", "when"):
        if key not in data:
            raise bad_message(where, f"missing {key!r}")
    _reject_bad_extras(data, _TEST_REPORT_KEYS, pytest.TestReport, where)
    outcome = expect_str(data["outcome"], f"{where}.outcome")
    when = expect_str(data["when"], f"{where}.when")
    if outcome not in _OUTCOMES or when not in _WHENS:
        raise bad_message(where, f"bad outcome/when {outcome[:20]!r}/{when[:20]!r}")
    path, lineno, domain = expect_triple(data["location"], f"{where}.location")
    nodeid = expect_str(data["nodeid"], f"{where}.nodeid", MAX_NODEID_CHARS)
    keep.charge(sys.getsizeof(nodeid) + 10 * VALUE_COST)  # the report object itself
    out: JSONObject = {
        "nodeid": nodeid,
        "location": (
            keep.text(path, f"{where}.location[0]"),
            None if lineno is None else expect_int(lineno, f"{where}.location[1]"),
            keep.text(domain, f"{where}.location[2]"),
        ),
        "keywords": _keywords(data["keywords"], f"{where}.keywords", keep),
        "outcome": outcome,
        "when": when,
    }
    for key, hi in (("duration", MAX_DURATION), ("start", MAX_TIMESTAMP), ("stop", MAX_TIMESTAMP)):
        if key in data:
            out[key] = expect_number(data[key], f"{where}.{key}", hi)
    if "wasxfail" in data:
        out["wasxfail"] = keep.text(data["wasxfail"], f"{where}.wasxfail")
    if "rerun" in data:
        out["rerun"] = expect_int(data["rerun"], f"{where}.rerun", 0, MAX_RERUN_ATTEMPT)
    if subtest:
        ctx = expect_keys(
            data.get("_subtest.context"), frozenset({"msg", "kwargs"}), f"{where}.context"
        )
        msg = ctx["msg"]
        kwargs = list(expect(ctx["kwargs"], dict, f"{where}.context.kwargs").items())
        out["_report_type"] = "SubTestReport"
        out["_subtest.context"] = {
            "msg": None if msg is None else keep.text(msg, f"{where}.context.msg"),
            "kwargs": dict(
                keep.bounded(
                    kwargs,
                    lambda kv, at: (keep.text(kv[0], at), keep.text(_scalar_text(kv[1]), at)),
                    f"{where}.context.kwargs",
                    lambda n: ("pytest-gondolin", truncation_mark(n, "arguments")),
                )
            ),
        }
    else:
        out["$report_type"] = "TestReport"
    out["longrepr"] = _longrepr(data["longrepr"], f"{where}.longrepr", keep)
    _check_longrepr_for(outcome, out["longrepr"], "wasxfail" in out, where)
    out["sections"] = _sections(data.get("sections", []), f"{where}.sections", keep)
    out["user_properties"] = _user_properties(
        data.get("user_properties", []), f"{where}.user_properties", keep
    )
    return out


def check_collect_report(
    value: object, where: str = "collect report", keep: Keep | None = None
) -> JSONObject:
    """Validate a serialized failed ``CollectReport``; return a normalized, bounded copy."""
    keep = Keep() if keep is None else keep
    data: JSONObject = expect(value, dict, where)
    if data.get("$report_type") != "CollectReport":
        raise bad_message(where, "not a CollectReport")
    for key in ("nodeid", "outcome", "longrepr"):
        if key not in data:
            raise bad_message(where, f"missing {key!r}")
    _reject_bad_extras(data, _COLLECT_REPORT_KEYS, pytest.CollectReport, where)
    outcome = expect_str(data["outcome"], f"{where}.outcome")
    if outcome not in _OUTCOMES:
        raise bad_message(where, f"bad outcome {outcome[:20]!r}")
    if data.get("result") not in (None, []):
        raise bad_message(f"{where}.result", "collect results cannot cross the boundary")
    nodeid = expect_str(data["nodeid"], f"{where}.nodeid", MAX_NODEID_CHARS)
    keep.charge(sys.getsizeof(nodeid) + 10 * VALUE_COST)
    longrepr = _longrepr(data["longrepr"], f"{where}.longrepr", keep)
    _check_longrepr_for(outcome, longrepr, False, where)
    return {
        "$report_type": "CollectReport",
        "nodeid": nodeid,
        "outcome": outcome,
        "longrepr": longrepr,
        "result": None,
        "sections": _sections(data.get("sections", []), f"{where}.sections", keep),
    }
