"""``http_traffic`` inside a sandboxed test: the test's own traffic, read from the host.

The recorder lives on the host (it sees the guest's network from outside);
each read asks the host for the current list over the worker's channel, so
assertions see exchanges made a moment ago by any program in the guest.
Runs in the guest: imports only the stdlib-only parts of the package.
"""

from __future__ import annotations

import base64
import json as _json
from typing import Any

from pytest_gondolin.guest.worker import host_query
from pytest_gondolin.netpolicy.recorder import Exchange, Recorder, exchange_from_dict


class GuestTraffic:
    """The read API of the host's recorder (``requests``, ``get_requests``,
    ``assert_request_made``) plus ``stub`` and ``clear``, for this test's traffic."""

    def _snapshot(self) -> Recorder:
        data = host_query("http", {"op": "list"})
        recorder = Recorder()
        for item in data or []:
            recorder.record(exchange_from_dict(item))
        return recorder

    @property
    def requests(self) -> list[Exchange]:
        return self._snapshot().requests

    def get_requests(self, **match: Any) -> list[Exchange]:
        return self._snapshot().get_requests(**match)

    def assert_request_made(self, **match: Any) -> list[Exchange]:
        return self._snapshot().assert_request_made(**match)

    def stub(
        self,
        method: str,
        url: str,
        status: int = 200,
        body: bytes | str = b"",
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = body.encode() if isinstance(body, str) else bytes(body)
        host_query(
            "http",
            {
                "op": "stub",
                "method": method,
                "url": url,
                "status": status,
                "body": base64.b64encode(raw).decode(),
                "json": None if json is None else _json.dumps(json),
                "headers": dict(headers or {}),
            },
        )

    def clear(self) -> None:
        host_query("http", {"op": "clear"})
