"""The worker's lines as messages: parsed and validated, sans-IO, no I/O of any kind.

Everything the worker of :mod:`pytest_gondolin.guest.worker` writes is
hostile input.  :func:`parse_message` takes one line from the worker and
returns one validated message, or raises
:class:`~pytest_gondolin.errors.WorkerProtocolError` -- never anything else,
whatever the line holds.  Nothing here reads, writes, logs or waits.

What one line may cost the host is bounded *before* ``json.loads`` builds
anything (:func:`check_line_shape`, linear and C-speed):

* at most ``MAX_WORKER_LINE`` bytes, ASCII only (the worker escapes every
  other character);
* at most :data:`MAX_JSON_VALUES` JSON values (strings, numbers,
  containers), so the objects built stay around 15 MiB however the bytes
  are spent -- 4 MiB of ``[],`` would otherwise be 1.4 million lists;
* nested at most ``MAX_JSON_DEPTH`` deep (the worker never nests deeper),
  so no check recurses further than that.

Then every field is type- and range-checked (:mod:`.json_checks`), and
serialized reports go through :mod:`.report_checks`, which also bounds
what the host keeps of them.  What one *run* of messages adds up to is
:mod:`.outcome`'s business.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.guest.debugger import CHUNK as PDB_CHUNK
from pytest_gondolin.guest.worker import MAX_JSON_DEPTH, MAX_WORKER_LINE
from pytest_gondolin.sandbox.coverage import CoverageMessage, parse_coverage
from pytest_gondolin.sandbox.json_checks import (
    JSONObject,
    Keep,
    bad_message,
    expect_int,
    expect_list,
    expect_str,
)
from pytest_gondolin.sandbox.report_checks import (
    MAX_NODEID_CHARS,
    check_collect_report,
    check_test_report,
)

__all__ = [
    "MAX_COLLECTED_ITEMS",
    "MAX_CONFIGURED_READS",
    "MAX_JSON_VALUES",
    "MAX_OUTPUT_CHARS",
    "Collected",
    "Configured",
    "DoneMessage",
    "ErrorMessage",
    "OutputMessage",
    "PdbEnd",
    "PdbOutput",
    "PdbRead",
    "PongMessage",
    "QueryMessage",
    "ReportMessage",
    "SealMessage",
    "WarningRecord",
    "WorkerMessage",
    "check_line_shape",
    "parse_message",
]

#: Most items a worker may report as collected.
MAX_COLLECTED_ITEMS: Final = 1_000_000
#: Most JSON values (strings, numbers, literals, containers) in one line.  A
#: real report has hundreds to a few thousand; 200k built values take about
#: 15 MiB of host memory whichever kind they are.
MAX_JSON_VALUES: Final = 200_000

_CATEGORY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,31}")
_MAX_FILENAME_CHARS: Final = 4096
#: Most paths a ``configured`` line lists (``guest/configured.py``: ``MAX_READS``).
MAX_CONFIGURED_READS: Final = 4096
_MAX_NONCE_CHARS: Final = 256
#: Longest ``data`` of one ``output`` message: the worker sends at most
#: ``guest.live.CHUNK`` (64 KiB) decoded, plus a truncation note.
MAX_OUTPUT_CHARS: Final = 65 * 1024
OUTPUT_STREAMS: Final = frozenset({"stdout", "stderr"})


# --------------------------------------------------------------------------
# messages (sans-IO)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Collected:
    """The worker finished collecting: its item ids and failed collect reports."""

    nodeids: tuple[str, ...]
    errors: tuple[JSONObject, ...] = ()


@dataclass(frozen=True)
class Configured:
    """The worker is configured and waits for ``collect`` (``guest/configured.py``).

    ``read``: the absolute paths it read while configuring, outside the
    interpreter's and the distributions' folders; None: too many to list.
    """

    read: tuple[str, ...] | None


@dataclass(frozen=True)
class ReportMessage:
    """One validated serialized TestReport (tuples restored, size bounded).

    ``kept`` estimates the bytes of host memory ``data`` holds, for the
    per-test budget of :class:`~.outcome.RunTally`.
    """

    data: JSONObject
    kept: int = 0

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
class OutputMessage:
    """What the running test wrote, sent live (``-s``, ``--setup-show``; guest/live.py).

    ``data`` is at most :data:`MAX_OUTPUT_CHARS` characters, as the guest
    sent it: showing it safely is the client's business.
    """

    stream: str  # "stdout" or "stderr"
    data: str


@dataclass(frozen=True)
class PdbOutput:
    """What pdb, in the guest, writes to the host's terminal (``--pdb``; guest/debugger.py).

    ``data`` is at most the guest's chunk (16 KiB) of characters, as sent:
    showing it safely is the host's business.
    """

    data: str


@dataclass(frozen=True)
class PdbRead:
    """pdb, in the guest, waits for a line from the host's terminal."""


