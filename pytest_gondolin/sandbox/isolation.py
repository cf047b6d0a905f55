"""The host's side of ``process`` isolation: when a lane's VM must be restored after all.

With ``isolation="process"`` the guest worker forks each test into fresh
namespaces (:mod:`pytest_gondolin.guest.isolation`) and the lane (a VM
holding the collected worker, :mod:`.guest_worker`) goes back to its pool
without a restore. :class:`LaneLedger` owns the rules that fall back to one
(docs/isolation.md, "Fallback"):

* after a ``process`` run that ended abnormally: a crash, a timeout, a test
  process that died or could not be set up (the worker's ``error``);
* after the worker asked for one (the ``gondolin-restore`` query): the test
  changed what namespaces cannot hold (kernel parameters, modules, mounts,
  network links, the clock);
* after ``restore_every`` ``process`` runs in a row on one lane;
* before a ``vm`` run on a lane that ran ``process`` tests since its last
  restore (``vm`` mode promises a VM restored from the snapshot).

A clean ``process`` run's lane is not ready at once: the worker says
``done`` as soon as the test's reports are out, then checks what namespaces
cannot hold and sends its verdict, ``settled`` (``guest/process_runs.py``).
:meth:`LaneLedger.settle` reads it (in the pool's background thread while
another lane runs the next test) and, when it is clean, resets the network
(flows, DNS, recorder) itself, as a restore would (:meth:`LaneLedger.reuse_reset`);
otherwise the pool restores the lane.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from pytest_gondolin.errors import GondolinError, SnapshotError
from pytest_gondolin.guest.isolation import ISOLATION_ENV, RESTORE_QUERY
from pytest_gondolin.guest.process_runs import SETTLED
from pytest_gondolin.sandbox.live_output import safe_host_text
from pytest_gondolin.vm.guest_network import reset_network
from pytest_gondolin.vm.machine import VM

__all__ = [
    "ISOLATION_ENV",
    "MAX_REASON_CHARS",
    "SETTLE_TIMEOUT",
    "UNSEALED",
    "LaneLedger",
    "read_settled",
    "run_env",
]

log = logging.getLogger(__name__)

#: The worker's restore reason is quoted in the log at most this long (it is guest data).
MAX_REASON_CHARS: Final = 300

#: How long the worker gets to send its verdict after ``done`` (the test
#: process's exit and the checks: ~50 ms under TCG; a wedged guest is restored).
SETTLE_TIMEOUT: Final = 30.0
#: Why a verdict without the run's seal is not taken (a forgery by the test process).
UNSEALED: Final = "the verdict does not carry the run's seal (not the worker's)"
#: Live output lines (``-s``) skipped while waiting for the verdict, at most.
_MAX_LINES_BEFORE_SETTLED: Final = 100

QueryHandler = Callable[[str, dict[str, Any]], Any]
RecvLine = Callable[[float], "bytes | None"]


def _log_text(text: str) -> str:
    """Guest text bound for a log line: cut, every unprintable character shown visibly."""
    return safe_host_text(text, max_chars=MAX_REASON_CHARS, one_line=True)


def read_settled(
    recv_line: RecvLine, timeout: float = SETTLE_TIMEOUT, *, seal: str | None
) -> str | None:
    """Read the worker's verdict after a process run's ``done``: None when clean, else why not.

    ``recv_line(timeout)`` is the lane's transport's (a line, None at the end
    of the worker's output, TimeoutError). Anything but a well-formed
    ``settled`` (live output aside) counts as dirty: the lane is restored.
    ``seal`` is the key the run's first message gave (``None``: it sent
    none); a verdict without it could be the test process's own (it shares
    the worker's channel), so it counts as dirty too.
    """
    deadline = time.monotonic() + timeout
    for _ in range(_MAX_LINES_BEFORE_SETTLED):
        try:
            line = recv_line(max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            return f"the worker sent no verdict within {timeout:g} s of the run"
        if line is None:
            return "the worker's output ended after the run"
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            return f"the worker's verdict is not JSON: {_log_text(repr(line[:100]))}"
        kind = msg.get("t") if isinstance(msg, dict) else None
        if kind == "output":
            continue  # what -s showed after done: dropped
        if kind != SETTLED or not isinstance(msg.get("reason"), str):
            return f"expected the worker's verdict, got {_log_text(repr(kind))}"
        if seal is None or msg.get("key") != seal:
            return UNSEALED
        reason: str = msg["reason"]
        return f"the test changed kernel state: {_log_text(reason)}" if reason else None
    return f"more than {_MAX_LINES_BEFORE_SETTLED} lines before the worker's verdict"


def run_env(isolation: str, secret_env: dict[str, str]) -> dict[str, str]:
    """The environment a run command carries: the secrets' placeholders, the isolation mode."""
    if isolation != "process":
        return secret_env
    return {**secret_env, ISOLATION_ENV: "process"}


