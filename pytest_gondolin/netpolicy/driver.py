"""The network driver: one guest's whole network, on one background thread.

:class:`NetworkDriver` owns a listening Unix socket that QEMU's
``-netdev stream,server=off`` connects to (the socket exists before QEMU
starts; :mod:`.qemu_socket` serves it), and one thread running a
``selectors`` loop; upstream fetches run on a small pool
(:mod:`.upstream_pool`). The driver and those two own the sockets, threads
and timeouts of ``netpolicy`` (raw TCP streams are :mod:`.streams`'); the
packet stack (:mod:`.stack`) and the HTTP layer (:mod:`.http`) are
sans-IO, and :mod:`.relay` joins them::

    QEMU --frames--> PeerLink --> NetworkStack --events--> FlowRelay --> FlowProxy
                                                              | requests
    QEMU <--frames-- PeerLink <-- NetworkStack <--bytes--------+
                                                              v
                         plan_request (stub -> policy -> secrets), then
                         run_upstream on a small worker pool (upstream_pool.py);
                         results come back through a queue and a wake-up
                         socketpair

Guarantees:

* The loop thread never dies from an exception: a failure while handling
  one flow costs that flow (it is reset and logged), a failure anywhere
  else is logged and the loop goes on. A corrupt frame stream from QEMU
  (:class:`~.stack.link.LinkError`) disconnects the link, as QEMU itself does.
* Everything is bounded by a named limit (:class:`~.limits.DriverLimits`):
  concurrent upstream fetches, request bodies held across flows, response
  bytes waiting for a slow guest, frames waiting for QEMU, bytes read per
  wake-up, sniffing time; what is recorded by the recorder's byte budget
  (:mod:`.http.recorder`).
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
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.dns_policy import policy_resolver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority, default_ca
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
from pytest_gondolin.netpolicy.http.mediation import (
    MediationContext,
)
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import SecretStore
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.qemu_socket import QemuSocket
from pytest_gondolin.netpolicy.relay import FlowRelay
from pytest_gondolin.netpolicy.stack.network import DEFAULT_MTU, NetworkStack
from pytest_gondolin.netpolicy.streams import StreamRelay, bind_forward
from pytest_gondolin.netpolicy.upstream_pool import UpstreamPool

__all__ = ["CLOSE_TIMEOUT", "RESET_TIMEOUT", "NetworkDriver"]

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
        self._counters: Counter[str] = Counter()
        self._stack = NetworkStack(mtu=mtu, resolver=policy_resolver(lambda: self._context))
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()

        self._selector = selectors.DefaultSelector()
        try:
            self._link = QemuSocket(
                self.socket_path,
                self._selector,
                limits=self.limits,
                counters=self._counters,
                name=name,
            )
        except NetworkPolicyError:
            self._selector.close()
            raise
        try:
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError as exc:
            self._link.close()
            self._selector.close()
            raise NetworkPolicyError(
                f"cannot listen for the guest network on {self.socket_path}: {exc}"
            ) from exc
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._relay = self._new_relay()
        self._upstream = UpstreamPool(
            limits=self.limits, counters=self._counters, wake=self._wake, name=name
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
        return self._link.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the peer to connect; return whether it did."""
        return self._link.connected.wait(timeout)

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
        self._on_loop(self._reset_state, "the reset")

    def forward(self, guest_port: int, host_port: int = 0) -> int:
        """Listen on ``127.0.0.1:host_port`` (0: any free port) and return the port.

        Each connection to it is opened into the guest's ``guest_port``
        through the stack and relayed as a raw stream (:mod:`.streams`);
        forwards end on :meth:`reset` and :meth:`close`. Raises
        :class:`ConfigError` for a bad port or past ``max_forwards``, and
        :class:`NetworkPolicyError` if the port cannot be bound.
        """
        if self._closed:
            raise NetworkPolicyError(f"{self.name}: the network is closed")
        if len(self._streams.forwards) >= self.limits.max_forwards:
            raise ConfigError(
                f"forward: {self.name} already forwards {self.limits.max_forwards} ports "
                "(DriverLimits.max_forwards)"
            )
        sock = bind_forward(guest_port, host_port)
        bound: int = sock.getsockname()[1]
        try:
            self._on_loop(lambda: self._streams.listen(sock, guest_port), "the forward")
            if self._closed:  # closed meanwhile: the loop may never have taken the socket
                raise NetworkPolicyError(f"{self.name}: the network closed during forward()")
        except BaseException:
            sock.close()
            raise
        log.debug("%s: forwarding 127.0.0.1:%d -> guest:%d", self.name, bound, guest_port)
        return bound

    def _on_loop(self, fn: _Command, what: str) -> None:
        """Run ``fn`` on the loop thread and wait (at most :data:`RESET_TIMEOUT`)."""
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        self._commands.put(run)
        self._wake()
        if not (done.wait(RESET_TIMEOUT if self._thread.is_alive() else 0) or self._closed):
            raise NetworkPolicyError(f"{self.name}: the network loop did not apply {what}")
        if failure:
            raise failure[0]

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
        self._upstream.close()
        with contextlib.suppress(Exception):
            self._streams.close("vm-closed")
        with contextlib.suppress(Exception):
            self._selector.close()
        self._link.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        log.debug("%s: network driver closed", self.name)

    def __enter__(self) -> NetworkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NetworkDriver {self.name} {self.socket_path} flows={len(self._relay)}>"

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
        deadlines = [
            d
            for d in (
                self._stack.next_timer,
                self._relay.next_deadline,
                self._streams.next_deadline,
            )
            if d is not None
        ]
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
                self._link.accept()
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            elif key.data == "peer":
                readable_peer |= bool(mask & selectors.EVENT_READ)
                writable_peer |= bool(mask & selectors.EVENT_WRITE)
            elif callable(key.data):  # a raw TCP stream's socket or a forward (streams.py)
                key.data(mask)
        self._run_commands()
        if readable_peer:
            self._link.read(self._on_frames)
        self._upstream.collect(self._relay)
        now = time.monotonic()
        self._stack.on_timer(now)
        self._relay.on_timer(now)
        self._streams.on_timer(now)
        self._relay.process_events()
        self._dispatch_jobs()
        self._link.queue(self._stack.outgoing_frames())
        if writable_peer or self._link.pending_tx:
            self._link.flush()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    # ------------------------------------------------------------------ the link

    def _on_frames(self, frames: list[bytes], now: float) -> None:
        for frame in frames:
            self._stack.receive_frame(frame, now)
        # Serve events between reads so the stack's buffers drain steadily.
        self._relay.process_events()

    # ------------------------------------------------------------------ requests

    def _new_relay(self) -> FlowRelay:
        self._streams = StreamRelay(
            self._stack,
            self._selector,
            context=lambda: self._context,
            limits=self.limits,
            counters=self._counters,
            name=self.name,
        )
        return FlowRelay(
            self._stack,
            ca=self.ca,
            context=lambda: self._context,
            on_room=self._dispatch_jobs,
            counters=self._counters,
            send_chunk=self.limits.send_chunk,
            body_budget=self.limits.max_request_body_bytes,
            name=self.name,
            streams=self._streams,
        )

    def _dispatch_jobs(self) -> None:
        self._upstream.dispatch(self._relay)

    # ------------------------------------------------------------------ reset

    def _reset_state(self) -> None:
        dropped = len(self._relay)
        stale = self._link.discard_stale()
        self._streams.close("vm-reset")  # streams and forwards end with the guest's past
        # New flows, a new resolver (answering the names the policy knows), zero counters.
        self._stack = NetworkStack(mtu=self.mtu, resolver=policy_resolver(lambda: self._context))
        self._relay = self._new_relay()  # no flow, no waiting job
        self._counters.clear()  # in place: the peer link shares it
        context = self._context
        self._context = MediationContext(
            context.policy, context.secrets, Recorder(redactor=context.secrets), context.cassette
        )
        log.debug("%s: reset, %d flows and %d stale frames forgotten", self.name, dropped, stale)
