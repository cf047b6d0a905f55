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

from pytest_gondolin.errors import ConfigError, NetworkPolicyError

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.recorder import Recorder

__all__ = ["answer_query"]


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
            payload = json.loads(args["json"]) if args.get("json") is not None else None
            recorder.stub(
                str(args["method"]),
                str(args["url"]),
                status=int(args.get("status", 200)),
                body=body,
                json=payload,
                headers=dict(args.get("headers") or {}),
            )
        # RecursionError: a deeply nested json= (the guest chooses it) must
        # fail this query, not escape into pytest as an internal error.
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"bad stub from the guest: {str(exc)[:200]}") from exc
        return None
    raise ConfigError(f"unknown http query op {op!r}")
