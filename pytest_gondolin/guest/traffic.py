"""``http_traffic`` inside a sandboxed test: the test's own traffic, read from the host.

The recorder lives on the host (it sees the guest's network from outside);
each read asks the host for the current list over the worker's channel, so
assertions see exchanges made a moment ago by any program in the guest.
One read per call: a filter and its failure message see the same list.
Runs in the guest: imports only the standard library and
:mod:`pytest_gondolin.guest`.
"""

from __future__ import annotations

import base64
import json as _json
from typing import Any

from pytest_gondolin.guest import recording
from pytest_gondolin.guest.hostquery import host_query
from pytest_gondolin.guest.recording import Exchange, UrlFilter, exchange_from_dict


class GuestTraffic:
    """The read API of the host's recorder (``requests``, ``get_requests``,
    ``assert_request_made``) plus ``stub`` and ``clear``, for this test's traffic."""

    def _snapshot(self) -> list[Exchange]:
        data = host_query("http", {"op": "list"})
        return [exchange_from_dict(item) for item in data or []]

    @property
    def requests(self) -> list[Exchange]:
        return self._snapshot()

    def get_requests(
        self,
        method: str | None = None,
        url: UrlFilter = None,
        host: str | None = None,
        path: UrlFilter = None,
    ) -> list[Exchange]:
        return recording.get_requests(self._snapshot(), method, url, host, path)

    def assert_request_made(
        self,
        method: str | None = None,
        url: UrlFilter = None,
        host: str | None = None,
        path: UrlFilter = None,
        count: int | None = 1,
    ) -> list[Exchange]:
        return recording.assert_request_made(self._snapshot(), method, url, host, path, count)

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
