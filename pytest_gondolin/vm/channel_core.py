"""The sans-IO core of the host's agent channel: pending calls, framing, resync, lifecycle.

:class:`ChannelCore` owns every piece of state an
:class:`~pytest_gondolin.vm.channel.AgentChannel` has, and does no I/O: no
sockets, threads or clocks. Bytes from the guest go in through
:meth:`ChannelCore.receive_data` and complete (or fail) the pending calls
(:mod:`pytest_gondolin.vm.agent_calls`); requests come out as bytes from
:meth:`ChannelCore.encode`. The driver (``vm/channel.py``) holds its lock
around every method here and owns the socket, the reader thread and every
deadline.

Lifecycle of a channel (:class:`ChannelState`), changed only by
``ChannelCore._set_state`` against :data:`CHANNEL_TRANSITIONS`::

    OPEN --start_sync--> SYNCING --the agent echoed the nonce--> OPEN
      |                     +--sync did not complete--> BROKEN
      +--the guest broke protocol--> BROKEN --start_sync--> SYNCING
    OPEN / SYNCING / BROKEN --EOF or read error--> LOST
    any --close--> CLOSED

Everything the guest sends is hostile: frames are size-bounded by the
decoder and validated against the protocol table, buffered output never
exceeds the caller's cap. A frame that fails validation breaks the channel
(pending and later calls raise
:class:`~pytest_gondolin.errors.AgentProtocolError`) until a sync succeeds.

Request ids start at a random offset and only increase, so frames from
requests issued before a snapshot restore can never match a new request.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pytest_gondolin.errors import AgentError, AgentProtocolError, VMError
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.statemachine import Transitions, require, transition
from pytest_gondolin.vm.agent_calls import Call, ExecCall, SyncScan

__all__ = ["CHANNEL_TRANSITIONS", "ChannelCore", "ChannelState", "exec_header"]

log = logging.getLogger(__name__)


class ChannelState(enum.Enum):
    """Where an agent channel is (see the module docstring)."""

    OPEN = "open"  # framing trusted, requests flow
    SYNCING = "syncing"  # bytes dropped until the agent echoes the nonce; new requests wait
    BROKEN = "broken"  # the guest broke protocol: every call fails until a sync succeeds
    LOST = "lost"  # the socket hit EOF or failed: the VM went away
    CLOSED = "closed"  # closed by the host


CHANNEL_TRANSITIONS: Transitions[ChannelState] = {
    ChannelState.OPEN: {
        ChannelState.SYNCING,
        ChannelState.BROKEN,
        ChannelState.LOST,
        ChannelState.CLOSED,
    },
    ChannelState.SYNCING: {
        ChannelState.OPEN,
        ChannelState.BROKEN,
        ChannelState.LOST,
        ChannelState.CLOSED,
    },
    ChannelState.BROKEN: {ChannelState.SYNCING, ChannelState.LOST, ChannelState.CLOSED},
    ChannelState.LOST: {ChannelState.CLOSED},
    ChannelState.CLOSED: set(),
}

_GONE = (ChannelState.LOST, ChannelState.CLOSED)


class ChannelCore:
    """The state of one agent channel, bytes in and bytes out; callers serialise access."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._state = ChannelState.OPEN
        #: Why the channel is BROKEN, LOST or CLOSED (None while OPEN / SYNCING).
        self._reason: str | None = None
        self._calls: dict[int, Call] = {}
        self._next_id = secrets.randbelow(1 << 31) + 1
        self._decoder = proto.FrameDecoder()
        self._scan: SyncScan | None = None
        #: The agent's ``ready`` header, once it arrived.
        self.ready: dict[str, Any] | None = None

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def gone(self) -> bool:
        """True once the channel is LOST or CLOSED: nothing will ever work again."""
        return self._state in _GONE

    def _set_state(self, new: ChannelState, reason: str | None = None) -> None:
        """The only place the channel's state changes (see :data:`CHANNEL_TRANSITIONS`)."""
        old = self._state
        self._state = transition(CHANNEL_TRANSITIONS, old, new)
        if new is not old:
            log.debug("%s: %s -> %s", self.name, old.value, new.value)
        if new in (ChannelState.OPEN, ChannelState.SYNCING):
            self._reason = None
        elif reason is not None:
            self._reason = reason

    # -- checks the driver makes before acting ------------------------------------

    def check_alive(self) -> None:
        """Raise VMError (with the reason) if the channel is LOST or CLOSED."""
        if self.gone:
            raise VMError(f"{self.name}: {self._reason}")

    def check_usable(self) -> None:
        """:meth:`check_alive`, and raise AgentProtocolError if the channel is BROKEN."""
        self.check_alive()
        if self._state is ChannelState.BROKEN:
            raise AgentProtocolError(f"{self.name}: channel unusable: {self._reason}")

    # -- calls ---------------------------------------------------------------------

    def _new_id(self) -> int:
        while True:  # skip ids held by attached processes (see attach)
            req_id = self._next_id
            self._next_id = self._next_id + 1 if self._next_id + 1 < proto.MAX_ID else 1
            if req_id not in self._calls:
                return req_id

    @require(ChannelState.OPEN)
    def register(self, call: Call) -> None:
        """Give ``call`` a fresh id and file it, so frames for that id reach it."""
        call.id = self._new_id()
        self._calls[call.id] = call

    @require(ChannelState.OPEN, ChannelState.SYNCING, ChannelState.BROKEN)
    def attach(self, call: ExecCall, req_id: int) -> None:
        """File ``call`` under ``req_id``, an id the guest's agent already runs a process under."""
        if req_id in self._calls:
            raise AgentError(f"{self.name}: request id {req_id} is already in use")
        call.id = req_id
        self._calls[req_id] = call

    def forget(self, call: Call) -> None:
        """Stop routing frames to ``call`` (if it is still filed)."""
        if self._calls.get(call.id) is call:
            del self._calls[call.id]

    def fail_all(
        self, make_error: Callable[[], VMError], keep: Mapping[int, Call] | None = None
    ) -> None:
        """Fail and forget every pending call but those in ``keep``."""
        for call in self._calls.values():
            if keep is None or keep.get(call.id) is not call:
                call.fail(make_error())
        self._calls = dict(keep or {})

    # -- requests ------------------------------------------------------------------

    def encode(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
        """Validate and encode a host request; a bad one raises AgentProtocolError, nothing is sent."""
        try:
            proto.validate(header, sender="host")
            return proto.encode_frame(header, payload)
        except proto.FrameError as exc:
            raise AgentProtocolError(
                f"{self.name}: invalid {header.get('t')} request: {exc}"
            ) from exc

    # -- resynchronisation ------------------------------------------------------------

    @require(ChannelState.OPEN, ChannelState.BROKEN)
    def start_sync(
        self, preserve: Iterable[ExecCall], *, entropy: bytes, clock_ns: int | None
    ) -> tuple[bytes, SyncScan]:
        """Begin a resync; return the ``sync`` request to send and the scanner for its answer.

        Every pending call fails with ``AgentError("... state reset by
        restore")`` except ``preserve`` (rewound and kept), and received
        bytes are dropped until the answer. The channel is SYNCING until
        the answer arrives (then OPEN) or :meth:`finish_sync` (BROKEN).
        """
        nonce = secrets.token_hex(16)
        req_id = self._new_id()
        request = self.encode(
            {"t": "sync", "id": req_id, "nonce": nonce, "clock_ns": clock_ns}, entropy
        )
        scan = SyncScan(proto.encode_frame({"t": "sync_ok", "id": req_id, "nonce": nonce}))
        kept: dict[int, Call] = {}
        for call in preserve:
            # Even a process that exited since: the restored guest runs it again.
            call.rewind()
            kept[call.id] = call
        self.fail_all(lambda: AgentError(f"{self.name}: state reset by restore"), keep=kept)
        self._scan = scan
        # Framing before the answer cannot be trusted (a restore may cut a frame).
        self._decoder = proto.FrameDecoder()
        self._set_state(ChannelState.SYNCING)
        return request, scan

    def finish_sync(self) -> None:
        """End a resync: a channel still SYNCING did not get its answer and is BROKEN."""
        if self._state is ChannelState.SYNCING:
            self._set_state(ChannelState.BROKEN, "sync did not complete")
        self._scan = None

    # -- the end -----------------------------------------------------------------------

    def lose(self, error: VMError) -> bool:
        """The socket failed with ``error``: fail everything. False if already LOST or CLOSED."""
        if self.gone:
            return False
        self._set_state(ChannelState.LOST, str(error).removeprefix(f"{self.name}: "))
        self.fail_all(lambda: VMError(str(error)))
        return True

    def close(self) -> bool:
        """Fail everything with "closed" and become CLOSED. False if it already was."""
        if self._state is ChannelState.CLOSED:
            return False
        # A channel lost before keeps saying why (EOF ...), not merely "closed".
        reason = self._reason if self._state is ChannelState.LOST else "agent channel closed"
        self._set_state(ChannelState.CLOSED, reason)
        self.fail_all(lambda: VMError(f"{self.name}: agent channel closed"))
        return True

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the guest through the sync scanner and decoder, and dispatch frames.

        Never raises: a guest that breaks the protocol breaks the channel.
        """
        if self.gone:
            return
        try:
            if self._state is ChannelState.SYNCING and self._scan is not None:
                rest = self._scan.scan(data)
                if rest is None:
                    return
                log.debug("%s: sync complete", self.name)
                self._decoder = proto.FrameDecoder()
                self._set_state(ChannelState.OPEN)
                data = rest
            if self._state is ChannelState.BROKEN:
                return
            self._decoder.feed(data)
            for frame in self._decoder:
                proto.validate_frame(frame, sender="guest")
                self._dispatch(frame)
        except proto.FrameError as exc:
            self._break(str(exc))
        except Exception as exc:
            log.exception("%s: failed to process guest data", self.name)
            self._break(f"internal error: {exc!r}")

    def _break(self, reason: str) -> None:
        """The guest violated the protocol: fail everything until a successful sync."""
        log.error("%s: guest broke protocol: %s", self.name, reason)
        self._set_state(ChannelState.BROKEN, f"guest broke protocol: {reason}")
        msg = f"{self.name}: {self._reason}"
        self.fail_all(lambda: AgentProtocolError(msg))

    def _dispatch(self, frame: proto.Frame) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s (+%d bytes)", self.name, frame.header, len(frame.payload))
        t = frame.type
        if t == "ready":
            if self.ready is not None:
                log.warning("%s: agent sent ready again (restarted?)", self.name)
            self.ready = frame.header
            return
        if t == "sync_ok":
            log.debug("%s: stale sync_ok dropped", self.name)
            return
        call = self._calls.get(frame.id)
        if call is None:
            log.debug("%s: %s for unknown id %d dropped", self.name, t, frame.id)
            return
        try:
            finished = call.receive(frame)
        except proto.FrameError as exc:
            call.fail(AgentProtocolError(f"{self.name}: {exc}"))
            finished = True
        if finished:
            del self._calls[frame.id]


def exec_header(
    req_id: int,
    argv: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    max_output: int,
    stdin: bytes | None,
) -> dict[str, Any]:
    """The ``exec`` request header (``stdin``: None means /dev/null, bytes a pipe)."""
    return {
        "t": "exec",
        "id": req_id,
        "argv": argv,
        "env": None if env is None else dict(env),
        "cwd": cwd,
        "timeout": timeout,
        "max_output": max_output,
        "stdin": stdin is not None,
    }
