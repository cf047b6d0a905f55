"""The contract a byte pipe to a test worker meets: :class:`WorkerTransport`.

:class:`~.client.WorkerClient` drives a worker through one; the pipes
themselves (a local subprocess, a guest process) are in :mod:`.transports`.

What a transport does
---------------------

``send(data: bytes, timeout: float | None = None) -> None``
    Write *data* (whole protocol lines) to the worker's stdin.  May raise
    ``OSError`` or a ``GondolinError`` when the worker is gone, and
    ``TimeoutError`` when the far side did not take *data* within *timeout*
    seconds (``None``: the transport's own bound).
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
``interrupt(timeout: float) -> str | None``
    Ask the worker for a stack dump (SIGUSR1 to the worker process) within
    about *timeout* seconds (the transport keeps it within its own bounds);
    the dump appears in ``stderr_tail()``.  ``None`` once asked, else why the
    request was not taken (a guest that stopped reading its channel).  Never
    raises.
``kill() -> None``
    End the worker now and release everything.  Idempotent, never raises.
``stderr_tail() -> str``
    The last few KiB of the worker's stderr (what pytest, faulthandler and
    stray prints wrote), decoded leniently.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["WorkerTransport"]


class WorkerTransport(Protocol):
    """A duplex line pipe to one worker process; contract in the module docstring."""

    def send(self, data: bytes, timeout: float | None = None) -> None: ...

    def recv_line(self, timeout: float) -> bytes | None: ...

    def wait(self, timeout: float) -> int | None: ...

    def interrupt(self, timeout: float) -> str | None: ...

    def kill(self) -> None: ...

    def stderr_tail(self) -> str: ...