@dataclass(frozen=True)
class PdbEnd:
    """pdb's post-mortem in the guest is over; ``quit``: the user quit it."""

    quit: bool


@dataclass(frozen=True)
class PongMessage:
    """Answer to a ping."""

    nonce: str


@dataclass(frozen=True)
class SealMessage:
    """A ``process`` run's first message: the key its verdict must carry (guest/process_runs.py)."""

    key: str


WorkerMessage: TypeAlias = (
    Collected
    | Configured
    | ReportMessage
    | WarningRecord
    | ErrorMessage
    | DoneMessage
    | PongMessage
    | SealMessage
    | QueryMessage
    | CoverageMessage
    | OutputMessage
    | PdbOutput
    | PdbRead
    | PdbEnd
)


# --------------------------------------------------------------------------
# the line, before json.loads
# --------------------------------------------------------------------------

#: JSON's two escapes that can hide a quote from a naive scan; removed first.
_ESCAPED_BACKSLASH: Final = b"\\\\"
_ESCAPED_QUOTE: Final = b'\\"'
#: A string, once no escaped quote is left in the text.
_STRING: Final = re.compile(rb'"[^"]*"')
#: Keeps only the brackets, with objects folded into arrays (depth is depth).
_BRACKETS: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")
#: ``\\uD800``-``\\uDFFF``: the only way a lone surrogate gets into an ASCII line.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


