"""Parse and validate the worker's lines: sans-IO, no I/O of any kind.

Everything the worker of :mod:`pytest_gondolin.guest.worker` writes is
hostile input.  :func:`parse_message` takes one line from the worker and
returns one validated message, or raises
:class:`~pytest_gondolin.errors.ProtocolError`: every line is bounded, every
field is type-checked, serialized reports are checked against the exact
shape pytest produces (:func:`check_test_report`,
:func:`check_collect_report`) before pytest's own deserializer ever sees
them.  Nothing here reads, writes, logs or waits.

The outcome types of a run (:class:`RunOutcome`, :class:`Failure`) live
here too, so that :mod:`pytest_gondolin.runner` (which drives the worker)
and :mod:`pytest_gondolin.replay` (which reports a run on the host) share
them without importing each other.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import pytest

from pytest_gondolin.errors import ProtocolError
from pytest_gondolin.guest.worker import MAX_JSON_DEPTH, MAX_WORKER_LINE

__all__ = [
    "MAX_COLLECTED_ITEMS",
    "MAX_NODEID_CHARS",
    "Collected",
    "DoneMessage",
    "ErrorMessage",
    "Failure",
    "FailureKind",
    "JSONObject",
    "PongMessage",
    "QueryMessage",
    "ReportMessage",
    "RunOutcome",
    "WarningRecord",
    "WorkerMessage",
    "check_collect_report",
    "check_test_report",
    "parse_message",
]

#: Largest node id accepted from or sent to the worker.
MAX_NODEID_CHARS: Final = 64 * 1024
#: Most items a worker may report as collected.
MAX_COLLECTED_ITEMS: Final = 1_000_000

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
