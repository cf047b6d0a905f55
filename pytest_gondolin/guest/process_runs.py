"""The worker's ``process``-mode runs: each test in a prepared fork, the checks after it off its path.

A ``run`` command whose environment sets :data:`~.isolation.ISOLATION_ENV`
to ``"process"`` goes to :meth:`ProcessRuns.run`::

    worker                                   test process (forked after the previous run,
                                             already in its namespaces and new root)
    run ──order (pipe)──────────────────────▶ env, seed, the item's protocol:
                                               report*, ... then "done" itself; _exit(0)
    waitpid; if it died first: error, done
    kernel checks (guest/isolation.py)
    {"t": "settled", "reason": str}          empty reason: clean; else why the VM must be restored
    clean: fork the next test process now (prepare), while the host runs its next test elsewhere

The host's run ends at ``done``; it reads ``settled`` before it gives that VM
another test (``sandbox/isolation.py``), so the exit, the checks and the next
fork happen while the host is busy with another VM. Standard library and
pytest only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Final

from pytest_gondolin.guest.isolation import IsolatedRun, Isolation

__all__ = ["SEAL", "SETTLED", "ProcessRuns"]

#: The message type that closes a process-mode run, after ``done``.
SETTLED: Final = "settled"
#: The message type that opens a process-mode run: the key its ``settled`` carries.
#: The test process shares the worker's channel and could write a clean
#: verdict itself; the key is made after it was forked and before it gets its
#: order, so it never holds it, and the host takes only a verdict with it.
SEAL: Final = "seal"

Send = Callable[[dict[str, Any]], None]
#: Runs the item ``nodeid`` with ``seed`` and ``env`` in the test process.
RunItem = Callable[[str, int, dict[str, str]], None]


class ProcessRuns:
    """One worker's process-isolated runs (the :class:`~.isolation.Isolation` is made at the first)."""

    def __init__(self, send: Send, run_item: RunItem) -> None:
        self._send = send
        self._run_item = run_item
        self._isolation: Isolation | None = None

    def run(self, nodeid: str, seed: int, env: dict[str, str]) -> None:
        """Run the item isolated; sends ``seal``, ``done`` (from the test process, or here) and
        ``settled``."""
        order = json.dumps({"nodeid": nodeid, "seed": seed, "env": env}).encode()
        try:
            if self._isolation is None:
                self._isolation = Isolation(self._serve, cwd=os.getcwd())
            self._isolation.prepare()  # the test process is forked before the key is made
            key = os.urandom(16).hex()
            self._send({"t": SEAL, "key": key})
            status = self._isolation.run(order)
        except OSError as exc:
            self._send({"t": "error", "message": f"process isolation failed: {exc}"})
            self._send({"t": "done", "nodeid": nodeid})
            self._send({"t": SETTLED, "reason": f"process isolation failed: {exc}"})
            return
        if status != 0:  # the test process died before it said done
            self._send({"t": "error", "message": f"{nodeid}: {IsolatedRun(status).describe()}"})
            self._send({"t": "done", "nodeid": nodeid})
        dirty = self._isolation.check()
        self._send({"t": SETTLED, "reason": "; ".join(dirty), "key": key})
        if status == 0 and not dirty:
            try:
                self._isolation.prepare()
            except OSError:
                pass  # the next run forks again, and reports the error

    def abandon(self) -> None:
        """End a prepared test process (a ``vm``-mode run is next in this worker)."""
        if self._isolation is not None:
            self._isolation.abandon()

    def _serve(self, order: bytes) -> None:
        """In the test process: run what ``order`` names, then say ``done``."""
        data = json.loads(order)
        nodeid = str(data["nodeid"])
        self._run_item(nodeid, int(data["seed"]), dict(data["env"]))
        self._send({"t": "done", "nodeid": nodeid})
