"""Sans-IO state of single requests to the guest agent (no sockets, threads or clocks).

Each pending request of an :class:`~pytest_gondolin.vm.channel.AgentChannel`
is a :class:`Call`: it takes the validated frames the guest sends for its id
and keeps what they say (output, exit status, file data, an error). A
:class:`ChannelCore <pytest_gondolin.vm.channel_core.ChannelCore>` files
calls by id and feeds them; the process handle
(:mod:`pytest_gondolin.vm.agent_process`) reads a streaming
:class:`ExecCall`. Output is capped at the caller's ``max_output`` whatever
the guest claims.

Lifecycle of one call (:class:`CallState`), changed only by
``Call._set_state`` against :data:`CALL_TRANSITIONS`::

    PENDING --'started' (exec)--> RUNNING
    PENDING / RUNNING --'ok', 'exit', last 'data'--> DONE
    PENDING / RUNNING --'error', a reset, abandoned, channel lost--> FAILED
    any --rewind (a process the restored guest runs again)--> RUNNING
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from pytest_gondolin.errors import AgentRequestError, VMError, guest_file_error
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.statemachine import Transitions, require, transition

__all__ = [
    "CALL_TRANSITIONS",
    "Call",
    "CallState",
    "ExecCall",
    "RawExecResult",
    "ReadCall",
    "SimpleCall",
    "SyncScan",
    "WriteCall",
]


@dataclass(frozen=True)
class RawExecResult:
    """Outcome of ``AgentChannel.exec``; ``truncated`` means output beyond the cap was dropped."""

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


# -- calls ---------------------------------------------------------------------------


class CallState(enum.Enum):
    """Where one request to the agent is (see the module docstring)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


CALL_TRANSITIONS: Transitions[CallState] = {
    CallState.PENDING: {CallState.RUNNING, CallState.DONE, CallState.FAILED},
    CallState.RUNNING: {CallState.DONE, CallState.FAILED},
    CallState.DONE: {CallState.RUNNING},
    CallState.FAILED: {CallState.RUNNING},
}

_FINISHED = (CallState.DONE, CallState.FAILED)
_UNFINISHED = (CallState.PENDING, CallState.RUNNING)


class Call:
    """One outstanding request: the frames it accepts and what they left behind."""

    kind = "request"
    accepts: frozenset[str] = frozenset({"ok", "error"})

    def __init__(self) -> None:
        self.id = 0
        self.error: VMError | None = None
        self._state = CallState.PENDING

    @property
    def state(self) -> CallState:
        return self._state

    @property
    def done(self) -> bool:
        """True once the call finished, successfully or not."""
        return self._state in _FINISHED

    def _set_state(self, new: CallState) -> None:
        """The only place a call's state changes (see :data:`CALL_TRANSITIONS`)."""
        self._state = transition(CALL_TRANSITIONS, self._state, new)

    def fail(self, error: VMError) -> None:
        """Finish with ``error``; a call that already finished keeps its outcome."""
        if not self.done:
            self.error = error
            self._set_state(CallState.FAILED)

    @require(*_UNFINISHED)
    def receive(self, frame: proto.Frame) -> bool:
        """Apply one validated frame for this call; return True once it is finished.

        Raises ``guest.protocol.FrameError`` for a frame this call cannot
        take (the caller fails the call with it).
        """
        if frame.type not in self.accepts:
            raise proto.FrameError(f"unexpected {frame.type!r} for a {self.kind} request")
        if frame.type == "error":
            h = frame.header
            self.fail(self.request_error(h["message"], h["errno"]))
        elif self.handle(frame):
            self._set_state(CallState.DONE)
        return self.done

    def handle(self, frame: proto.Frame) -> bool:
        """Take a non-error frame; True when it completes the call."""
        return frame.type == "ok"

    def request_error(self, message: str, errno: int | None) -> AgentRequestError:
        """The error the agent's ``error`` answer means for this call."""
        return AgentRequestError(self.kind, message, errno)


