"""Upstream fetches on worker threads, their outcomes handed back to the loop thread.

This module owns :class:`UpstreamPool`: the bounded thread pool the
:class:`~.driver.NetworkDriver` runs :func:`~.http.mediation.run_upstream`
on (at most ``DriverLimits.upstream_workers`` at once, and none while the
guest's unsent output is past ``DriverLimits.max_output_bytes``), and the
queue the outcomes come back through. Each outcome is recorded on the
worker thread before the guest can see it; the loop thread delivers it
(:meth:`UpstreamPool.collect`). The driver owns the loop and the wake-up.
"""

from __future__ import annotations

import logging
import queue
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    UpstreamJob,
    internal_error,
    run_upstream,
)
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.relay import FlowRelay, ProxiedFlow

__all__ = ["UpstreamPool"]

log = logging.getLogger(__name__)


class UpstreamPool:
    """Run the jobs of a :class:`FlowRelay` upstream; give their outcomes back to it.

    :meth:`dispatch` and :meth:`collect` run on the loop thread; ``wake``
    interrupts the loop's wait once an outcome is queued. After
    :meth:`close`, no outcome is delivered and upgraded sockets they hold
    are closed.
    """

    def __init__(
        self,
        *,
        limits: DriverLimits,
        counters: Counter[str],
        wake: Callable[[], None],
        name: str,
    ) -> None:
        self.limits = limits
        self.name = name
        self._counters = counters
        self._wake = wake
        self._in_flight = 0
        self._closed = False
        self._results: queue.SimpleQueue[tuple[ProxiedFlow, Mediated]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(
            max_workers=limits.upstream_workers,
            thread_name_prefix=f"gondolin-upstream-{name}",
        )

    def dispatch(self, relay: FlowRelay) -> None:
        """Start the relay's waiting jobs, as far as the worker and output bounds allow."""
        limits = self.limits
        while relay.has_jobs and self._in_flight < limits.upstream_workers:
            if relay.output_backlog() >= limits.max_output_bytes:
                self._counters["jobs-held-backlog"] += 1
                return
            taken = relay.take_job()
            if taken is None:
                continue  # the guest gave up on this flow while it waited
            flow, job = taken
            self._in_flight += 1
            try:
                self._pool.submit(self._work, flow, job)
            except RuntimeError:  # the pool is shutting down
                self._in_flight -= 1
                return

    def collect(self, relay: FlowRelay) -> None:
        """Deliver every outcome that came back to ``relay``."""
        while True:
            try:
                flow, outcome = self._results.get_nowait()
            except queue.Empty:
                break
            self._in_flight = max(0, self._in_flight - 1)
            relay.deliver(flow, outcome)

    def close(self) -> None:
        """Cancel jobs not started; drop outcomes nobody will deliver. Idempotent."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._discard()  # fetches still running discard their own (see _work)

    def _work(self, flow: ProxiedFlow, job: UpstreamJob) -> None:
        """Worker thread: fetch upstream, record, hand the outcome back to the loop."""
        try:
            outcome = run_upstream(job, timeout=self.limits.upstream_timeout)
        except Exception as exc:  # run_upstream maps I/O errors; this guards against bugs
            log.exception("%s: upstream fetch failed unexpectedly", self.name)
            outcome = internal_error(job, exc)
        # Record before the guest can see the response: a test that reads
        # vm.http right after its guest command returns must find it.
        try:
            job.context.recorder.record(outcome.exchange)
        finally:
            self._results.put((flow, outcome))
            self._wake()
            if self._closed:
                # Put, then check: close() drains after setting _closed, so
                # either it or this sees the result; no upgraded socket stays open.
                self._discard()

    def _discard(self) -> None:
        """Drop results nobody will deliver, closing WebSocket connections they hold."""
        while True:
            try:
                _flow, outcome = self._results.get_nowait()
            except queue.Empty:
                return
            if outcome.upgraded is not None:
                outcome.upgraded.close()
