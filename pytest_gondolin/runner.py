"""Run pytest items in another process and replay their reports on the host.

The far side is the worker of :mod:`pytest_gondolin.guest.worker` (its
docstring defines the wire protocol).  This module is the host side:

* :class:`WorkerTransport` — the duplex byte pipe to a worker, a Protocol
  with six methods.  :class:`SubprocessTransport` implements it over a local
  child process; the VM transport implements it over the guest agent.
* :func:`parse_message` — sans-IO: one line from the worker in, one
  validated message out, or :class:`~pytest_gondolin.errors.ProtocolError`.
  The worker is hostile by assumption: every line is bounded, every field is
  type-checked, serialized reports are checked against the exact shape
  pytest produces before pytest's own deserializer ever sees them.
* :class:`WorkerClient` — drives one worker: ``start`` (wait for
  collection), ``ping``, ``run`` (one item), ``close``.
* :func:`replay_item` — replays a run's reports through the host's hooks the
  way pytest-xdist's controller does (``pytest_runtest_logstart``,
  ``pytest_report_from_serializable`` + ``pytest_runtest_logreport`` per
  report, ``pytest_warning_recorded``, ``pytest_runtest_logfinish``), so
  terminal output, ``-x``/``--maxfail``, ``--lf``, junitxml and every other
  reporter work unchanged.  A run that crashed or timed out becomes a failed
  report naming the cause.

Transport contract (what :class:`WorkerClient` needs from a transport)
----------------------------------------------------------------------

``send(data: bytes) -> None``
    Write *data* (whole protocol lines) to the worker's stdin.  May raise
    ``OSError`` or a ``GondolinError`` when the worker is gone.
``recv_line(timeout: float) -> bytes | None``
    Return the next line from the worker's protocol stream *including* its
    ``b"\\n"``; ``None`` once the stream has ended.  Raise ``TimeoutError``
    if no whole line arrives within *timeout* seconds.  Never buffer more
    than about ``MAX_WORKER_LINE + 1`` bytes for one line: when a line is
    longer, return what was read (no terminator, longer than the limit) and
    stop reading.  A chunk without terminator that is *not* over the limit
    means the stream ended mid-line.  May raise ``OSError`` or a
    ``GondolinError`` for a broken link (the client treats it as a crash).
``wait(timeout: float) -> int | None``
    Wait up to *timeout* for the worker process to exit; return its exit
    status (negative: killed by that signal) or ``None`` if unknown.
``interrupt() -> None``
    Ask the worker for a stack dump (SIGUSR1 to the worker process); the
    dump appears in ``stderr_tail()``.  Best effort, never raises.
``kill() -> None``
    End the worker now and release everything.  Idempotent, never raises.
``stderr_tail() -> str``
    The last few KiB of the worker's stderr (what pytest, faulthandler and
    stray prints wrote), decoded leniently.

The client is not thread-safe; one thread drives one worker.

Lifecycle of a :class:`WorkerClient` (see :class:`Runstate`)::

    NEW --start--> READY --run--> RUNNING --done--> READY --close--> CLOSED
                     |               |
                     |               +--crash/timeout/protocol error--> DEAD --rewind--> READY
                     +--ping failure---------------------------------> DEAD
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import enum
import json
import logging
import math
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal, Protocol, TypeAlias

import pytest
from _pytest._code.code import ReprFileLocation, TerminalRepr
from _pytest._io import TerminalWriter

from pytest_gondolin.errors import AgentError, GondolinError, ProtocolError
from pytest_gondolin.guest.worker import (
    MAX_COMMAND_LINE,
    MAX_JSON_DEPTH,
    MAX_WORKER_LINE,
    WORKER_MODULE,
    encode_line,
)

__all__ = [
    "MAX_WORKER_LINE",
    "Collected",
    "Failure",
    "RunOutcome",
    "Runstate",
    "SubprocessTransport",
    "WarningRecord",
    "WorkerClient",
    "WorkerTransport",
    "parse_message",
    "replay_collect_errors",
    "replay_item",
    "worker_args",
    "worker_command",
]

log = logging.getLogger(__name__)

#: Waiting for the worker to import pytest and collect: a cold Python start
#: under TCG takes ~5 s, collecting a large project much longer.
DEFAULT_START_TIMEOUT: Final = 120.0
#: A pong is a round trip through an idle worker (~1 ms on virtio-serial).
DEFAULT_PING_TIMEOUT: Final = 10.0
#: After SIGUSR1, faulthandler writes the dump at once; this bounds how long
#: we wait for it to stop growing before killing the worker.
STACK_DUMP_GRACE: Final = 2.0
#: The dump is considered complete once stderr has been quiet this long.
_STACK_DUMP_QUIET: Final = 0.2
#: After EOF, how long the worker gets to finish exiting so its exit code
#: can be reported (it is already past writing its last line).
EXIT_WAIT: Final = 5.0
#: How long ``close`` lets the worker finish its session after ``quit``.
DEFAULT_QUIT_TIMEOUT: Final = 5.0
#: Most messages one run may produce (reports + warnings + errors); a real
#: run sends three reports, subtests add one per subtest.
MAX_MESSAGES_PER_RUN: Final = 20_000
#: Warnings beyond this many in one run are dropped (and logged).
MAX_WARNINGS_PER_RUN: Final = 1_000
#: Most bytes one run may send; beyond this the worker is treated as hostile.
MAX_BYTES_PER_RUN: Final = 4 * MAX_WORKER_LINE
#: Largest node id accepted from or sent to the worker.
MAX_NODEID_CHARS: Final = 64 * 1024
#: Most items a worker may report as collected.
MAX_COLLECTED_ITEMS: Final = 1_000_000
#: Bytes of worker stderr kept for crash reports and stack dumps.
STDERR_TAIL_BYTES: Final = 64 * 1024

#: The far side's serialized reports use these exact shapes; see
#: ``_pytest/reports.py`` (``_report_to_json``) and ``_pytest/_code/code.py``.
_OUTCOMES: Final = frozenset({"passed", "failed", "skipped"})
_WHENS: Final = frozenset({"setup", "call", "teardown"})
_TB_STYLES: Final = frozenset({"long", "short", "line", "no", "native", "value", "auto"})
#: Plugins add attributes to reports; accepted names look like attributes
#: and are not private, and (checked separately) do not shadow anything
#: the report class defines.
_EXTRA_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_MAX_EXTRA_KEYS: Final = 32
_MAX_KEYWORDS: Final = 100_000
_CATEGORY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,31}")
_MAX_FILENAME_CHARS: Final = 4096
_MAX_NONCE_CHARS: Final = 256

JSONObject: TypeAlias = dict[str, Any]


# --------------------------------------------------------------------------
# messages (sans-IO)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Collected:
    """The worker finished collecting: its item ids and failed collect reports."""

    nodeids: tuple[str, ...]
    errors: tuple[JSONObject, ...] = ()


@dataclass(frozen=True)
class ReportMessage:
    """One validated serialized TestReport (tuples restored)."""

    data: JSONObject

    @property
    def nodeid(self) -> str:
        nodeid: str = self.data["nodeid"]
        return nodeid


@dataclass(frozen=True)
class WarningRecord:
    """A warning the worker recorded while running an item."""

    message: str
    category: str
    nodeid: str
    filename: str
    lineno: int


@dataclass(frozen=True)
class ErrorMessage:
    """The worker could not serve a command (unknown item, internal error)."""

    message: str


@dataclass(frozen=True)
class DoneMessage:
    """The run command for ``nodeid`` is finished."""

    nodeid: str


@dataclass(frozen=True)
class QueryMessage:
    """The test asks the host something mid-run (e.g. its recorded HTTP traffic)."""

    kind: str
    args: JSONObject


@dataclass(frozen=True)
class PongMessage:
    """Answer to a ping."""

    nonce: str


WorkerMessage: TypeAlias = (
    Collected
    | ReportMessage
    | WarningRecord
    | ErrorMessage
    | DoneMessage
    | PongMessage
    | QueryMessage
)


def _fail(where: str, problem: str) -> ProtocolError:
    return ProtocolError(f"worker sent a bad message: {where}: {problem}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not JSON")


def _clean(obj: Any, where: str, depth: int = 0) -> Any:
    """Return *obj* (parsed JSON) with lone surrogates replaced, or raise.

    ``json.loads`` turns ``"\\ud800"`` into a lone surrogate that no terminal
    or XML writer can encode; replacing it keeps a hostile string from
    crashing the host's reporters later.
    """
    if depth > MAX_JSON_DEPTH:
        raise _fail(where, f"nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return obj.encode("utf-8", "replace").decode("utf-8")
        return obj
    if isinstance(obj, dict):
        return {_clean(k, where, depth + 1): _clean(v, where, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v, where, depth + 1) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        raise _fail(where, "non-finite number")
    return obj


def _as(value: object, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int subclass, but no protocol field is a bool.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(where, f"expected {names}, got {type(value).__name__}")
    return value


def _str(value: object, where: str, max_chars: int | None = None) -> str:
    text: str = _as(value, str, where)
    if max_chars is not None and len(text) > max_chars:
        raise _fail(where, f"longer than {max_chars} characters")
    return text


def _opt_str(value: object, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: object, where: str, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    number: int = _as(value, int, where)
    if not lo <= number <= hi:
        raise _fail(where, f"{number} out of range [{lo}, {hi}]")
    return number


def _number(value: object, where: str) -> float:
    number: float = _as(value, (int, float), where)
    return float(number)


def _list(value: object, where: str) -> list[Any]:
    items: list[Any] = _as(value, list, where)
    return items


def _str_list(value: object, where: str) -> list[str]:
    return [_str(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))]


def _exact_keys(value: object, keys: frozenset[str], where: str) -> JSONObject:
    obj: JSONObject = _as(value, dict, where)
    if set(obj) != keys:
        raise _fail(where, f"keys {sorted(obj)} are not {sorted(keys)}")
    return obj


def _check_fileloc(value: object, where: str) -> JSONObject | None:
    if value is None:
        return None
    loc = _exact_keys(value, frozenset({"path", "lineno", "message"}), where)
    return {
        "path": _str(loc["path"], f"{where}.path"),
        "lineno": _int(loc["lineno"], f"{where}.lineno"),
        "message": _str(loc["message"], f"{where}.message"),
    }


def _check_entry(value: object, where: str) -> JSONObject:
    entry = _exact_keys(value, frozenset({"type", "data"}), where)
    kind = entry["type"]
    if kind == "ReprEntryNative":
        data = _exact_keys(entry["data"], frozenset({"lines"}), f"{where}.data")
        return {"type": kind, "data": {"lines": _str_list(data["lines"], f"{where}.data.lines")}}
    if kind != "ReprEntry":
        raise _fail(f"{where}.type", f"unknown traceback entry type {str(kind)[:50]!r}")
    keys = frozenset({"lines", "reprfuncargs", "reprlocals", "reprfileloc", "style"})
    data = _exact_keys(entry["data"], keys, f"{where}.data")
    funcargs = data["reprfuncargs"]
    if funcargs is not None:
        args = _exact_keys(funcargs, frozenset({"args"}), f"{where}.reprfuncargs")["args"]
        pairs = []
        for i, pair in enumerate(_list(args, f"{where}.reprfuncargs.args")):
            name, val = _pair(pair, f"{where}.reprfuncargs.args[{i}]")
            pairs.append([_str(name, f"{where}.reprfuncargs.args[{i}][0]"), _scalar_text(val)])
        funcargs = {"args": pairs}
    reprlocals = data["reprlocals"]
    if reprlocals is not None:
        lines = _exact_keys(reprlocals, frozenset({"lines"}), f"{where}.reprlocals")["lines"]
        reprlocals = {"lines": _str_list(lines, f"{where}.reprlocals.lines")}
    style = _str(data["style"], f"{where}.style")
    if style not in _TB_STYLES:
        raise _fail(f"{where}.style", f"unknown traceback style {style[:50]!r}")
    return {
        "type": kind,
        "data": {
            "lines": _str_list(data["lines"], f"{where}.lines"),
            "reprfuncargs": funcargs,
            "reprlocals": reprlocals,
            "reprfileloc": _check_fileloc(data["reprfileloc"], f"{where}.reprfileloc"),
            "style": style,
        },
    }


def _scalar_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _pair(value: object, where: str) -> tuple[Any, Any]:
    items = _list(value, where)
    if len(items) != 2:
        raise _fail(where, "expected a pair")
    return items[0], items[1]


def _check_traceback(value: object, where: str) -> JSONObject:
    tb = _exact_keys(value, frozenset({"reprentries", "extraline", "style"}), where)
    style = _str(tb["style"], f"{where}.style")
    if style not in _TB_STYLES:
        raise _fail(f"{where}.style", f"unknown traceback style {style[:50]!r}")
    entries = _list(tb["reprentries"], f"{where}.reprentries")
    return {
        "reprentries": [
            _check_entry(e, f"{where}.reprentries[{i}]") for i, e in enumerate(entries)
        ],
        "extraline": _opt_str(tb["extraline"], f"{where}.extraline"),
        "style": style,
    }


def _check_longrepr(value: object, where: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        # A skip: (path, lineno, reason); pytest's reporters insist on a tuple.
        if len(value) != 3:
            raise _fail(where, "a skip location must have 3 items")
        return (
            _str(value[0], f"{where}[0]"),
            _int(value[1], f"{where}[1]"),
            _str(value[2], f"{where}[2]"),
        )
    keys = frozenset({"reprcrash", "reprtraceback", "sections", "chain"})
    exc = _exact_keys(value, keys, where)
    sections = []
    for i, section in enumerate(_list(exc["sections"], f"{where}.sections")):
        parts = _list(section, f"{where}.sections[{i}]")
        if len(parts) != 3:
            raise _fail(f"{where}.sections[{i}]", "expected (name, content, sep)")
        sections.append(tuple(_str(p, f"{where}.sections[{i}]") for p in parts))
    chain = exc["chain"]
    if chain is not None:
        links = []
        for i, link in enumerate(_list(chain, f"{where}.chain")):
            parts = _list(link, f"{where}.chain[{i}]")
            if len(parts) != 3:
                raise _fail(f"{where}.chain[{i}]", "expected (traceback, crash, description)")
            links.append(
                (
                    _check_traceback(parts[0], f"{where}.chain[{i}][0]"),
                    _check_fileloc(parts[1], f"{where}.chain[{i}][1]"),
                    _opt_str(parts[2], f"{where}.chain[{i}][2]"),
                )
            )
        chain = links
    return {
        "reprcrash": _check_fileloc(exc["reprcrash"], f"{where}.reprcrash"),
        "reprtraceback": _check_traceback(exc["reprtraceback"], f"{where}.reprtraceback"),
        "sections": sections,
        "chain": chain,
    }


def _check_sections(value: object, where: str) -> list[tuple[str, str]]:
    sections = []
    for i, section in enumerate(_list(value, where)):
        name, content = _pair(section, f"{where}[{i}]")
        sections.append((_str(name, f"{where}[{i}][0]"), _str(content, f"{where}[{i}][1]")))
    return sections


def _check_user_properties(value: object, where: str) -> list[tuple[str, Any]]:
    props = []
    for i, prop in enumerate(_list(value, where)):
        name, val = _pair(prop, f"{where}[{i}]")
        props.append((_str(name, f"{where}[{i}][0]"), val))
    return props


def _check_extras(
    data: JSONObject, known: frozenset[str], report_cls: type, where: str
) -> JSONObject:
    extras = {k: v for k, v in data.items() if k not in known}
    if len(extras) > _MAX_EXTRA_KEYS:
        raise _fail(where, f"more than {_MAX_EXTRA_KEYS} extra attributes")
    for key in extras:
        # TestReport(**extra) sets instance attributes: one named like a
        # method or property would shadow it and break every reporter.
        if not _EXTRA_KEY.fullmatch(key) or hasattr(report_cls, key):
            raise _fail(where, f"attribute {key[:64]!r} is not allowed")
    return extras


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
    }
)
_COLLECT_REPORT_KEYS: Final = frozenset(
    {"$report_type", "nodeid", "outcome", "longrepr", "result", "sections"}
)


def check_test_report(value: object, where: str = "report") -> JSONObject:
    """Validate a serialized ``TestReport`` and return a normalized copy.

    The copy has the tuples pytest's reporters expect (``location``, skip
    ``longrepr``, ``sections``, ``user_properties``) and is safe to hand to
    ``pytest_report_from_serializable``.  Subtest reports (pytest's
    ``SubtestReport``) are accepted too.  Raises ``ProtocolError``.
    """
    data: JSONObject = _as(value, dict, where)
    subtest = data.get("_report_type") == "SubTestReport"
    if not subtest and data.get("$report_type") != "TestReport":
        raise _fail(where, "not a TestReport")
    for key in ("nodeid", "location", "keywords", "outcome", "longrepr", "when"):
        if key not in data:
            raise _fail(where, f"missing {key!r}")
    location = _list(data["location"], f"{where}.location")
    if len(location) != 3:
        raise _fail(f"{where}.location", "expected (path, lineno, domain)")
    lineno = location[1]
    keywords = _as(data["keywords"], dict, f"{where}.keywords")
    if len(keywords) > _MAX_KEYWORDS:
        raise _fail(f"{where}.keywords", "too many keywords")
    outcome = _str(data["outcome"], f"{where}.outcome")
    when = _str(data["when"], f"{where}.when")
    if outcome not in _OUTCOMES or when not in _WHENS:
        raise _fail(where, f"bad outcome/when {outcome[:20]!r}/{when[:20]!r}")
    out: JSONObject = {
        "nodeid": _str(data["nodeid"], f"{where}.nodeid", MAX_NODEID_CHARS),
        "location": (
            _str(location[0], f"{where}.location[0]"),
            None if lineno is None else _int(lineno, f"{where}.location[1]"),
            _str(location[2], f"{where}.location[2]"),
        ),
        "keywords": {_str(k, f"{where}.keywords"): 1 for k in keywords},
        "outcome": outcome,
        "longrepr": _check_longrepr(data["longrepr"], f"{where}.longrepr"),
        "when": when,
        "sections": _check_sections(data.get("sections", []), f"{where}.sections"),
        "user_properties": _check_user_properties(
            data.get("user_properties", []), f"{where}.user_properties"
        ),
    }
    for key in ("duration", "start", "stop"):
        if key in data:
            out[key] = _number(data[key], f"{where}.{key}")
    if "wasxfail" in data:
        out["wasxfail"] = _str(data["wasxfail"], f"{where}.wasxfail")
    if subtest:
        ctx = _exact_keys(
            data.get("_subtest.context"), frozenset({"msg", "kwargs"}), f"{where}.context"
        )
        kwargs = _as(ctx["kwargs"], dict, f"{where}.context.kwargs")
        out["_report_type"] = "SubTestReport"
        out["_subtest.context"] = {
            "msg": _opt_str(ctx["msg"], f"{where}.context.msg"),
            "kwargs": {k: _scalar_text(v) for k, v in kwargs.items()},
        }
    else:
        out["$report_type"] = "TestReport"
    out.update(_check_extras(data, _TEST_REPORT_KEYS, pytest.TestReport, where))
    return out


def check_collect_report(value: object, where: str = "collect report") -> JSONObject:
    """Validate a serialized failed ``CollectReport``; return a normalized copy."""
    data: JSONObject = _as(value, dict, where)
    if data.get("$report_type") != "CollectReport":
        raise _fail(where, "not a CollectReport")
    for key in ("nodeid", "outcome", "longrepr"):
        if key not in data:
            raise _fail(where, f"missing {key!r}")
    outcome = _str(data["outcome"], f"{where}.outcome")
    if outcome not in _OUTCOMES:
        raise _fail(where, f"bad outcome {outcome[:20]!r}")
    if data.get("result") not in (None, []):
        raise _fail(f"{where}.result", "collect results cannot cross the boundary")
    out: JSONObject = {
        "$report_type": "CollectReport",
        "nodeid": _str(data["nodeid"], f"{where}.nodeid", MAX_NODEID_CHARS),
        "outcome": outcome,
        "longrepr": _check_longrepr(data["longrepr"], f"{where}.longrepr"),
        "result": None,
        "sections": _check_sections(data.get("sections", []), f"{where}.sections"),
    }
    out.update(_check_extras(data, _COLLECT_REPORT_KEYS, pytest.CollectReport, where))
    return out


def _parse_collected(msg: JSONObject) -> Collected:
    nodeids = _list(msg.get("nodeids"), "collected.nodeids")
    if len(nodeids) > MAX_COLLECTED_ITEMS:
        raise _fail("collected.nodeids", f"more than {MAX_COLLECTED_ITEMS} items")
    errors = _list(msg.get("errors"), "collected.errors")
    return Collected(
        nodeids=tuple(_str(n, "collected.nodeids[]", MAX_NODEID_CHARS) for n in nodeids),
        errors=tuple(
            check_collect_report(e, f"collected.errors[{i}]") for i, e in enumerate(errors)
        ),
    )


def _parse_report(msg: JSONObject) -> ReportMessage:
    return ReportMessage(check_test_report(msg.get("data")))


def _parse_warning(msg: JSONObject) -> WarningRecord:
    category = _str(msg.get("category"), "warning.category", 512)
    if not _CATEGORY.fullmatch(category):
        raise _fail("warning.category", f"not a dotted class name: {category[:64]!r}")
    return WarningRecord(
        message=_str(msg.get("message"), "warning.message"),
        category=category,
        nodeid=_str(msg.get("nodeid"), "warning.nodeid", MAX_NODEID_CHARS),
        filename=_str(msg.get("filename"), "warning.filename", _MAX_FILENAME_CHARS),
        lineno=_int(msg.get("lineno"), "warning.lineno", 0, 2**31 - 1),
    )


def _parse_error(msg: JSONObject) -> ErrorMessage:
    return ErrorMessage(_str(msg.get("message"), "error.message"))


def _parse_done(msg: JSONObject) -> DoneMessage:
    return DoneMessage(_str(msg.get("nodeid"), "done.nodeid", MAX_NODEID_CHARS))


def _parse_query(msg: JSONObject) -> QueryMessage:
    kind = _str(msg.get("kind"), "query.kind", 64)
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise _fail("query.args", f"expected an object, got {type(args).__name__}")
    return QueryMessage(kind, args)


def _parse_pong(msg: JSONObject) -> PongMessage:
    return PongMessage(_str(msg.get("nonce"), "pong.nonce", _MAX_NONCE_CHARS))


_PARSERS: Final[Mapping[str, Callable[[JSONObject], WorkerMessage]]] = {
    "collected": _parse_collected,
    "report": _parse_report,
    "warning": _parse_warning,
    "error": _parse_error,
    "done": _parse_done,
    "pong": _parse_pong,
    "query": _parse_query,
}


def parse_message(line: bytes, *, max_line: int = MAX_WORKER_LINE) -> WorkerMessage:
    """Parse one line from the worker (with or without its ``b"\\n"``).

    Returns a validated message; raises ``ProtocolError`` for anything else
    (oversized, not UTF-8 JSON, not an object, unknown type, wrong field
    types, a report whose shape pytest would not produce).  Never raises
    anything but ``ProtocolError``.
    """
    if len(line) > max_line:
        raise ProtocolError(f"worker sent a line of {len(line)} bytes (limit {max_line})")
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"worker sent a line that is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise _fail("message", f"expected an object, got {type(obj).__name__}")
    obj = _clean(obj, "message")
    kind = obj.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise _fail("message", f"unknown type {str(kind)[:50]!r}")
    return parser(obj)


# --------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------

FailureKind: TypeAlias = Literal["timeout", "crash", "error"]


@dataclass(frozen=True)
class Failure:
    """Why a run produced no (or not all) reports.

    ``kind`` is ``"timeout"`` (the host gave up), ``"crash"`` (the worker
    died) or ``"error"`` (the item could not be run: the worker refused it,
    broke protocol, or was never available).  ``headline`` becomes the
    report's one-line message, ``detail`` (stack dump, stderr or console
    tail) the text below it.
    """

    kind: FailureKind
    headline: str
    detail: str = ""
    duration: float = 0.0

    @classmethod
    def from_exception(cls, exc: BaseException, *, duration: float = 0.0) -> Failure:
        """A failure of kind ``"error"`` describing *exc* (e.g. a VM that would not restore)."""
        text = str(exc) or type(exc).__name__
        first, _, rest = text.partition("\n")
        return cls("error", f"{type(exc).__name__}: {first}", rest, duration)


@dataclass(frozen=True)
class RunOutcome:
    """What one ``run`` produced: validated serialized reports and warnings.

    ``failure`` is set when the run ended abnormally; the reports that did
    arrive before that are kept (e.g. a passed setup before a crash).
    """

    nodeid: str
    reports: tuple[JSONObject, ...] = ()
    warnings: tuple[WarningRecord, ...] = ()
    failure: Failure | None = None
    duration: float = 0.0


# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------


class Runstate(enum.Enum):
    """Where a :class:`WorkerClient` is in its lifecycle."""

    NEW = "new"
    READY = "ready"
    RUNNING = "running"
    DEAD = "dead"
    CLOSED = "closed"


class WorkerTransport(Protocol):
    """A duplex line pipe to one worker process; contract in the module docstring."""

    def send(self, data: bytes) -> None: ...

    def recv_line(self, timeout: float) -> bytes | None: ...

    def wait(self, timeout: float) -> int | None: ...

    def interrupt(self) -> None: ...

    def kill(self) -> None: ...

    def stderr_tail(self) -> str: ...


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker connection lost"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker crashed (killed by {name})"
    return f"worker crashed (exit code {code})"


class _LinkDown(Exception):
    """The transport reported the worker gone (internal)."""


class WorkerClient:
    """Drives one worker over a :class:`WorkerTransport`.

    Every method bounds its wait.  ``run`` returns a :class:`RunOutcome` even
    when the test crashed or hung the worker (the worker is then killed and
    the client is DEAD); it raises ``ProtocolError`` when the worker sent
    something malformed (again leaving it killed) and ``AgentError`` when
    called on a worker that is not READY.
    """

    def __init__(self, transport: WorkerTransport, *, max_line: int = MAX_WORKER_LINE) -> None:
        self._transport = transport
        self._max_line = max_line
        self._state = Runstate.NEW
        self._collected: Collected | None = None
        self._received = 0
        #: Answers the worker's mid-run queries: ``(kind, args) -> JSON data``; raise
        #: a GondolinError to send an error answer.
        self.on_query: Callable[[str, JSONObject], Any] | None = None

    @property
    def state(self) -> Runstate:
        return self._state

    @property
    def collected(self) -> Collected | None:
        """What ``start`` returned, once it has."""
        return self._collected

    # -- plumbing -----------------------------------------------------------

    def _require(self, *states: Runstate) -> None:
        if self._state not in states:
            raise AgentError(f"test worker is {self._state.value}, not {states[0].value}")

    def _send(self, message: JSONObject) -> None:
        line = encode_line(message)
        if len(line) > MAX_COMMAND_LINE:
            raise ProtocolError(f"command {message['t']!r} too large ({len(line)} bytes)")
        log.debug("worker <- %.200r", line)
        try:
            self._transport.send(line)
        except (OSError, GondolinError) as exc:
            raise _LinkDown(str(exc)) from exc

    def _recv(self, timeout: float) -> WorkerMessage | None:
        """Next message, ``None`` at EOF; raises TimeoutError, ProtocolError.

        Adds the line's length to ``self._received``.
        """
        try:
            line = self._transport.recv_line(max(timeout, 0.0))
        except TimeoutError:
            raise
        except (OSError, GondolinError) as exc:
            log.debug("worker link failed: %s", exc)
            return None
        if line is None:
            return None
        if not line.endswith(b"\n") and len(line) <= self._max_line:
            log.debug("worker stream ended mid-line after %d bytes", len(line))
            return None
        log.debug("worker -> %.200r", line)
        self._received += len(line)
        return parse_message(line, max_line=self._max_line)

    def _die(self) -> None:
        self._state = Runstate.DEAD
        self._transport.kill()

    def _broken(self, exc: ProtocolError) -> ProtocolError:
        tail = self._transport.stderr_tail()
        self._die()
        if tail.strip():
            return ProtocolError(f"{exc}\nworker stderr (tail):\n{_tail_lines(tail)}")
        return exc

    def _exit_detail(self) -> tuple[int | None, str]:
        try:
            code = self._transport.wait(EXIT_WAIT)
        except (OSError, GondolinError):
            code = None
        tail = self._transport.stderr_tail()
        self._die()
        return code, tail

    # -- public API ---------------------------------------------------------

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> Collected:
        """Wait for the worker to finish collecting; return what it collected.

        Raises ``AgentError`` if the worker exits or does not finish within
        *timeout* (the worker is then killed) and ``ProtocolError`` if its
        first message is not ``collected``.
        """
        self._require(Runstate.NEW)
        try:
            msg = self._recv(timeout)
        except TimeoutError:
            tail = self._transport.stderr_tail()
            self._die()
            raise AgentError(
                f"test worker did not finish collecting within {timeout:g}s\n"
                f"worker stderr (tail):\n{_tail_lines(tail)}"
            ) from None
        except ProtocolError as exc:
            raise self._broken(exc) from exc
        if msg is None:
            code, tail = self._exit_detail()
            raise AgentError(
                f"test worker exited before collecting ({_describe_exit(code)})\n"
                f"worker stderr (tail):\n{_tail_lines(tail)}"
            )
        if not isinstance(msg, Collected):
            raise self._broken(
                ProtocolError(f"expected 'collected' first, got {type(msg).__name__}")
            )
        self._state = Runstate.READY
        self._collected = msg
        return msg

    def ping(self, timeout: float = DEFAULT_PING_TIMEOUT) -> None:
        """Check that the worker answers (used after a VM restore).

        Raises ``AgentError`` (worker killed) when it does not answer in
        time or is gone, ``ProtocolError`` when it answers wrongly.
        """
        self._require(Runstate.READY)
        nonce = secrets.token_hex(8)
        try:
            self._send({"t": "ping", "nonce": nonce})
            msg = self._recv(timeout)
        except (_LinkDown, TimeoutError) as exc:
            self._die()
            raise AgentError(f"test worker did not answer a ping within {timeout:g}s") from exc
        except ProtocolError as exc:
            raise self._broken(exc) from exc
        if msg is None:
            code, tail = self._exit_detail()
            raise AgentError(f"test worker is gone ({_describe_exit(code)})\n{_tail_lines(tail)}")
        if not isinstance(msg, PongMessage) or msg.nonce != nonce:
            raise self._broken(ProtocolError(f"expected pong {nonce}, got {msg!r:.200}"))

    def run(
        self, nodeid: str, *, seed: int, timeout: float, env: Mapping[str, str] | None = None
    ) -> RunOutcome:
        """Run one item in the worker and collect what it reports.

        Returns when the worker says ``done`` (``failure`` is then ``None``
        unless the worker reported an error), or with ``failure`` set when
        the worker died (``"crash"``) or did not finish within *timeout*
        seconds (``"timeout"``: the worker gets SIGUSR1 for a stack dump,
        then is killed).  Reports for any other node id are a protocol
        violation.  ``env`` is merged into the worker's environment before the item runs.
        """
        self._require(Runstate.READY)
        if not isinstance(nodeid, str) or not 0 < len(nodeid) <= MAX_NODEID_CHARS:
            raise ProtocolError(f"refusing to send node id {nodeid!r:.100}")
        started = time.monotonic()
        deadline = started + timeout
        reports: list[JSONObject] = []
        warnings_: list[WarningRecord] = []
        errors: list[str] = []
        messages = 0
        self._received = 0

        def outcome(failure: Failure | None) -> RunOutcome:
            return RunOutcome(
                nodeid=nodeid,
                reports=tuple(reports),
                warnings=tuple(warnings_),
                failure=failure,
                duration=time.monotonic() - started,
            )

        self._state = Runstate.RUNNING
        try:
            command: JSONObject = {"t": "run", "nodeid": nodeid, "seed": int(seed)}
            if env:
                command["env"] = dict(env)
            self._send(command)
            while True:
                try:
                    msg = self._recv(deadline - time.monotonic())
                except TimeoutError:
                    return outcome(self._timed_out(timeout, time.monotonic() - started))
                if msg is None:
                    code, tail = self._exit_detail()
                    return outcome(
                        Failure("crash", _describe_exit(code), tail, time.monotonic() - started)
                    )
                messages += 1
                if messages > MAX_MESSAGES_PER_RUN or self._received > MAX_BYTES_PER_RUN:
                    raise ProtocolError(
                        f"more than {MAX_MESSAGES_PER_RUN} messages or "
                        f"{MAX_BYTES_PER_RUN} bytes in one run"
                    )
                if isinstance(msg, ReportMessage):
                    if msg.nodeid != nodeid:
                        raise ProtocolError(
                            f"report for {msg.nodeid!r:.200} while running {nodeid!r}"
                        )
                    reports.append(msg.data)
                elif isinstance(msg, WarningRecord):
                    if len(warnings_) < MAX_WARNINGS_PER_RUN:
                        warnings_.append(msg)
                    else:
                        log.debug("dropping warning beyond %d for %s", MAX_WARNINGS_PER_RUN, nodeid)
                elif isinstance(msg, ErrorMessage):
                    errors.append(msg.message)
                elif isinstance(msg, QueryMessage):
                    self._answer(msg)
                elif isinstance(msg, DoneMessage):
                    if msg.nodeid != nodeid:
                        raise ProtocolError(
                            f"done for {msg.nodeid!r:.200} while running {nodeid!r}"
                        )
                    self._state = Runstate.READY
                    failure = None
                    if errors:
                        failure = Failure(
                            "error",
                            "the worker could not run this item",
                            "\n".join(errors),
                            time.monotonic() - started,
                        )
                    return outcome(failure)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} during a run")
        except _LinkDown:
            code, tail = self._exit_detail()
            return outcome(Failure("crash", _describe_exit(code), tail, time.monotonic() - started))
        except ProtocolError as exc:
            raise self._broken(exc) from exc

    def _answer(self, query: QueryMessage) -> None:
        """Answer a mid-run query with ``on_query`` (no handler or a failure: an error answer)."""
        answer: JSONObject
        if self.on_query is None:
            answer = {
                "t": "answer",
                "ok": False,
                "error": f"the host answers no {query.kind!r} queries",
            }
        else:
            try:
                answer = {"t": "answer", "ok": True, "data": self.on_query(query.kind, query.args)}
            except GondolinError as exc:
                answer = {"t": "answer", "ok": False, "error": str(exc)}
        self._send(answer)

    def _timed_out(self, timeout: float, elapsed: float) -> Failure:
        before = self._transport.stderr_tail()
        try:
            self._transport.interrupt()
        except (OSError, GondolinError) as exc:  # the contract says it never raises; be sure
            log.debug("interrupting the worker failed: %s", exc)
        dump = _await_quiet(self._transport.stderr_tail, before)
        self._die()
        if dump.startswith(before):
            dump = dump[len(before) :]
        if dump.strip():
            detail = "stack dump of the worker (SIGUSR1):\n" + dump
        else:
            detail = "no stack dump arrived; worker stderr (tail):\n" + _tail_lines(before)
        return Failure("timeout", f"Timeout > {timeout:g}s", detail, elapsed)

    def adopt(self, collected: Collected) -> None:
        """Declare the worker READY with ``collected``: it is a clone (a VM started from a
        snapshot) of a worker that another client started."""
        self._require(Runstate.NEW)
        self._collected = collected
        self._state = Runstate.READY

    def rewind(self) -> None:
        """Declare the worker READY again: its side was restored to a snapshot
        taken right after ``collected`` (a VM restore), whatever happened
        since -- even a run that crashed or timed out.  The transport must
        have dropped any buffered output.  Raises ``AgentError`` if ``start``
        never succeeded or the client was closed.
        """
        if self._collected is None or self._state is Runstate.CLOSED:
            raise AgentError(f"cannot rewind a test worker that is {self._state.value}")
        self._state = Runstate.READY

    def close(self, timeout: float = DEFAULT_QUIT_TIMEOUT) -> None:
        """Ask the worker to quit, then make sure it is gone.  Idempotent."""
        if self._state is Runstate.CLOSED:
            return
        if self._state is Runstate.READY:
            try:
                self._send({"t": "quit"})
                self._transport.wait(timeout)
            except (_LinkDown, OSError, GondolinError) as exc:
                log.debug("worker quit failed: %s", exc)
        self._transport.kill()
        self._state = Runstate.CLOSED

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _await_quiet(read: Callable[[], str], before: str) -> str:
    """Poll *read* until its value changed and then held still, or the grace ends."""
    deadline = time.monotonic() + STACK_DUMP_GRACE
    last, last_change = before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, last_change = now, time.monotonic()
        elif last != before and time.monotonic() - last_change >= _STACK_DUMP_QUIET:
            break
    return last


def _tail_lines(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# a transport over a local subprocess
# --------------------------------------------------------------------------


def worker_command(args: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The argv that starts a worker with pytest arguments *args*."""
    return [python, "-m", WORKER_MODULE, *args]