class SimpleCall(Call):
    """A request answered by one ``ok`` (or ``error``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind


class WriteCall(Call):
    """``write_open`` .. ``write_close`` of guest file ``path``: one ``ok`` or ``error``."""

    kind = "write_file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def request_error(self, message: str, errno: int | None) -> AgentRequestError:
        """A :class:`~pytest_gondolin.errors.GuestFileError` (an OSError) naming ``path``."""
        return guest_file_error(self.kind, self.path, errno, message)


class ReadCall(Call):
    """``read`` of guest file ``path``: ``data`` frames up to ``max_size`` bytes, then ``ok``."""

    kind = "read_file"
    accepts = frozenset({"data", "ok", "error"})

    def __init__(self, max_size: int, *, path: str) -> None:
        super().__init__()
        self.max_size = max_size
        self.path = path
        self.data = bytearray()

    def request_error(self, message: str, errno: int | None) -> AgentRequestError:
        """A :class:`~pytest_gondolin.errors.GuestFileError` (an OSError) naming ``path``."""
        return guest_file_error(self.kind, self.path, errno, message)

    def handle(self, frame: proto.Frame) -> bool:
        if frame.type == "data":
            if len(self.data) + len(frame.payload) > self.max_size:
                raise proto.FrameError(f"guest sent more than max_size ({self.max_size}) bytes")
            self.data += frame.payload
            return False
        return True


class ExecCall(Call):
    """``exec``: ``started``, output chunks (capped at ``max_output``), ``exit``.

    With ``streaming``, output is kept as ordered events for a process
    handle to read; otherwise it is collected per stream for one result.
    """

    kind = "exec"
    accepts = frozenset({"started", "stdout", "stderr", "exit", "error"})

    def __init__(self, max_output: int, *, streaming: bool, pid: int | None = None) -> None:
        super().__init__()
        self.max_output = max_output
        self.streaming = streaming
        self.pid = pid
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.events: collections.deque[tuple[str, bytes]] = collections.deque()
        #: Stdout taken from ``events`` by a reader of lines, not yet a whole line.
        self.line = bytearray()
        self.received = 0
        self.host_truncated = False
        self.returncode: int | None = None
        self.timed_out = False
        self.guest_truncated = False
        if pid is not None:  # attached to a process that already runs
            self._set_state(CallState.RUNNING)

    @property
    def truncated(self) -> bool:
        return self.host_truncated or self.guest_truncated

    def rewind(self) -> None:
        """Back to "running, nothing received": the guest was restored to a snapshot taken while it ran."""
        self.error = None
        self.returncode = None
        self.timed_out = False
        self.guest_truncated = self.host_truncated = False
        self.events.clear()
        self.line.clear()
        self.stdout.clear()
        self.stderr.clear()
        self.received = 0
        self._set_state(CallState.RUNNING)

    def handle(self, frame: proto.Frame) -> bool:
        t = frame.type
        if t == "started":
            if self.pid is not None:
                raise proto.FrameError("duplicate 'started'")
            self.pid = frame.header["pid"]
            self._set_state(CallState.RUNNING)
            return False
        if t == "exit":
            h = frame.header
            self.returncode = h["returncode"]
            self.timed_out = h["timed_out"]
            self.guest_truncated = h["truncated"]
            return True
        # stdout / stderr: never hold more than max_output, whatever the guest claims.
        room = self.max_output - self.received
        data = frame.payload
        if len(data) > room:
            self.host_truncated = True
            data = data[: max(room, 0)]
        if data:
            self.received += len(data)
            if self.streaming:
                self.events.append((t, data))
            else:
                (self.stdout if t == "stdout" else self.stderr).extend(data)
        return False

    def take_chunk(self) -> tuple[str, bytes] | None:
        """The next buffered output chunk (a partial line first), or None if none is buffered."""
        if self.line:
            data = bytes(self.line)
            self.line.clear()
            return ("stdout", data)
        return self.events.popleft() if self.events else None

    def take_line(self) -> bytes | None:
        """The next whole stdout line (with ``b"\\n"``), or None if none is buffered yet.

        Stderr chunks stay where they are, in order, for :meth:`take_chunk`.
        """
        while True:
            nl = self.line.find(b"\n")
            if nl >= 0:
                line = bytes(self.line[: nl + 1])
                del self.line[: nl + 1]
                return line
            idx = next((i for i, (s, _) in enumerate(self.events) if s == "stdout"), None)
            if idx is None:
                return None
            self.line += self.events[idx][1]
            del self.events[idx]

    def take_rest(self) -> bytes:
        """The buffered, unterminated end of stdout (after exit)."""
        rest = bytes(self.line)
        self.line.clear()
        return rest


class SyncScan:
    """Finds the exact bytes of the expected ``sync_ok`` frame in an untrusted stream."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.buf = bytearray()
        self.done = False

    def scan(self, data: bytes) -> bytes | None:
        """Return the bytes after the ``sync_ok`` frame once seen, else None (keeping a tail)."""
        self.buf += data
        i = self.buf.find(self.expected)
        if i < 0:
            keep = len(self.expected) - 1
            if len(self.buf) > keep:
                del self.buf[: len(self.buf) - keep]
            return None
        rest = bytes(self.buf[i + len(self.expected) :])
        self.buf.clear()
        self.done = True
        return rest