class LaneLedger:
    """Per lane: ``process`` runs since its VM was last restored, and whether one is due.

    Lanes are any hashable objects (compared by identity). Called from the
    thread that runs tests, except :meth:`restored`, which the pool may call
    from its restore thread (a dict assignment: atomic under the GIL).
    """

    def __init__(self, restore_every: int) -> None:
        if restore_every < 1:
            raise ValueError(f"restore_every must be at least 1, got {restore_every}")
        self.restore_every = restore_every
        self._runs: dict[int, int] = {}
        self._asked: dict[int, str] = {}
        #: How many restores each rule caused (for the bench and the log).
        self.fallbacks: dict[str, int] = {}

    def restored(self, lane: object) -> None:
        """``lane``'s VM was just restored from the snapshot."""
        self._runs[id(lane)] = 0

    def since_restore(self, lane: object) -> int:
        """``process`` runs on ``lane`` since its last restore."""
        return self._runs.get(id(lane), 0)

    def answering(self, lane: object, inner: QueryHandler | None) -> QueryHandler:
        """A query handler for ``lane``'s run: takes the worker's restore request, passes the rest on."""

        def handle(kind: str, args: dict[str, Any]) -> Any:
            if kind == RESTORE_QUERY:
                reason = args.get("reason")
                # Guest data, bound for a log line.
                self._asked[id(lane)] = _log_text(str(reason)) if reason else "asked"
                return None
            if inner is None:
                raise GondolinError(f"the host answers no {kind!r} queries")
            return inner(kind, args)

        return handle

    def after_run(self, lane: object, isolation: str, *, failed: bool) -> str | None:
        """Count the run; return why ``lane`` must be restored now (``None``: it is clean)."""
        asked = self._asked.pop(id(lane), None)
        if isolation != "process":
            return "vm isolation"
        runs = self._runs.get(id(lane), 0) + 1
        self._runs[id(lane)] = runs
        rule, reason = None, None
        if failed:
            rule, reason = "failed", "the run failed (crash, timeout or a dead test process)"
        elif asked is not None:
            rule, reason = "kernel state", f"the test changed kernel state: {asked}"
        elif runs >= self.restore_every:
            rule, reason = "every", f"{runs} process-isolated runs since the last restore"
        if rule is not None:
            self.fallbacks[rule] = self.fallbacks.get(rule, 0) + 1
            log.info("restoring the VM after a process-isolated run: %s", reason)
        return reason

    def settle(self, vm: VM, recv_line: RecvLine, *, seal: str | None) -> bool:
        """After a clean-looking ``process`` run on ``vm``: its verdict, and the network reset.

        True: ``vm`` may run the next ``process`` test as it is. False: it must
        be restored (logged with the reason, counted as a fallback).
        """
        reason = read_settled(recv_line, seal=seal)
        if reason is None:
            try:
                self.reuse_reset(vm)
                return True
            except SnapshotError as exc:
                reason = f"the network did not reset: {exc}"
        rule = "kernel state" if reason.startswith("the test changed kernel state") else "settle"
        self.fallbacks[rule] = self.fallbacks.get(rule, 0) + 1
        log.info("restoring the VM after a process-isolated run: %s", reason)
        return False

    @staticmethod
    def reuse_reset(vm: VM) -> None:
        """Forget the previous test's network (flows, DNS names, recorder) on a VM not restored.

        The guest is paused across the reset, as a restore does (the previous
        test's processes are all gone: their namespace died with them).
        Raises SnapshotError if the network cannot reset.
        """
        if vm.network is None:
            return
        vm.pause()
        try:
            vm.http = reset_network(vm.network, f"{vm.name}: between process-isolated tests")
        finally:
            vm.resume()
