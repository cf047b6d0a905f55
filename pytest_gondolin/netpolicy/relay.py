"""The flow relay: joins the stack's TCP flows to the HTTP layer's proxies.

:class:`FlowRelay` is the part of a network driver that needs both halves
of ``netpolicy``: it takes the :class:`~.stack.network.NetworkStack`'s flow
events, gives each accepted flow a :class:`~.http.mitm.FlowProxy`, moves
bytes between the two with backpressure both ways, and plans every
request the proxies produce (:func:`~.http.mediation.plan_request`).
What can be answered at once (stub, denial, cassette replay) is answered
here; what must go upstream is queued as an :class:`~.http.mediation.UpstreamJob`
for the driver, which owns the threads that run it and hands the outcome
back with :meth:`FlowRelay.deliver`.

No sockets and no threads (the driver in :mod:`.driver` owns those); the
clock is injected. Guarantees:

* a failure while handling one flow costs that flow (it is reset and
  logged), never the caller;
* guest bytes are read only while the flow's proxy wants them (otherwise
  the guest's TCP window closes), and bytes go to the guest only as fast
  as the stack accepts them (the rest waits for ``FlowWritable``);
* a flow's next request is answered only once its answers waiting for the
  guest are below :data:`ANSWER_BACKLOG` (a guest that pipelines requests
  for a large stub and never reads cannot make the host hold the answers);
* the request bodies all flows hold together are bounded (``body_budget``,
  a :class:`~.http.interceptor.BodyBudget`), and a flow that goes gives its
  share back;
* every exchange is recorded in the recorder current when its request
  arrived, with the guest's own headers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.interceptor import BodyBudget
from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
)
from pytest_gondolin.netpolicy.http.mitm import FlowProxy
from pytest_gondolin.netpolicy.http.recorder import Exchange
from pytest_gondolin.netpolicy.stack.flow_events import (
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowWritable,
    NewFlow,
)
from pytest_gondolin.netpolicy.stack.network import NetworkStack
from pytest_gondolin.netpolicy.stream_tls import GuestTls
from pytest_gondolin.netpolicy.streams import StreamRelay

__all__ = ["ANSWER_BACKLOG", "FlowRelay", "ProxiedFlow"]

log = logging.getLogger(__name__)

#: Rounds of event handling per iteration; handling an event can create
#: more, and this guards against a bug turning that into a spin.
_MAX_EVENT_ROUNDS: Final = 10_000
#: Bytes of a flow's output still waiting for the guest above which its
#: next request waits to be answered: one TCP send buffer's worth, so a
#: guest that reads keeps the pipe full, one that does not holds the host
#: to this plus one answer.
ANSWER_BACKLOG: Final = 256 * 1024


@dataclass(eq=False)
class ProxiedFlow:
    """The relay's state of one accepted flow.

    Identity matters: an upstream outcome comes back with the flow it was
    fetched for, and is dropped unless that very flow is still relayed.
    """

    id: int
    proxy: FlowProxy
    guest_eof: bool = False
    eof_delivered: bool = False
    closing: bool = False  # flow_close was called


class FlowRelay:
    """The flows of one stack and their proxies (see the module docstring).

    ``stack`` is the stack whose events it handles (a new stack needs a
    new relay); ``ca`` issues the TLS leaves; ``context`` returns the
    mediation settings current now (read once per request); ``on_room``
    is called when a flow's output drained, so held upstream jobs may start;
    ``counters`` is shared with the driver; ``body_budget`` bounds the
    request-body bytes all flows hold at once; ``name`` prefixes log lines;
    ``streams`` takes the flows that are raw TCP streams (a ``tcp=`` service
    the guest dials, a ``VM.forward`` connection the host dialled) and
    their events, before any proxy sees them.
    """

    def __init__(
        self,
        stack: NetworkStack,
        *,
        ca: CertificateAuthority,
        context: Callable[[], MediationContext],
        on_room: Callable[[], None],
        counters: Counter[str],
        send_chunk: int,
        body_budget: int,
        name: str,
        streams: StreamRelay | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stack = stack
        self._streams = streams
        self._ca = ca
        self._context = context
        self._on_room = on_room
        self._counters = counters
        self._send_chunk = send_chunk
        self._body_budget = BodyBudget(body_budget)
        self._name = name
        self._clock = clock
        self._flows: dict[int, ProxiedFlow] = {}
        self._jobs: deque[tuple[ProxiedFlow, UpstreamJob]] = deque()

    def __len__(self) -> int:
        """How many flows are relayed."""
        return len(self._flows)

    @property
    def next_deadline(self) -> float | None:
        """The earliest time :meth:`on_timer` has work, or ``None``."""
        deadlines = [d for f in self._flows.values() if (d := f.proxy.deadline) is not None]
        return min(deadlines) if deadlines else None

    @property
    def body_bytes_held(self) -> int:
        """Request-body bytes the flows hold now (at most ``body_budget``)."""
        return self._body_budget.held

    @property
    def has_jobs(self) -> bool:
        """Whether upstream jobs wait for :meth:`take_job`."""
        return bool(self._jobs)

    def take_job(self) -> tuple[ProxiedFlow, UpstreamJob] | None:
        """The oldest waiting job, or ``None`` if its flow is gone (the guest gave up).

        Call only while :attr:`has_jobs`.
        """
        flow, job = self._jobs.popleft()
        return (flow, job) if self._alive(flow) else None

    def process_events(self) -> None:
        """Act on every event the stack has, and on those acting creates."""
        for _ in range(_MAX_EVENT_ROUNDS):
            events = self._stack.events()
            if not events:
                return
            for event in events:
                if isinstance(event, NewFlow):
                    if self._streams is None or not self._streams.claim(event):
                        self._new_flow(event)
                    continue
                flow = self._flows.get(event.flow_id)
                if flow is None:
                    if self._streams is not None:
                        self._streams.on_event(event)
                    continue
                if isinstance(event, FlowClosed):
                    self._forget(flow)
                    log.debug(
                        "%s: flow %d closed (%s)", self._name, event.flow_id, event.reason.value
                    )
                    continue
                self._guarded(flow, self._flow_event, flow, event)
        log.error("%s: event processing did not settle; continuing next iteration", self._name)

    def on_timer(self, now: float) -> None:
        """Run the flows' own timers (sniffing, TLS handshakes) due at ``now``."""
        for flow in list(self._flows.values()):
            deadline = flow.proxy.deadline
            if deadline is not None and now >= deadline:
                self._guarded(flow, self._flow_timeout, flow, now)

    def deliver(self, flow: ProxiedFlow, outcome: Mediated) -> None:
        """Answer the guest with an upstream outcome (already recorded), if its flow lives.

        An exception costs that flow (reset), never the caller.
        """
        self._guarded(flow, self._deliver, flow, outcome)

    def output_backlog(self) -> int:
        """Response bytes waiting, across flows, for the guest to read."""
        return sum(f.proxy.output_bytes for f in self._flows.values())

    # -- per flow ---------------------------------------------------------------

    def _flow_event(self, flow: ProxiedFlow, event: FlowData | FlowEOF | FlowWritable) -> None:
        if isinstance(event, FlowEOF):
            flow.guest_eof = True
            self._pump_input(flow)
        elif isinstance(event, FlowData):
            self._pump_input(flow)
        else:
            self._pump_output(flow)
            if flow.proxy.answer_backlog < ANSWER_BACKLOG:
                self._pump_input(flow)  # answers held back by the backlog may go now
            self._on_room()

    def _new_flow(self, event: NewFlow) -> None:
        proxy = FlowProxy(
            dst_ip=event.dst_ip,
            dst_port=event.dst_port,
            dns_name=event.dns_name,
            ca=self._ca,
            now=self._clock(),
            body_budget=self._body_budget,
        )
        flow = ProxiedFlow(event.flow_id, proxy)
        self._flows[event.flow_id] = flow
        self._counters["flows"] += 1
        log.debug("%s: flow %d to %s:%d", self._name, event.flow_id, proxy.host, event.dst_port)
        # Accept at once: the first bytes (request line / SNI) decide what happens.
        self._stack.accept(event.flow_id)

    def _guarded(self, flow: ProxiedFlow, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn``; an exception costs this flow (reset), never the loop."""
        try:
            fn(*args)
        except Exception:
            self._counters["flow-errors"] += 1
            log.exception("%s: error on flow %d; resetting it", self._name, flow.id)
            self._abort(flow)

    def _abort(self, flow: ProxiedFlow) -> None:
        self._counters["aborts"] += 1
        self._forget(flow)
        self._stack.flow_abort(flow.id)

    def _forget(self, flow: ProxiedFlow) -> None:
        """Stop relaying ``flow`` and free what its proxy holds."""
        if self._flows.get(flow.id) is flow:
            del self._flows[flow.id]
        flow.proxy.close()

    def _alive(self, flow: ProxiedFlow) -> bool:
        return self._flows.get(flow.id) is flow

    def _pump_input(self, flow: ProxiedFlow) -> None:
        """Move guest bytes into the proxy while it wants them, acting on each step.

        Iterative on purpose: a guest pipelining thousands of requests that
        are answered at once (stubs, denials) must not deepen the stack.
        """
        proxy = flow.proxy
        while self._alive(flow):
            self._after_proxy(flow)
            if not self._alive(flow):
                return
            limit = proxy.read_limit
            if limit <= 0:
                return
            data = self._stack.flow_read(flow.id, limit)
            if data:
                proxy.receive(data)
            elif flow.guest_eof and not flow.eof_delivered:
                flow.eof_delivered = True
                proxy.receive(b"")
            else:
                return

    def _after_proxy(self, flow: ProxiedFlow) -> None:
        """Record, mediate, send and close as the proxy's new state requires."""
        proxy = flow.proxy
        while self._alive(flow):
            self._record(proxy.take_records())
            if proxy.answer_backlog >= ANSWER_BACKLOG:
                break  # the next request waits: FlowWritable brings us back
            requests = proxy.take_requests()
            if not requests:
                break
            for received in requests:
                self._counters["requests"] += 1
                context = self._context()
                outcome = plan_request(received.request, received.started, context)
                if isinstance(outcome, UpstreamJob):
                    self._jobs.append((flow, outcome))
                else:
                    context.recorder.record(outcome.exchange)
                    self._counters[f"decision.{outcome.exchange.decision}"] += 1
                    proxy.respond(outcome.response, to=outcome.request)
        if not self._alive(flow):
            return
        if proxy.verdict == "abort":
            self._abort(flow)
            return
        self._pump_output(flow)

    def _record(self, records: list[Exchange]) -> None:
        if records:
            recorder = self._context().recorder
            for exchange in records:
                recorder.record(exchange)
                self._counters["records"] += 1

    def _pump_output(self, flow: ProxiedFlow) -> None:
        proxy = flow.proxy
        chunk = self._send_chunk
        while self._alive(flow):
            data = proxy.pending_output(chunk)  # also queues TLS close_notify when due
            if not data:
                break
            sent = self._stack.flow_send(flow.id, data)
            proxy.consume_output(sent)
            if sent < len(data):
                break  # the stack is full: FlowWritable will bring us back
        if proxy.verdict == "abort" and self._alive(flow):
            self._abort(flow)  # e.g. TLS failed while encrypting the response
        elif proxy.finished and not flow.closing and self._alive(flow):
            flow.closing = True
            self._stack.flow_close(flow.id)

    def _flow_timeout(self, flow: ProxiedFlow, now: float) -> None:
        flow.proxy.on_timer(now)
        self._after_proxy(flow)

    def _deliver(self, flow: ProxiedFlow, outcome: Mediated) -> None:
        upgraded = outcome.upgraded
        if not self._alive(flow):
            if upgraded is not None:
                upgraded.close()
            return  # the guest gave up, or it was rewound (reset): nothing to count
        self._counters[f"decision.{outcome.exchange.decision}"] += 1
        flow.proxy.respond(outcome.response, to=outcome.request)
        if upgraded is not None:
            if flow.proxy.switched and self._streams is not None:
                # The 101 is framed: from here the flow is an opaque stream.
                head, early, session = flow.proxy.hand_over()
                del self._flows[flow.id]
                flow.proxy.close()
                self._streams.adopt(
                    flow.id,
                    upgraded,
                    name=outcome.exchange.host,
                    port=outcome.exchange.port,
                    head=head,
                    from_guest=early,
                    guest_eof=flow.guest_eof,
                    recorder=self._context().recorder,
                    guest_tls=None if session is None else GuestTls(*session),
                )
                return
            upgraded.close()
        # Answering reopens the interceptor: read what the guest sent meanwhile.
        self._pump_input(flow)
