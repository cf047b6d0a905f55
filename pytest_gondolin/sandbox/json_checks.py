"""Typed, bounded reads of parsed JSON from the worker, and the host-memory budget.

Sans-IO: a parsed JSON value in, the value checked (or
:class:`~pytest_gondolin.errors.WorkerProtocolError`) out.  Every message
parser (:mod:`.messages`) and the report checks (:mod:`.report_checks`)
read the worker's fields through these helpers, so a wrong type or range
always fails the same way, naming where it was.

:class:`Keep` is what one report may still keep of host memory: the
host's terminal reporter holds every report until the session ends, so
every text and list a report keeps is charged to it, and what does not fit
is cut with a visible ``[... truncated by pytest-gondolin: N ...]`` marker.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeAlias, TypeVar

from pytest_gondolin.errors import WorkerProtocolError

__all__ = [
    "MAX_KEPT_TEXT",
    "MAX_REPORT_KEPT",
    "VALUE_COST",
    "JSONObject",
    "Keep",
    "bad_message",
    "expect",
    "expect_int",
    "expect_keys",
    "expect_list",
    "expect_number",
    "expect_pair",
    "expect_str",
    "expect_triple",
    "truncation_mark",
]

JSONObject: TypeAlias = dict[str, Any]
_T = TypeVar("_T")

#: Most characters the host keeps of any one text from the worker (a captured
#: section, a traceback line, a warning).  The worker already cuts its
#: strings to half this when a report would not fit in a line.
MAX_KEPT_TEXT: Final = 1024 * 1024
#: Estimated bytes of host memory one report may keep (four texts at
#: MAX_KEPT_TEXT: stdout, stderr, log and the traceback of a failure).
MAX_REPORT_KEPT: Final = 4 * 1024 * 1024
#: Estimated cost of one kept non-text value or container (object header,
#: its slot in the parent, a dict entry); rough on purpose, see Keep.
VALUE_COST: Final = 64
#: Longest truncation marker (a 7-digit count): shorter cuts are not made.
_MARK_CHARS: Final = 64


def truncation_mark(count: int, what: str = "characters") -> str:
    """The marker left where the host cut *count* items of worker output."""
    return f"[... truncated by pytest-gondolin: {count} {what}]"


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------


def bad_message(where: str, problem: str) -> WorkerProtocolError:
    """The error for a field at *where* that fails a check."""
    return WorkerProtocolError(f"worker sent a bad message: {where}: {problem}")


def expect(value: object, kind: type | tuple[type, ...], where: str) -> Any:
    """*value* if it is a *kind* (never a bool: no protocol field is one)."""
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise bad_message(where, f"expected {names}, got {type(value).__name__}")
    return value


def expect_str(value: object, where: str, max_chars: int | None = None) -> str:
    text: str = expect(value, str, where)
    if max_chars is not None and len(text) > max_chars:
        raise bad_message(where, f"longer than {max_chars} characters")
    return text


def expect_int(value: object, where: str, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    number: int = expect(value, int, where)
    if not lo <= number <= hi:
        raise bad_message(where, f"{_short(number)} out of range [{lo}, {hi}]")
    return number


def expect_list(value: object, where: str) -> list[Any]:
    items: list[Any] = expect(value, list, where)
    return items


def expect_number(value: object, where: str, hi: float) -> float:
    """An int or float in ``[0, hi]``, as a float."""
    number: int | float = expect(value, (int, float), where)
    # Compare before converting: float(10**400) raises OverflowError.
    if not 0 <= number <= hi:
        raise bad_message(where, f"{_short(number)} out of range [0, {hi:g}]")
    return float(number)


def _short(number: float) -> str:
    # Never format a huge int with "g": that converts it to a float first.
    text = repr(number)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def expect_keys(value: object, keys: frozenset[str], where: str) -> JSONObject:
    """An object with exactly *keys*."""
    obj: JSONObject = expect(value, dict, where)
    if obj.keys() != keys:
        raise bad_message(where, f"keys {sorted(obj)[:20]} are not {sorted(keys)}")
    return obj


def expect_pair(value: object, where: str) -> tuple[Any, Any]:
    items = expect_list(value, where)
    if len(items) != 2:
        raise bad_message(where, "expected a pair")
    return items[0], items[1]


def expect_triple(value: object, where: str) -> list[Any]:
    parts = expect_list(value, where)
    if len(parts) != 3:
        raise bad_message(where, "expected 3 items")
    return parts


# --------------------------------------------------------------------------
# the budget
# --------------------------------------------------------------------------


def _json_cost(value: object) -> int:
    """Estimated bytes *value* (parsed JSON, at most MAX_JSON_DEPTH deep) holds."""
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, list):
        return VALUE_COST + sum(_json_cost(v) for v in value)
    if isinstance(value, dict):
        return VALUE_COST + sum(_json_cost(k) + _json_cost(v) for k, v in value.items())
    return VALUE_COST


class Keep:
    """What one report may still keep of host memory, in estimated bytes.

    Texts are charged by ``sys.getsizeof`` (what the ``str`` really takes),
    other values and containers a flat :data:`VALUE_COST`.  The estimate
    only has to be proportional to the truth: the flood test in
    ``tests/plugin/test_worker_flood.py`` measures real RSS.
    """

    def __init__(self, limit: int = MAX_REPORT_KEPT) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit

    def charge(self, cost: int = VALUE_COST) -> None:
        self.used += cost

    def text(self, value: object, where: str) -> str:
        """*value* as a kept text: a str, cut in the middle to what is left."""
        text: str = expect(value, str, where)
        size = sys.getsizeof(text)
        room = min(MAX_KEPT_TEXT, len(text) * max(self.limit - self.used, 0) // max(size, 1))
        # Cutting fewer characters than the marker adds would only grow it.
        if len(text) - room > _MARK_CHARS:
            cut = len(text) - room
            head = room // 2
            text = f"{text[:head]}{truncation_mark(cut)}{text[len(text) - (room - head) :]}"
            size = sys.getsizeof(text)
        self.used += size
        return text

    def json(self, value: object) -> object:
        """Any JSON *value* (a user property), or its JSON text cut to fit."""
        if isinstance(value, str):
            return self.text(value, "value")
        cost = _json_cost(value)
        if cost <= min(MAX_KEPT_TEXT, self.limit - self.used):
            self.used += cost
            return value
        return self.text(json.dumps(value), "value")

    def bounded(
        self,
        items: Sequence[Any],
        check: Callable[[Any, str], _T],
        where: str,
        marker: Callable[[int], _T] | None,
        *,
        keep_last: bool = False,
    ) -> list[_T]:
        """``check`` each of *items* until the budget runs out; mark what was dropped.

        ``keep_last`` keeps the end of the list (a traceback's innermost
        entries) and puts the marker first.
        """
        order = range(len(items) - 1, -1, -1) if keep_last else range(len(items))
        out: list[_T] = []
        for done, i in enumerate(order):
            if self.exhausted:
                if marker is not None:
                    out.append(marker(len(items) - done))
                break
            self.charge()  # its slot, and the tuple or dict most items become
            out.append(check(items[i], f"{where}[{i}]"))
        if keep_last:
            out.reverse()
        return out
