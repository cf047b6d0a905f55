"""Questions a running sandboxed test asks the host (``host_query``).

The worker (:mod:`pytest_gondolin.guest.worker`) makes its protocol channel
the active one for the duration of each run; :func:`host_query` sends a
``query`` line on it and reads the ``answer``. Kept apart from the worker so
that code running inside a test (``http_traffic``) reaches the one active
channel whether the worker was started as ``python -m`` (``__main__``) or
imported. Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


class HostQueryError(Exception):
    """The host could not answer a query (its message says why)."""


class LinePipe(Protocol):
    """What a query needs of the worker's pipe to the host: send one line, read the next."""

    def send(self, message: dict[str, Any]) -> None: ...

    def recv(self) -> dict[str, Any] | None: ...


#: The channel of the item running now (empty between runs).
_ACTIVE: list[LinePipe] = []


@contextlib.contextmanager
def active(channel: LinePipe) -> Iterator[None]:
    """Make ``channel`` the one :func:`host_query` uses while the block runs."""
    _ACTIVE.append(channel)
    try:
        yield
    finally:
        _ACTIVE.remove(channel)


def current() -> LinePipe | None:
    """The channel of the item running now (``None`` between runs)."""
    return _ACTIVE[-1] if _ACTIVE else None


def host_query(kind: str, args: dict[str, Any] | None = None) -> Any:
    """Ask the host something while a test runs (e.g. ``"http"``: its recorded traffic).

    Only inside a sandboxed test run by the worker. Raises HostQueryError
    when the host answers with an error, RuntimeError outside a run.
    """
    if not _ACTIVE:
        raise RuntimeError("host_query() only works inside a test run by the gondolin worker")
    channel = _ACTIVE[-1]
    channel.send({"t": "query", "kind": kind, "args": args or {}})
    reply = channel.recv()
    if reply is None:
        raise HostQueryError("the host went away")
    if reply.get("t") != "answer":
        raise HostQueryError(f"expected an answer from the host, got {reply.get('t')!r}")
    if not reply["ok"]:
        raise HostQueryError(str(reply.get("error", "the host refused the query")))
    return reply.get("data")
