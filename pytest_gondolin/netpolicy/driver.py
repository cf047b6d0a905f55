"""The network driver: one guest's whole network, on one background thread.

:class:`NetworkDriver` owns a listening Unix socket that QEMU's
``-netdev stream,server=off`` connects to (the socket exists before QEMU
starts), and one thread running a ``selectors`` loop::

    QEMU --frames--> PeerLink --> NetworkStack --events--> FlowProxy (mitm.py)
                                                              | requests
    QEMU <--frames-- PeerLink <-- NetworkStack <--bytes--------+
                                                              v
                         plan_request (stub -> policy -> secrets), then
                         run_upstream on a small worker pool (mediation.py);
                         results come back through a queue and a wake-up
                         socketpair

Guarantees:

* The loop thread never dies from an exception: a failure while handling
  one flow costs that flow (it is reset and logged), a failure anywhere
  else is logged and the loop goes on. A corrupt frame stream from QEMU
  (:class:`~.link.LinkError`) disconnects the link, as QEMU itself does.
* Everything is bounded by a named limit (:class:`DriverLimits`):
  concurrent upstream fetches, response bytes waiting for a slow guest,
  frames waiting for QEMU, bytes read per wake-up, sniffing time.
* Backpressure both ways: guest bytes are read only while the flow's
  interceptor wants them (otherwise the guest's TCP window closes), and
  bytes go to the guest only as fast as the stack accepts them (the rest
  waits for ``FlowWritable``).
* Every request is recorded in the recorder current when it arrived, with
  the guest's own headers (secret placeholders, never values).
* A snapshot restore (:meth:`NetworkDriver.reset`) leaves nothing of the
  guest's network past behind: flows, DNS names, counters, records.

Thread-safety: :meth:`NetworkDriver.configure`, :meth:`~NetworkDriver.reset`
and :meth:`~NetworkDriver.close` may be called from any thread; everything
else runs on the loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pytest_gondolin import paths
from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.ca import CertificateAuthority
from pytest_gondolin.netpolicy.cassette import CassettePlayer
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.link import LinkError
from pytest_gondolin.netpolicy.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    internal_error,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.mitm import FlowProxy
from pytest_gondolin.netpolicy.peer import PeerLink
from pytest_gondolin.netpolicy.policy import NetworkPolicy
from pytest_gondolin.netpolicy.recorder import Exchange, Recorder
from pytest_gondolin.netpolicy.secrets import SecretStore
from pytest_gondolin.netpolicy.stack import (
    DEFAULT_MTU,
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowWritable,
    NetworkStack,
    NewFlow,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "RESET_TIMEOUT",
    "DriverLimits",
    "NetworkDriver",
    "default_ca",
]

log = logging.getLogger(__name__)

#: How long :meth:`NetworkDriver.reset` waits for the loop to apply it.
#: The loop answers within one iteration (milliseconds); a bound keeps a
#: wedged thread from hanging a test.
RESET_TIMEOUT: Final = 10.0
#: How long :meth:`NetworkDriver.close` waits for the loop thread to end.
CLOSE_TIMEOUT: Final = 5.0
#: Longest sleep of the loop when no timer is due (it wakes on I/O anyway);
#: bounds the delay of anything not signalled through the wake-up socket.
_MAX_POLL: Final = 5.0
#: A listen backlog of one: QEMU is the only client, anything else is refused.
_BACKLOG: Final = 1
#: Rounds of event handling per iteration; handling an event can create
#: more, and this guards against a bug turning that into a spin.
_MAX_EVENT_ROUNDS: Final = 10_000


_CA_LOCK = threading.Lock()
_CAS: dict[Path, CertificateAuthority] = {}


def default_ca() -> CertificateAuthority:
    """The interception CA of this cache dir (``<cache>/ca``), created on first use.

    One CA per cache dir, so the CA certificate in cached boot payloads and
    warm snapshots stays valid across runs. Raises
    :class:`~pytest_gondolin.errors.NetworkPolicyError` if it cannot be
    read or created.
    """
    directory = paths.cache_dir() / "ca"
    with _CA_LOCK:
        ca = _CAS.get(directory)
        if ca is None:
            ca = _CAS[directory] = CertificateAuthority.load_or_create(directory)
        return ca


@dataclass(eq=False)
class _Flow:
    """Driver-side state of one accepted flow (identity matters: see ``_results``)."""

    id: int
    proxy: FlowProxy
    guest_eof: bool = False
    eof_delivered: bool = False
    closing: bool = False  # flow_close was called


_Command = Callable[[], None]


class NetworkDriver:
    """Serve one guest's network on a Unix socket (see the module docstring).

    The socket is listening when the constructor returns; start QEMU with
    ``-netdev stream,server=off,addr.type=unix,addr.path=<socket_path>``.
    Defaults: deny-all policy, no secrets, a fresh :class:`Recorder`.
    Raises :class:`NetworkPolicyError` if the socket cannot be created.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        ca: CertificateAuthority | None = None,
        policy: NetworkPolicy | None = None,
        secrets: SecretStore | None = None,
        recorder: Recorder | None = None,
        mtu: int = DEFAULT_MTU,
        limits: DriverLimits | None = None,
        name: str = "net",
    ) -> None:
        self.socket_path = Path(socket_path)
        self.name = name
        self.limits = limits or DriverLimits()
        self.mtu = mtu
        self.ca = ca if ca is not None else default_ca()
        self._context = MediationContext(
            policy=policy if policy is not None else NetworkPolicy(),
            secrets=secrets,
            recorder=recorder if recorder is not None else Recorder(redactor=secrets),
        )
        self._stack = NetworkStack(mtu=mtu)
        self._counters: Counter[str] = Counter()
        self._flows: dict[int, _Flow] = {}
        self._jobs: deque[tuple[_Flow, UpstreamJob]] = deque()
        self._in_flight = 0
        self._results: queue.SimpleQueue[tuple[_Flow, Mediated]] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._peer: PeerLink | None = None
        self._peer_writing = False
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._connected = threading.Event()

        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self._listener.bind(str(self.socket_path))
            self._listener.listen(_BACKLOG)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError as exc:
            self._listener.close()
            raise NetworkPolicyError(
                f"cannot listen for the guest network on {self.socket_path}: {exc}"
            ) from exc
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.upstream_workers,
            thread_name_prefix=f"gondolin-upstream-{name}",
        )
        self._thread = threading.Thread(target=self._run, name=f"gondolin-net-{name}", daemon=True)
        self._thread.start()
        log.debug("%s: network driver listening on %s", name, self.socket_path)

    # ------------------------------------------------------------------ public API

    @property
    def policy(self) -> NetworkPolicy:
        """The policy new requests are judged by."""
        return self._context.policy

    @property
    def secrets(self) -> SecretStore | None:
        """The secret store whose placeholders are substituted (``None``: no secrets)."""
        return self._context.secrets

    @property
    def recorder(self) -> Recorder:
        """The recorder new exchanges go to."""
        return self._context.recorder

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        """True while QEMU (or a test's fake guest) is connected."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the peer to connect; return whether it did."""
        return self._connected.wait(timeout)

    def configure(
        self,
        policy: NetworkPolicy,
        secrets_store: SecretStore | None = None,
        recorder: Recorder | None = None,
        cassette: CassettePlayer | None = None,
    ) -> None:
        """Judge requests arriving from now on by ``policy`` and record them in ``recorder``.

        With ``cassette``, allowed requests are replayed from it or recorded into it.

        ``recorder`` defaults to a fresh one redacting ``secrets_store``.
        Requests already being fetched finish under the settings they
        arrived with. Safe from any thread.
        """
        if not isinstance(policy, NetworkPolicy):
            raise ConfigError(f"configure: expected a NetworkPolicy, got {type(policy).__name__}")
        if recorder is None:
            recorder = Recorder(redactor=secrets_store)
        # One attribute, swapped whole: the loop thread reads it once per request.
        self._context = MediationContext(policy, secrets_store, recorder, cassette)

    def reset(self) -> None:
        """Forget all the guest did on the network; call it on every snapshot restore.

        Nothing from before stays: no flow (dropped silently: the restored
        guest's TCP state predates it, its stray segments get a closed port's
        RST), no DNS name (a new resolver: a whole cap, old addresses name
        nothing), no counter, no frame unprocessed or unsent (bar the rest of
        one half written), no exchange or stub (a fresh recorder). Policy,
        secrets and cassette stay. Fetches in flight are recorded where they
        started, their responses dropped. Call it with the guest paused. Blocks
        until applied; :class:`NetworkPolicyError` past :data:`RESET_TIMEOUT`.
        """
        if self._closed:
            return
        if threading.current_thread() is self._thread:
            self._reset_state()
            return
        done = threading.Event()

        def reset() -> None:
            try:
                self._reset_state()
            finally:
                done.set()

        self._commands.put(reset)
        self._wake()
        if not (done.wait(RESET_TIMEOUT if self._thread.is_alive() else 0) or self._closed):
            raise NetworkPolicyError(f"{self.name}: the network loop did not apply the reset")

    @property
    def counters(self) -> dict[str, int]:
        """Diagnostic counters: the stack's (``tcp.*``, ``drop.*``, ...) and the driver's."""
        for _ in range(5):  # the loop thread may be updating them: retry a copy
            try:
                merged = dict(self._stack.counters)
                merged.update({f"driver.{k}": v for k, v in dict(self._counters).items()})
                return merged
            except RuntimeError:
                time.sleep(0.001)
        return {}

    def close(self) -> None:
        """Stop the thread, close every socket, remove the socket file. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_TIMEOUT)
            if self._thread.is_alive():
                log.warning("%s: network loop did not stop within %.0f s", self.name, CLOSE_TIMEOUT)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._selector.close()
        if self._peer is not None:
            self._peer.close()
            self._peer = None
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._connected.clear()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        log.debug("%s: network driver closed", self.name)

    def __enter__(self) -> NetworkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NetworkDriver {self.name} {self.socket_path} flows={len(self._flows)}>"

    # ------------------------------------------------------------------ loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._iteration()
            except Exception:
                # Last line of defence: never let the guest's network die.
                self._counters["loop-errors"] += 1
                log.exception("%s: network loop error (continuing)", self.name)
                time.sleep(0.01)  # a persistent error must not spin a core

    def _poll_timeout(self, now: float) -> float:
        deadlines = [d for d in (self._stack.next_timer,) if d is not None]
        deadlines += [d for f in self._flows.values() if (d := f.proxy.deadline) is not None]
        if not deadlines:
            return _MAX_POLL
        return min(max(min(deadlines) - now, 0.0), _MAX_POLL)

    def _iteration(self) -> None:
        ready = self._selector.select(self._poll_timeout(time.monotonic()))
        if self._stopping:
            return
        readable_peer = writable_peer = False
        for key, mask in ready:
            if key.data == "listen":
                self._accept_peer()
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            elif key.data == "peer":
                readable_peer |= bool(mask & selectors.EVENT_READ)
                writable_peer |= bool(mask & selectors.EVENT_WRITE)
        self._run_commands()
        if readable_peer:
            self._read_peer()
        self._collect_results()
        now = time.monotonic()
        self._stack.on_timer(now)
        self._flow_timers(now)
        self._process_events()
        self._dispatch_jobs()
        self._queue_tx()
        if self._peer is not None and (writable_peer or self._peer.pending_tx):
            self._flush_tx()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    # ------------------------------------------------------------------ the link

    def _accept_peer(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._peer is not None:
            # QEMU is the only peer; a second connection gets nothing.
            log.warning("%s: refusing a second connection to the network socket", self.name)
            conn.close()
            return
        self._peer = PeerLink(
            conn,
            read_chunk=self.limits.read_chunk,
            max_tx_bytes=self.limits.max_tx_bytes,
            counters=self._counters,
        )
        self._peer_writing = False
        self._selector.register(conn, selectors.EVENT_READ, "peer")
        self._connected.set()
        self._counters["peer-connects"] += 1
        log.debug("%s: guest network connected", self.name)

    def _drop_peer(self, why: str) -> None:
        peer = self._peer
        if peer is None:
            return
        log.info("%s: guest network link closed: %s", self.name, why)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        peer.close()
        self._peer = None
        self._peer_writing = False
        self._connected.clear()

    def _read_peer(self) -> None:
        budget = self.limits.max_read_per_wake
        while self._peer is not None and budget > 0:
            try:
                frames = self._peer.recv_frames()
            except LinkError as exc:
                self._counters["link-errors"] += 1
                self._drop_peer(exc.reason)
                return
            if frames is None:
                return
            budget -= self.limits.read_chunk
            now = time.monotonic()
            for frame in frames:
                self._stack.receive_frame(frame, now)
            # Serve events between reads so the stack's buffers drain steadily.
            self._process_events()

    def _queue_tx(self) -> None:
        frames = self._stack.outgoing_frames()
        if self._peer is None:
            if frames:
                self._counters["tx-dropped-no-peer"] += len(frames)
            return
        self._peer.queue(frames)

    def _flush_tx(self) -> None:
        peer = self._peer
        if peer is None:
            return
        try:
            peer.flush()
        except LinkError as exc:
            self._drop_peer(exc.reason)
            return
        want_write = peer.pending_tx > 0
        if want_write != self._peer_writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(peer.sock, events, "peer")
            self._peer_writing = want_write

    # ------------------------------------------------------------------ flows

    def _process_events(self) -> None:
        for _ in range(_MAX_EVENT_ROUNDS):
            events = self._stack.events()
            if not events:
                return
            for event in events:
                if isinstance(event, NewFlow):
                    self._new_flow(event)
                    continue
                flow = self._flows.get(event.flow_id)
                if flow is None:
                    continue
                if isinstance(event, FlowClosed):
                    self._flows.pop(event.flow_id, None)
                    log.debug(
                        "%s: flow %d closed (%s)", self.name, event.flow_id, event.reason.value
                    )
                    continue
                self._guarded(flow, self._flow_event, flow, event)
        log.error("%s: event processing did not settle; continuing next iteration", self.name)

    def _flow_event(self, flow: _Flow, event: FlowData | FlowEOF | FlowWritable) -> None:
        if isinstance(event, FlowEOF):
            flow.guest_eof = True
            self._pump_input(flow)
        elif isinstance(event, FlowData):
            self._pump_input(flow)
        else:
            self._pump_output(flow)
            self._dispatch_jobs()

    def _new_flow(self, event: NewFlow) -> None:
        proxy = FlowProxy(
            dst_ip=event.dst_ip,
            dst_port=event.dst_port,
            dns_name=event.dns_name,
            ca=self.ca,
            now=time.monotonic(),
        )
        flow = _Flow(event.flow_id, proxy)
        self._flows[event.flow_id] = flow
        self._counters["flows"] += 1
        log.debug("%s: flow %d to %s:%d", self.name, event.flow_id, proxy.host, event.dst_port)
        # Accept at once: the first bytes (request line / SNI) decide what happens.
        self._stack.accept(event.flow_id)

    def _guarded(self, flow: _Flow, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn``; an exception costs this flow (reset), never the loop."""
        try:
            fn(*args)
        except Exception:
            self._counters["flow-errors"] += 1
            log.exception("%s: error on flow %d; resetting it", self.name, flow.id)
            self._abort(flow)

    def _abort(self, flow: _Flow) -> None:
        self._counters["aborts"] += 1
        self._flows.pop(flow.id, None)
        self._stack.flow_abort(flow.id)

    def _alive(self, flow: _Flow) -> bool:
        return self._flows.get(flow.id) is flow

    def _pump_input(self, flow: _Flow) -> None:
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

    def _after_proxy(self, flow: _Flow) -> None:
        """Record, mediate, send and close as the proxy's new state requires."""
        proxy = flow.proxy
        while self._alive(flow):
            self._record(proxy.take_records())
            requests = proxy.take_requests()
            if not requests:
                break
            for received in requests:
                self._counters["requests"] += 1
                context = self._context
                outcome = plan_request(received.request, received.started, context)
                if isinstance(outcome, UpstreamJob):
                    self._jobs.append((flow, outcome))
                else:
                    context.recorder.record(outcome.exchange)
                    self._counters[f"decision.{outcome.exchange.decision}"] += 1
                    proxy.respond(outcome.response)
        if not self._alive(flow):
            return
        if proxy.verdict == "abort":
            self._abort(flow)
            return
        self._pump_output(flow)

    def _record(self, records: list[Exchange]) -> None:
        if records:
            recorder = self._context.recorder
            for exchange in records:
                recorder.record(exchange)
                self._counters["records"] += 1

    def _pump_output(self, flow: _Flow) -> None:
        proxy = flow.proxy
        chunk = self.limits.send_chunk
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

    def _flow_timers(self, now: float) -> None:
        for flow in list(self._flows.values()):
            deadline = flow.proxy.deadline
            if deadline is not None and now >= deadline:
                self._guarded(flow, self._flow_timeout, flow, now)

    def _flow_timeout(self, flow: _Flow, now: float) -> None:
        flow.proxy.on_timer(now)
        self._after_proxy(flow)

    # ------------------------------------------------------------------ requests

    def _deliver(self, flow: _Flow, outcome: Mediated) -> None:
        """Answer the guest with an upstream outcome (already recorded), if its flow lives."""
        if not self._alive(flow):
            return  # the guest gave up, or it was rewound (reset): nothing to count
        self._counters[f"decision.{outcome.exchange.decision}"] += 1
        flow.proxy.respond(outcome.response)
        # Answering reopens the interceptor: read what the guest sent meanwhile.
        self._pump_input(flow)

    def _output_backlog(self) -> int:
        return sum(f.proxy.output_bytes for f in self._flows.values())

    def _dispatch_jobs(self) -> None:
        limits = self.limits
        while self._jobs and self._in_flight < limits.upstream_workers:
            if self._output_backlog() >= limits.max_output_bytes:
                self._counters["jobs-held-backlog"] += 1
                return
            flow, job = self._jobs.popleft()
            if self._flows.get(flow.id) is not flow:
                continue  # the guest gave up on this flow while it waited
            self._in_flight += 1
            try:
                self._pool.submit(self._work, flow, job)
            except RuntimeError:  # the pool is shutting down
                self._in_flight -= 1
                return

    def _work(self, flow: _Flow, job: UpstreamJob) -> None:
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

    def _collect_results(self) -> None:
        while True:
            try:
                flow, outcome = self._results.get_nowait()
            except queue.Empty:
                break
            self._in_flight = max(0, self._in_flight - 1)
            self._guarded(flow, self._deliver, flow, outcome)

    # ------------------------------------------------------------------ reset

    def _reset_state(self) -> None:
        dropped = len(self._flows)
        stale = 0
        if self._peer is not None:
            try:
                stale = self._peer.discard_stale()
            except LinkError as exc:
                self._drop_peer(exc.reason)
        self._stack = NetworkStack(mtu=self.mtu)  # new flows, new resolver, zero counters
        self._flows.clear()
        self._jobs.clear()
        self._counters.clear()  # in place: the peer link shares it
        context = self._context
        self._context = MediationContext(
            context.policy, context.secrets, Recorder(redactor=context.secrets), context.cassette
        )
        log.debug("%s: reset, %d flows and %d stale frames forgotten", self.name, dropped, stale)
