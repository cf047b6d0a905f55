"""A timed-out run's failure, with the worker's stack dump when it gives one.

When a run outlives its timeout, the host asks the worker for every
thread's stack (``SIGUSR1``: the worker's ``faulthandler``, see
``guest/worker.py``), waits for its stderr to grow and then hold still
(at most :data:`STACK_DUMP_GRACE`), and puts what was added in the failure.
A guest that stopped reading its channel never takes the request: the wait
for that is bounded by the test's own timeout (red team round 3), and a
dump that was never asked for is not waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from pytest_gondolin.errors import GondolinError
from pytest_gondolin.logtail import tail_lines
from pytest_gondolin.sandbox.outcome import Failure
from pytest_gondolin.sandbox.worker_transport import WorkerTransport

__all__ = ["STACK_DUMP_GRACE", "timed_out"]

#: After SIGUSR1, faulthandler writes the dump at once; this bounds how long
#: we wait for it to stop growing before killing the worker.
STACK_DUMP_GRACE: Final = 2.0
#: The dump is considered complete once stderr has been quiet this long.
_STACK_DUMP_QUIET: Final = 0.2
#: Lines of the worker's stderr quoted when no dump came.
STDERR_TAIL_LINES: Final = 60


def timed_out(transport: WorkerTransport, timeout: float, elapsed: float) -> Failure:
    """The ``timeout`` failure of a run that took longer than ``timeout`` (the caller kills it)."""
    before = transport.stderr_tail()
    try:
        refused = transport.interrupt(timeout)
    except (OSError, GondolinError) as exc:  # the contract says it never raises; be sure
        refused = f"interrupting the worker failed: {exc}"
    dump = before if refused else _await_quiet(transport.stderr_tail, before)
    if dump.startswith(before):
        dump = dump[len(before) :]
    if dump.strip():
        detail = "stack dump of the worker (SIGUSR1):\n" + dump
    else:
        why = f" ({refused})" if refused else ""
        detail = f"no stack dump arrived{why}; worker stderr (tail):\n" + tail_lines(
            before, STDERR_TAIL_LINES
        )
    return Failure("timeout", f"Timeout > {timeout:g}s", detail, elapsed)


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