def check_line_shape(
    line: bytes, *, max_values: int = MAX_JSON_VALUES, max_depth: int = MAX_JSON_DEPTH
) -> None:
    """Raise ``WorkerProtocolError`` unless *line* could parse to at most *max_values*
    JSON values nested at most *max_depth* deep.

    Looks at bytes only, never builds a JSON value: every step is a C-level
    pass over at most the line (``count``, ``replace``, one regex without
    backtracking, ``translate``), and the depth check runs on the brackets
    alone, at most *max_depth* passes over at most *max_values* bytes.
    For valid JSON the value count is an upper bound (within a factor of
    three) on what ``json.loads`` builds and the depth is exact; for
    invalid JSON ``json.loads`` stops at its first error, before anything
    this check did not count.
    """
    plain = line.replace(_ESCAPED_BACKSLASH, b"").replace(_ESCAPED_QUOTE, b"")
    strings = plain.count(b'"') // 2
    if strings > max_values:
        raise WorkerProtocolError(
            f"worker sent a line with over {max_values} JSON values (strings)"
        )
    structure = _STRING.sub(b"", plain)
    if b'"' in structure:
        raise WorkerProtocolError("worker sent a line that is not JSON: unterminated string")
    # Outside strings, a value is a container or a scalar, and every scalar
    # is the first item of a container, follows a "," or is the whole line.
    containers = structure.count(b"[") + structure.count(b"{")
    values = strings + 2 * containers + structure.count(b",") + 1
    if values > max_values:
        raise WorkerProtocolError(
            f"worker sent a line with over {max_values} JSON values ({values})"
        )
    # Each pass removes the innermost level of every nest ("[]" pairs); what
    # is left after max_depth passes is nested deeper (or unbalanced).
    brackets = structure.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return
        brackets = brackets.replace(b"[]", b"")
    if brackets:
        raise WorkerProtocolError(
            f"worker sent a line nested deeper than {max_depth} (or unbalanced)"
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # "1e400" parses to inf
        raise ValueError(f"number {text[:30]} is not finite")
    return number


def _fix_text(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _replace_surrogates(obj: Any) -> Any:
    """*obj* (parsed JSON) with lone surrogates replaced by ``?``, in place.

    ``json.loads`` turns ``"\\ud800"`` into a lone surrogate that no terminal
    or XML writer can encode; replacing it keeps a hostile string from
    crashing the host's reporters later.  Recursion is bounded by
    :func:`check_line_shape`.
    """
    if isinstance(obj, str):
        return _fix_text(obj)
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            obj[i] = _replace_surrogates(value)
    elif isinstance(obj, dict):
        items = [(_fix_text(k), _replace_surrogates(v)) for k, v in obj.items()]
        obj.clear()
        obj.update(items)
    return obj


# --------------------------------------------------------------------------
# message parsers
# --------------------------------------------------------------------------


def _kept_text(value: object, where: str) -> str:
    return Keep().text(value, where)  # one text: at most MAX_KEPT_TEXT


def _parse_collected(msg: JSONObject) -> Collected:
    nodeids = expect_list(msg.get("nodeids"), "collected.nodeids")
    if len(nodeids) > MAX_COLLECTED_ITEMS:
        raise bad_message("collected.nodeids", f"more than {MAX_COLLECTED_ITEMS} items")
    errors = expect_list(msg.get("errors"), "collected.errors")
    keep = Keep()  # the collection errors share one report's budget
    return Collected(
        nodeids=tuple(expect_str(n, "collected.nodeids[]", MAX_NODEID_CHARS) for n in nodeids),
        errors=tuple(
            check_collect_report(e, f"collected.errors[{i}]", keep) for i, e in enumerate(errors)
        ),
    )


def _parse_configured(msg: JSONObject) -> Configured:
    read = msg.get("read")
    if read is None:
        return Configured(None)
    paths = expect_list(read, "configured.read")
    if len(paths) > MAX_CONFIGURED_READS:
        raise bad_message("configured.read", f"more than {MAX_CONFIGURED_READS} paths")
    checked = tuple(expect_str(p, "configured.read[]", _MAX_FILENAME_CHARS) for p in paths)
    for path in checked:
        if not path.startswith("/") or "\0" in path:
            raise bad_message("configured.read[]", f"not an absolute path: {path[:100]!r}")
    return Configured(checked)


def _parse_report(msg: JSONObject) -> ReportMessage:
    keep = Keep()
    data = check_test_report(msg.get("data"), keep=keep)
    return ReportMessage(data, keep.used)


def _parse_warning(msg: JSONObject) -> WarningRecord:
    category = expect_str(msg.get("category"), "warning.category", 512)
    if not _CATEGORY.fullmatch(category):
        raise bad_message("warning.category", f"not a dotted class name: {category[:64]!r}")
    return WarningRecord(
        message=_kept_text(msg.get("message"), "warning.message"),
        category=category,
        nodeid=expect_str(msg.get("nodeid"), "warning.nodeid", MAX_NODEID_CHARS),
        filename=expect_str(msg.get("filename"), "warning.filename", _MAX_FILENAME_CHARS),
        lineno=expect_int(msg.get("lineno"), "warning.lineno", 0, 2**31 - 1),
    )


def _parse_error(msg: JSONObject) -> ErrorMessage:
    return ErrorMessage(_kept_text(msg.get("message"), "error.message"))


def _parse_done(msg: JSONObject) -> DoneMessage:
    return DoneMessage(expect_str(msg.get("nodeid"), "done.nodeid", MAX_NODEID_CHARS))


def _parse_query(msg: JSONObject) -> QueryMessage:
    kind = expect_str(msg.get("kind"), "query.kind", 64)
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise bad_message("query.args", f"expected an object, got {type(args).__name__}")
    return QueryMessage(kind, args)


def _parse_output(msg: JSONObject) -> OutputMessage:
    stream = expect_str(msg.get("stream"), "output.stream", 16)
    if stream not in OUTPUT_STREAMS:
        raise bad_message("output.stream", f"expected stdout or stderr, got {stream!r}")
    return OutputMessage(stream, expect_str(msg.get("data"), "output.data", MAX_OUTPUT_CHARS))


def _parse_pdb_output(msg: JSONObject) -> PdbOutput:
    return PdbOutput(expect_str(msg.get("data"), "pdb_output.data", PDB_CHUNK))


def _parse_pdb_read(msg: JSONObject) -> PdbRead:
    return PdbRead()


def _parse_pdb_end(msg: JSONObject) -> PdbEnd:
    quit = msg.get("quit")
    if not isinstance(quit, bool):
        raise bad_message("pdb_end.quit", f"expected a boolean, got {type(quit).__name__}")
    return PdbEnd(quit)


def _parse_pong(msg: JSONObject) -> PongMessage:
    return PongMessage(expect_str(msg.get("nonce"), "pong.nonce", _MAX_NONCE_CHARS))


def _parse_seal(msg: JSONObject) -> SealMessage:
    return SealMessage(expect_str(msg.get("key"), "seal.key", _MAX_NONCE_CHARS))


_PARSERS: Final[Mapping[str, Callable[[JSONObject], WorkerMessage]]] = {
    "collected": _parse_collected,
    "configured": _parse_configured,
    "report": _parse_report,
    "warning": _parse_warning,
    "error": _parse_error,
    "done": _parse_done,
    "pong": _parse_pong,
    "seal": _parse_seal,
    "query": _parse_query,
    "coverage": parse_coverage,
    "output": _parse_output,
    "pdb_output": _parse_pdb_output,
    "pdb_read": _parse_pdb_read,
    "pdb_end": _parse_pdb_end,
}


def parse_message(line: bytes, *, max_line: int = MAX_WORKER_LINE) -> WorkerMessage:
    """Parse one line from the worker (with or without its ``b"\\n"``).

    Returns a validated message; raises ``WorkerProtocolError`` for anything else
    (oversized, not ASCII JSON, too many values or too deep, not an object,
    unknown type, wrong field types or ranges, a report whose shape pytest
    would not produce).  Never raises anything but ``WorkerProtocolError``: a
    check that trips over input nobody foresaw (``OverflowError``,
    ``RecursionError``, ...) is reported as one too.
    """
    if len(line) > max_line:
        raise WorkerProtocolError(f"worker sent a line of {len(line)} bytes (limit {max_line})")
    if not line.isascii():
        raise WorkerProtocolError(
            "worker sent a line that is not ASCII (the worker escapes all else)"
        )
    try:
        check_line_shape(line)
        obj = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
        if not isinstance(obj, dict):
            raise bad_message("message", f"expected an object, got {type(obj).__name__}")
        if _SURROGATE_ESCAPE.search(line):
            _replace_surrogates(obj)
        kind = obj.get("t")
        parser = _PARSERS.get(kind) if isinstance(kind, str) else None
        if parser is None:
            raise bad_message("message", f"unknown type {str(kind)[:50]!r}")
        return parser(obj)
    except WorkerProtocolError:
        raise
    except ValueError as exc:  # json.JSONDecodeError, too many digits, not finite
        raise WorkerProtocolError(f"worker sent a line that is not JSON: {str(exc)[:200]}") from exc
    except Exception as exc:
        raise WorkerProtocolError(
            f"worker sent a line the host cannot check ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
