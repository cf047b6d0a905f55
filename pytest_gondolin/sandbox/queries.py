"""Answers to what a running sandboxed test asks the host: its ``http_traffic``.

The guest's ``http_traffic`` fixture (:mod:`pytest_gondolin.guest.traffic`)
sends ``query`` lines; :func:`answer_query` answers them from the
recorder of the VM the test runs in. The arguments come from the guest
and are hostile: the answer is JSON data, or a
:class:`~pytest_gondolin.errors.GondolinError` that becomes an error answer
for the guest -- never any other exception, which would escape into pytest
as an internal error and end the host session.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from pytest_gondolin.errors import ConfigError, NetworkPolicyError, WorkerProtocolError
from pytest_gondolin.sandbox.messages import check_line_shape

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.recorder import Recorder

__all__ = ["MAX_STUB_JSON_BYTES", "MAX_STUB_JSON_VALUES", "answer_query"]

#: A stub's ``json=`` as the guest sends it (JSON text): its size, and the
#: values it may build, checked on the bytes before ``json.loads`` (as for
#: the worker's own lines), so one query cannot make the host build a huge
#: object. A stub's body is capped by the recorder after serialisation too.
MAX_STUB_JSON_BYTES = 1024 * 1024
MAX_STUB_JSON_VALUES = 50_000


def answer_query(recorder: Recorder | None, kind: str, args: dict[str, Any]) -> Any:
    """Answer one ``(kind, args)`` query about the traffic ``recorder`` holds."""
    if kind != "http":
        raise ConfigError(f"unknown query {kind!r}")
    if recorder is None:
        raise NetworkPolicyError("this VM has no network recorder")
    op = args.get("op")
    if op == "list":
        return [exchange.to_dict() for exchange in recorder.requests]
    if op == "clear":
        recorder.clear()
        return None
    if op == "stub":
        try:
            body = base64.b64decode(str(args.get("body", "")), validate=True)
            payload = _stub_json(args.get("json"))
            recorder.stub_from_guest(
                str(args["method"]),
                str(args["url"]),
                status=int(args.get("status", 200)),
                body=body,
                json=payload,
                headers=dict(args.get("headers") or {}),
            )
        # RecursionError: a deeply nested json= (the guest chooses it) must
        # fail this query, not escape into pytest as an internal error.
        except (KeyError, TypeError, ValueError, RecursionError, WorkerProtocolError) as exc:
            raise ConfigError(f"bad stub from the guest: {str(exc)[:200]}") from exc
        return None
    raise ConfigError(f"unknown http query op {op!r}")


def _stub_json(text: Any) -> Any:
    """The guest's ``json=`` text as a value, after its size and shape are checked."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError("json= must be JSON text")
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_STUB_JSON_BYTES:
        raise ValueError(f"json= is {len(raw)} bytes; at most {MAX_STUB_JSON_BYTES}")
    check_line_shape(raw, max_values=MAX_STUB_JSON_VALUES)
    return json.loads(text)
