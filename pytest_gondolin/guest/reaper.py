"""The agent's reaper: the one owner of ``waitpid(-1)`` in the guest.

As PID 1 the agent inherits every orphan. Children are never waited for
individually (``subprocess`` would race with the reaper and report bogus
statuses); one reaper thread collects every exit, hands the status of a
registered pid to its callback and discards the rest. Standard library only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: With no children the reaper sleeps; forks wake it, this is only a safety net
#: (long: each wake-up is Python work that also lands in restores under TCG).
REAPER_IDLE_WAIT = 60.0


class Reaper:
    """Owns ``waitpid(-1)``: dispatches exit codes to registered pids, discards orphans."""

    def __init__(self) -> None:
        #: Held across fork+register so a fast-exiting child is never mistaken for an orphan.
        self.lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._wake = threading.Event()

    def register(self, pid: int, callback: Callable[[int], None]) -> None:
        """Register ``callback(returncode)``; the caller must hold :attr:`lock`."""
        self._waiters[pid] = callback
        self._wake.set()

    def run(self) -> None:
        """Reap forever (the body of the reaper thread)."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._wake.wait(REAPER_IDLE_WAIT)
                self._wake.clear()
                continue
            except Exception:
                log.exception("waitpid failed")
                time.sleep(REAPER_IDLE_WAIT)
                continue
            with self.lock:
                callback = self._waiters.pop(pid, None)
            if callback is None:
                log.debug("reaped orphan %d (status %#x)", pid, status)
                continue
            try:
                callback(os.waitstatus_to_exitcode(status))
            except Exception:
                log.exception("exit callback for pid %d failed", pid)