class SubprocessTransport:
    """:class:`WorkerTransport` over a local child process with pipes.

    The child runs in its own session, so :meth:`kill` also ends whatever
    the tests started.  stdout lines are handed over by a reader thread
    (one line in flight: a worker cannot make the host buffer more than
    about three maximum-size lines); stderr is drained by another thread
    into a tail buffer of ``tail_bytes``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_line: int = MAX_WORKER_LINE,
        tail_bytes: int = STDERR_TAIL_BYTES,
    ) -> None:
        self.argv = list(argv)
        self._max_line = max_line
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        self._lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._eof = False
        self._closing = threading.Event()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(f"cannot start test worker {self.argv[0]!r}: {exc}") from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._read_stdout,
                args=(self._proc.stdout,),
                name="gondolin-worker-out",
                daemon=True,
            ),
            threading.Thread(
                target=self._drain_stderr,
                args=(self._proc.stderr,),
                name="gondolin-worker-err",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        log.debug("started worker pid %d: %s", self._proc.pid, self.argv)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _put(self, item: bytes | None) -> bool:
        while not self._closing.is_set():
            try:
                self._lines.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_stdout(self, stream: IO[bytes]) -> None:
        try:
            while True:
                line = stream.readline(self._max_line + 1)
                if not line:
                    break
                if not self._put(line) or not line.endswith(b"\n"):
                    return  # closing, oversized or cut short: stop reading
        except (OSError, ValueError):
            pass
        finally:
            self._put(None)

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        read = getattr(stream, "read1", stream.read)
        try:
            while chunk := read(65536):
                with self._tail_lock:
                    self._tail += chunk
                    del self._tail[: -self._tail_bytes]
        except (OSError, ValueError):
            pass

    def send(self, data: bytes) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(data)  # OSError (BrokenPipeError) means the worker is gone
        stdin.flush()

    def recv_line(self, timeout: float) -> bytes | None:
        if self._eof:
            return None
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from the worker within {timeout:g}s") from None
        if line is None:
            self._eof = True
        return line

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGUSR1)

    def kill(self) -> None:
        self._closing.set()
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                self._proc.kill()
        try:
            self._proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("test worker pid %d did not die after SIGKILL", self._proc.pid)
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        for thread in self._threads:
            # A grandchild that left the session and holds stderr open keeps
            # the drain thread alive; it is a daemon, so do not wait long.
            thread.join(timeout=0.5)
        if not self._threads[1].is_alive() and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()

    def stderr_tail(self) -> str:
        with self._tail_lock:
            return self._tail.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# replay on the host
# --------------------------------------------------------------------------


class WorkerFailureRepr(TerminalRepr):
    """The longrepr of a report the host made up for a crashed or hung run."""

    def __init__(self, path: str, lineno: int, headline: str, detail: str) -> None:
        self.reprcrash = ReprFileLocation(path, lineno, headline)
        self.headline = headline
        self.detail = detail

    def toterminal(self, tw: TerminalWriter) -> None:
        tw.line(self.headline, red=True, bold=True)
        if self.detail.strip():
            tw.line("")
            for line in self.detail.rstrip("\n").splitlines():
                tw.line(line)


def _deserialize(
    config: pytest.Config, data: JSONObject
) -> pytest.TestReport | pytest.CollectReport:
    # pytest's deserializer mutates nested dicts and raises KeyError /
    # TypeError / AssertionError on shapes it does not know; we validated
    # the shape already, this is the last line of defence.
    try:
        report = config.hook.pytest_report_from_serializable(
            config=config, data=copy.deepcopy(data)
        )
    except Exception as exc:
        raise ProtocolError(f"pytest could not deserialize a worker report: {exc!r:.300}") from exc
    if not isinstance(report, pytest.TestReport | pytest.CollectReport):
        raise ProtocolError("no plugin could deserialize a worker report")
    return report


def _synthetic(
    item: pytest.Item,
    when: Literal["setup", "call", "teardown"],
    failure: Failure | None,
) -> pytest.TestReport:
    now = time.time()
    longrepr = None
    if failure is not None:
        lineno = (item.location[1] or 0) + 1
        longrepr = WorkerFailureRepr(str(item.path), lineno, failure.headline, failure.detail)
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords=dict.fromkeys(item.keywords, 1),
        outcome="passed" if failure is None else "failed",
        longrepr=longrepr,
        when=when,
        duration=failure.duration if failure is not None and when == "call" else 0.0,
        start=now,
        stop=now,
    )


def _fill_in(
    item: pytest.Item, reports: Sequence[pytest.TestReport], failure: Failure
) -> list[pytest.TestReport]:
    """Reports that complete an interrupted run with *failure* in the right phase."""
    # Subtest reports are extra "call" reports; only plain reports say
    # which phases the run got through.
    phases = {r.when: r for r in reports if type(r) is pytest.TestReport}
    if "teardown" in phases:
        return []
    setup = phases.get("setup")
    if "call" in phases or (setup is not None and not setup.passed):
        return [_synthetic(item, "teardown", failure)]
    if setup is None and failure.kind == "error":
        return [_synthetic(item, "setup", failure), _synthetic(item, "teardown", None)]
    made = [] if setup is not None else [_synthetic(item, "setup", None)]
    return [*made, _synthetic(item, "call", failure), _synthetic(item, "teardown", None)]


def _warning_category(name: str) -> type[Warning]:
    module, _, qualname = name.rpartition(".")
    if module == "builtins":
        candidate = getattr(builtins, qualname, None)
        if isinstance(candidate, type) and issubclass(candidate, Warning):
            return candidate
    # Never import what the worker names: stand in a UserWarning subclass
    # that prints under the worker's class name.
    short = qualname.rpartition(".")[2] or "UserWarning"
    return type(
        short, (UserWarning,), {"__module__": module or "builtins", "__qualname__": qualname}
    )


def _replay_warning(item: pytest.Item, record: WarningRecord) -> None:
    category = _warning_category(record.category)
    message = warnings.WarningMessage(
        category(record.message), category, record.filename, record.lineno
    )
    item.config.hook.pytest_warning_recorded.call_historic(
        kwargs={
            "warning_message": message,
            "when": "runtest",
            "nodeid": item.nodeid,
            "location": None,
        }
    )


#: Attribute set to True on reports that ran in a guest (serialized by xdist like any other).
GUEST_REPORT_ATTR = "gondolin_guest"


def replay_item(item: pytest.Item, outcome: RunOutcome | Failure) -> None:
    """Report *outcome* for *item* through the host's hooks, as if it ran here.

    Calls ``pytest_runtest_logstart``, then ``pytest_runtest_logreport`` for
    each report (deserialized with ``pytest_report_from_serializable``, its
    location set to the host item's), then the reports that stand in for
    phases a crash or timeout cut off, ``pytest_warning_recorded`` for each
    warning, and ``pytest_runtest_logfinish``.  Failures are counted by the
    session as usual, so ``-x``/``--maxfail`` stop the host's loop.  A bare
    :class:`Failure` means the item never ran.  Never raises for bad report
    data: an unreadable report turns into a failure of kind ``"error"``.
    """
    if isinstance(outcome, Failure):
        outcome = RunOutcome(nodeid=item.nodeid, failure=outcome, duration=outcome.duration)
    if outcome.nodeid != item.nodeid:
        raise ValueError(f"outcome for {outcome.nodeid!r} replayed for {item.nodeid!r}")
    config = item.config
    failure = outcome.failure
    reports: list[pytest.TestReport] = []
    for data in outcome.reports:
        try:
            report = _deserialize(config, data)
            if not isinstance(report, pytest.TestReport) or report.nodeid != item.nodeid:
                raise ProtocolError(
                    f"report for {report.nodeid!r:.200} replayed for {item.nodeid!r}"
                )
        except ProtocolError as exc:
            log.warning("dropping a worker report for %s: %s", item.nodeid, exc)
            if failure is None:
                failure = Failure("error", "the worker sent an unreadable report", str(exc))
            continue
        report.location = item.location
        setattr(report, GUEST_REPORT_ATTR, True)  # for the verbose "(in guest)" status
        reports.append(report)
    extra: list[pytest.TestReport] = []
    late: Failure | None = None
    if failure is not None:
        extra = _fill_in(item, reports, failure)
        if not extra:
            late = failure
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in (*reports, *extra):
        ihook.pytest_runtest_logreport(report=report)
    for record in outcome.warnings:
        _replay_warning(item, record)
    if late is not None:
        # Every phase reported, yet the run did not end cleanly: say so
        # without inventing a second teardown report.
        _replay_warning(
            item,
            WarningRecord(
                f"{late.headline} after the test finished\n{late.detail}".rstrip(),
                "pytest.PytestWarning",
                item.nodeid,
                str(item.path),
                (item.location[1] or 0) + 1,
            ),
        )
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


@dataclass
class _SeenCollectErrors:
    keys: set[str] = field(default_factory=set)


_SEEN_COLLECT_ERRORS = pytest.StashKey[_SeenCollectErrors]()


def replay_collect_errors(config: pytest.Config, collected: Collected) -> int:
    """Report the worker's collection errors on the host, each at most once per session.

    A worker restarted after a crash collects again and repeats its errors;
    they are shown once.  Returns how many were reported now.
    """
    seen = config.stash.setdefault(_SEEN_COLLECT_ERRORS, _SeenCollectErrors()).keys
    count = 0
    for data in collected.errors:
        try:
            report = _deserialize(config, data)
        except ProtocolError as exc:
            log.warning("dropping a worker collect report: %s", exc)
            continue
        key = f"{report.nodeid}\0{report.longrepr}"
        if key in seen:
            continue
        seen.add(key)
        config.hook.pytest_collectreport(report=report)
        count += 1
    return count


def worker_args(config: pytest.Config) -> list[str]:
    """pytest arguments that make a worker's session match the host's.

    Names the host's rootdir, inifile (``-c /dev/null`` when there is none,
    so the worker does not find one of its own) and conftest boundary
    explicitly, and repeats
    the command-line options that change how reports look or which plugins
    and conftests load: ``-p``, ``-o``, ``-W``, ``--tb``, ``-l``, verbosity,
    ``--import-mode``, ``--assert``, ``--noconftest``, ``--strict-markers``.
    Selection options (``-k``, ``-m``, ``--lf``, ``-x``) and reporting
    options (``--junitxml``) stay on the host.  The caller appends what to
    collect (files or node ids).
    """
    option = config.option
    args = [f"--rootdir={config.rootpath}", "-c", str(config.inipath or os.devnull)]
    # pytest stops looking for conftest.py files at the inifile's directory,
    # or at the rootdir when there is none; with "-c /dev/null" it would
    # stop at /dev, i.e. nowhere, so name the host's boundary explicitly.
    confcutdir = getattr(option, "confcutdir", None)
    if confcutdir is None and config.inipath is None:
        confcutdir = config.rootpath
    if confcutdir is not None:
        args.append(f"--confcutdir={confcutdir}")
    for plugin in getattr(option, "plugins", None) or []:
        args += ["-p", plugin]
    for override in getattr(option, "override_ini", None) or []:
        args += ["-o", override]
    for spec in getattr(option, "pythonwarnings", None) or []:
        args += ["-W", spec]
    tbstyle = getattr(option, "tbstyle", "auto")
    if tbstyle and tbstyle != "auto":
        args.append(f"--tb={tbstyle}")
    if getattr(option, "showlocals", False):
        args.append("-l")
    verbose = int(getattr(option, "verbose", 0) or 0)
    if verbose:
        args.append("-" + ("v" * verbose if verbose > 0 else "q" * -verbose))
    importmode = getattr(option, "importmode", None)
    if importmode:
        args.append(f"--import-mode={importmode}")
    if getattr(option, "assertmode", "rewrite") != "rewrite":
        args.append(f"--assert={option.assertmode}")
    if getattr(option, "noconftest", False):
        args.append("--noconftest")
    if getattr(option, "strict_markers", False):
        args.append("--strict-markers")
    return args
