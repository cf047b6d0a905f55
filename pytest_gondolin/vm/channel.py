"""Host side of the control channel to the in-guest agent.

:class:`AgentChannel` drives the protocol of :mod:`pytest_gondolin.guest.protocol`
over a connected stream socket (in QEMU, the host end of a virtio-serial
chardev). One background thread reads and decodes frames and files them
under their request id; the public API is synchronous and thread-safe, so
several threads may run commands at once.

Everything the guest sends is treated as hostile: frames are size-bounded
by the decoder, every message is validated against the protocol table,
buffered output never exceeds the caller's cap, and every wait has a
deadline. A frame that fails validation breaks the channel (pending and
later calls raise :class:`~pytest_gondolin.errors.ProtocolError`) until a
successful :meth:`AgentChannel.sync`; a lost socket fails everything with
:class:`~pytest_gondolin.errors.VMError`.

Request ids start at a random offset and only increase, so frames from
requests issued before a snapshot restore can never match a new request.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import select
import signal as _signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pytest_gondolin.errors import AgentError, ExecTimeout, ProtocolError, VMError
from pytest_gondolin.guest import protocol as proto

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "EXEC_GRACE",
    "MIN_TRANSFER_RATE",
    "REQUEST_TIMEOUT",
    "AgentChannel",
    "AgentProcess",
    "AgentRequestError",
    "AgentTimeout",
    "RawExecResult",
]

log = logging.getLogger(__name__)

#: The guest enforces exec timeouts itself; this covers its kill, output drain and TCG slowness.
EXEC_GRACE = 10.0
#: A small request (open, clock, entropy) takes milliseconds; 30 s covers a loaded TCG guest.
REQUEST_TIMEOUT = 30.0
#: Slowest transfer we still call healthy (TCG guests move several MiB/s); scales file deadlines.
MIN_TRANSFER_RATE = 1 << 20
#: Default cap on stdout+stderr buffered for one command.
DEFAULT_MAX_OUTPUT = 64 << 20
#: How long close() waits for the reader thread to notice the shutdown.
CLOSE_JOIN_TIMEOUT = 5.0
#: Best-effort ``kill`` after a host-side deadline must not block the caller for long.
KILL_SEND_TIMEOUT = 2.0
#: Bytes per recv().
RECV_SIZE = 256 << 10
#: Longest single poll() while sending without a deadline, so close() is noticed.
SEND_POLL_SLICE = 1.0


class AgentTimeout(AgentError, TimeoutError):
    """The agent did not answer within the deadline (the channel itself may still work)."""


class AgentRequestError(AgentError):
    """The agent refused or failed a request; ``errno`` is set when it was an OS error."""

    def __init__(self, request: str, message: str, errno: int | None) -> None:
        self.request = request
        self.message = message
        self.errno = errno
        suffix = f" (errno {errno})" if errno is not None else ""
        super().__init__(f"{request} failed in the guest: {message}{suffix}")


@dataclass(frozen=True)
class RawExecResult:
    """Outcome of :meth:`AgentChannel.exec`; ``truncated`` means output beyond the cap was dropped."""

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


# ---------------------------------------------------------------------------
# Per-request state, mutated only by the reader thread under the channel lock.


class _Call:
    """One outstanding request. ``on_frame`` returns True when the request is complete."""

    kind = "request"
    accepts: frozenset[str] = frozenset({"ok", "error"})

    def __init__(self) -> None:
        self.id = 0
        self.done = False
        self.error: VMError | None = None

    def fail(self, error: VMError) -> None:
        if not self.done:
            self.done = True
            self.error = error

    def on_frame(self, frame: proto.Frame) -> bool:
        if frame.type not in self.accepts:
            raise proto.ProtocolError(f"unexpected {frame.type!r} for a {self.kind} request")
        if frame.type == "error":
            h = frame.header
            self.error = AgentRequestError(self.kind, h["message"], h["errno"])
            return True
        return self.handle(frame)

    def handle(self, frame: proto.Frame) -> bool:
        return frame.type == "ok"


class _SimpleCall(_Call):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind


class _ReadCall(_Call):
    kind = "read_file"
    accepts = frozenset({"data", "ok", "error"})

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size
        self.data = bytearray()

    def handle(self, frame: proto.Frame) -> bool:
        if frame.type == "data":
            if len(self.data) + len(frame.payload) > self.max_size:
                raise proto.ProtocolError(f"guest sent more than max_size ({self.max_size}) bytes")
            self.data += frame.payload
            return False
        return True


class _ExecCall(_Call):
    kind = "exec"
    accepts = frozenset({"started", "stdout", "stderr", "exit", "error"})

    def __init__(self, max_output: int, *, streaming: bool) -> None:
        super().__init__()
        self.max_output = max_output
        self.streaming = streaming
        self.pid: int | None = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.events: collections.deque[tuple[str, bytes]] = collections.deque()
        self.received = 0
        self.host_truncated = False
        self.returncode: int | None = None
        self.timed_out = False
        self.guest_truncated = False

    @property
    def truncated(self) -> bool:
        return self.host_truncated or self.guest_truncated

    def rewind(self) -> None:
        """Back to "running, nothing received": the guest was restored to a snapshot taken while it ran."""
        self.done = False
        self.error = None
        self.returncode = None
        self.timed_out = False
        self.guest_truncated = self.host_truncated = False
        self.events.clear()
        self.stdout.clear()
        self.stderr.clear()
        self.received = 0

    def handle(self, frame: proto.Frame) -> bool:
        t = frame.type
        if t == "started":
            if self.pid is not None:
                raise proto.ProtocolError("duplicate 'started'")
            self.pid = frame.header["pid"]
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


class _SyncScan:
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


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


# ---------------------------------------------------------------------------


class AgentChannel:
    """Synchronous, thread-safe client of the guest agent over a connected stream socket.

    The channel owns ``sock`` (it is closed by :meth:`close`). ``on_lost`` is
    called once, from the reader thread, with the error when the socket hits
    EOF or fails (not after :meth:`close`).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str = "agent",
        on_lost: Callable[[VMError], None] | None = None,
        exec_grace: float = EXEC_GRACE,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.name = name
        self.on_lost = on_lost
        self._exec_grace = exec_grace
        self._request_timeout = request_timeout
        sock.setblocking(True)
        self._sock = sock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        # All below are guarded by _lock.
        self._calls: dict[int, _Call] = {}
        self._next_id = secrets.randbelow(1 << 31) + 1
        self._decoder = proto.FrameDecoder()
        self._ready: dict[str, Any] | None = None
        self._sync: _SyncScan | None = None
        self._broken: str | None = None
        self._dead: str | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "broken" if self._broken else "open"
        return f"<AgentChannel {self.name} {state}>"

    def __enter__(self) -> AgentChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the socket was lost."""
        return self._dead is not None

    # -- public API --------------------------------------------------------------

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Return the agent's ``ready`` header (received now or earlier).

        Raises:
            AgentTimeout: no ``ready`` within ``timeout``.
            ProtocolError: the agent speaks another protocol version, or broke framing.
            VMError: the channel is closed or lost.
        """
        deadline = _deadline(timeout)
        with self._cond:
            while self._ready is None:
                self._check_usable()
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: agent not ready within {timeout:g} s")
                self._cond.wait(remaining)
            ready = dict(self._ready)
        if ready["version"] != proto.PROTOCOL_VERSION:
            raise ProtocolError(
                f"{self.name}: guest agent speaks protocol {ready['version']!r}, host expects "
                f"{proto.PROTOCOL_VERSION!r}; rebuild the guest image"
            )
        return ready

    def sync(
        self,
        timeout: float,
        *,
        preserve: Iterable[AgentProcess] = (),
        entropy: bytes = b"",
        clock_ns: int | None = None,
    ) -> None:
        """Resynchronise with the agent after a snapshot restore (or a broken stream).

        Fails every pending call with ``AgentError("... state reset by restore")``,
        except the processes in ``preserve``: processes that were already running
        when the restored snapshot was taken, so the guest has them again. They
        stay (or are again) attached, rewound to "running, nothing received".
        Then it drops all received bytes until the agent echoes a fresh random
        nonce. On success the channel is usable again even if it was broken;
        on failure it is broken until the next successful sync.

        ``entropy`` (mixed into the guest's RNG, which then reseeds) and
        ``clock_ns`` (the wall clock to set) ride on the same round trip.

        Raises:
            AgentTimeout: no ``sync_ok`` within ``timeout``.
            VMError: the channel is closed or lost.
        """
        deadline = _deadline(timeout)
        if not self._sync_lock.acquire(timeout=timeout):
            raise AgentTimeout(f"{self.name}: another sync did not finish within {timeout:g} s")
        try:
            nonce = secrets.token_hex(16)
            with self._cond:
                self._check_alive()
                req_id = self._new_id()
                scan = _SyncScan(proto.encode_frame({"t": "sync_ok", "id": req_id, "nonce": nonce}))
                kept: dict[int, _Call] = {}
                for proc in preserve:
                    # Even a process that exited since: the restored guest runs it again.
                    proc._line.clear()
                    proc._call.rewind()
                    kept[proc._call.id] = proc._call
                self._fail_all(
                    lambda: AgentError(f"{self.name}: state reset by restore"), keep=kept
                )
                self._sync = scan
                # Framing before the answer cannot be trusted (a restore may cut a frame).
                self._decoder = proto.FrameDecoder()
            try:
                self._send_frame(
                    self._encode(
                        {"t": "sync", "id": req_id, "nonce": nonce, "clock_ns": clock_ns}, entropy
                    ),
                    deadline,
                )
                with self._cond:
                    while not scan.done:
                        self._check_alive()
                        remaining = _remaining(deadline)
                        if remaining is not None and remaining <= 0:
                            raise AgentTimeout(
                                f"{self.name}: agent did not answer sync within {timeout:g} s"
                            )
                        self._cond.wait(remaining)
            finally:
                with self._cond:
                    if not scan.done:
                        self._broken = "sync did not complete"
                    self._sync = None
                    self._cond.notify_all()
        finally:
            self._sync_lock.release()

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> RawExecResult:
        """Run ``argv`` in the guest and return its exit status and output.

        ``env`` replaces the agent's environment when given (like
        ``subprocess``); ``input`` is fed to stdin (None: stdin is /dev/null).
        At most ``max_output`` bytes of stdout+stderr are kept. A guest-side
        timeout returns ``timed_out=True``; if the guest does not answer
        within ``timeout + EXEC_GRACE`` the host sends ``kill`` and raises.

        Raises:
            ExecTimeout: the host-side deadline passed.
            AgentRequestError: the guest could not start the command (e.g. ENOENT).
            ProtocolError: a bad request or a guest protocol violation.
            AgentError / VMError: state reset by :meth:`sync`, channel lost or closed.
        """
        argv = list(argv)
        deadline = None if timeout is None else time.monotonic() + timeout + self._exec_grace
        call = _ExecCall(max_output, streaming=False)
        self._register(call, deadline)
        try:
            self._send_frame(
                self._encode(
                    self._exec_header(call.id, argv, env, cwd, timeout, max_output, input)
                ),
                deadline,
            )
            if input is not None:
                self._send_stream(call, "stdin", input, deadline)
                self._send_frame(self._encode({"t": "stdin_eof", "id": call.id}), deadline)
            self._wait(call, deadline)
        except AgentTimeout as exc:
            self._abandon(call, kill=True)
            with self._lock:
                out, err = bytes(call.stdout), bytes(call.stderr)
            raise ExecTimeout(
                f"{self.name}: {argv!r} did not finish within {timeout} s + {self._exec_grace:g} s "
                "grace (host-side deadline); its process group was killed",
                argv=argv,
                stdout=out.decode(errors="replace"),
                stderr=err.decode(errors="replace"),
            ) from exc
        except BaseException:
            self._abandon(call, kill=True)
            raise
        assert call.returncode is not None
        return RawExecResult(
            returncode=call.returncode,
            stdout=bytes(call.stdout),
            stderr=bytes(call.stderr),
            timed_out=call.timed_out,
            truncated=call.truncated,
        )

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> AgentProcess:
        """Start ``argv`` with a stdin pipe and return a handle that streams its output.

        Returns once the guest reports the process started.

        Raises:
            AgentRequestError: the guest could not start it.
            AgentTimeout: no answer within ``REQUEST_TIMEOUT``.
            ProtocolError / AgentError / VMError: as for :meth:`exec`.
        """
        argv = list(argv)
        deadline = _deadline(self._request_timeout)
        call = _ExecCall(max_output, streaming=True)
        self._register(call, deadline)
        try:
            header = self._exec_header(call.id, argv, env, cwd, timeout, max_output, b"")
            self._send_frame(self._encode(header), deadline)
            with self._cond:
                while call.pid is None and not call.done:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        raise AgentTimeout(f"{self.name}: {argv!r} not started in time")
                    self._cond.wait(remaining)
                if call.error is not None:
                    raise call.error
                if call.pid is None:
                    raise ProtocolError(f"{self.name}: guest sent 'exit' before 'started'")
        except BaseException:
            self._abandon(call, kill=True)
            raise
        return AgentProcess(self, call, argv)

    def attach(
        self, process: AgentProcess, *, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> AgentProcess:
        """Attach to a process that ``process`` (of another channel) started, in a clone of its VM.

        For a VM started from a snapshot of another VM's RAM: the guest's agent
        already runs the process under the same request id, so this only makes
        the host side listen for it. Output starts empty.
        """
        call = _ExecCall(max_output, streaming=True)
        with self._cond:
            self._check_alive()
            call.id = process._call.id
            call.pid = process._call.pid
            if call.id in self._calls:
                raise AgentError(f"{self.name}: request id {call.id} is already in use")
            self._calls[call.id] = call
        return AgentProcess(self, call, list(process.argv))

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Atomically create or replace ``path`` in the guest (parents created) with ``data``.

        Raises:
            AgentRequestError: the guest could not write it (errno set).
            AgentTimeout: not done within ``REQUEST_TIMEOUT`` plus size / ``MIN_TRANSFER_RATE``.
            ProtocolError / AgentError / VMError: as for :meth:`exec`.
        """
        deadline = _deadline(self._request_timeout + len(data) / MIN_TRANSFER_RATE)
        call = _SimpleCall("write_file")
        self._register(call, deadline)
        try:
            self._send_frame(
                self._encode({"t": "write_open", "id": call.id, "path": path, "mode": mode}),
                deadline,
            )
            self._send_stream(call, "write_chunk", data, deadline)
            self._send_frame(self._encode({"t": "write_close", "id": call.id}), deadline)
            self._wait(call, deadline)
        except BaseException:
            self._abandon(call)
            raise

    def read_file(self, path: str, *, max_size: int) -> bytes:
        """Return the contents of the regular file ``path`` in the guest.

        Raises:
            AgentRequestError: missing, not a regular file, or larger than ``max_size`` (EFBIG).
            ProtocolError: the guest sent more than ``max_size`` bytes.
            AgentTimeout / AgentError / VMError: as for :meth:`write_file`.
        """
        call = _ReadCall(max_size)
        result = self._request(
            call,
            {"t": "read", "path": path, "max_size": max_size},
            timeout=self._request_timeout + max_size / MIN_TRANSFER_RATE,
        )
        assert isinstance(result, _ReadCall)
        with self._lock:
            return bytes(result.data)

    def set_clock(self, ns: int) -> None:
        """Set the guest's wall clock to ``ns`` nanoseconds since the epoch."""
        self._request(_SimpleCall("set_clock"), {"t": "set_clock", "ns": ns})

    def add_entropy(self, data: bytes) -> None:
        """Mix ``data`` into the guest kernel RNG (and reseed the agent's ``random``)."""
        self._request(_SimpleCall("entropy"), {"t": "entropy"}, data)

    def poweroff(self) -> None:
        """Ask the guest to sync its disks and power off.

        Losing the channel while waiting for the answer counts as success:
        the machine going away is the expected outcome.
        """
        try:
            self._request(_SimpleCall("poweroff"), {"t": "poweroff"})
        except AgentError:
            raise
        except VMError:
            if self._dead is None or self._closing:
                raise

    def close(self) -> None:
        """Close the channel and its socket; pending calls fail with VMError. Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            if self._dead is None:
                self._dead = "agent channel closed"
            self._fail_all(lambda: VMError(f"{self.name}: agent channel closed"))
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(CLOSE_JOIN_TIMEOUT)
        with self._send_lock:
            self._sock.close()

    # -- request plumbing ----------------------------------------------------------

    def _new_id(self) -> int:
        while True:  # skip ids held by attached processes (see attach)
            req_id = self._next_id
            self._next_id = self._next_id + 1 if self._next_id + 1 < proto.MAX_ID else 1
            if req_id not in self._calls:
                return req_id

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise VMError(f"{self.name}: {self._dead}")

    def _check_usable(self) -> None:
        self._check_alive()
        if self._broken is not None:
            raise ProtocolError(f"{self.name}: channel unusable: {self._broken}")

    def _register(self, call: _Call, deadline: float | None) -> None:
        """Give ``call`` a fresh id and file it; waits while a sync is in progress."""
        with self._cond:
            while self._sync is not None:
                self._check_alive()
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: a sync did not finish in time")
                self._cond.wait(remaining)
            self._check_usable()
            call.id = self._new_id()
            self._calls[call.id] = call

    def _abandon(self, call: _Call, *, kill: bool = False) -> None:
        """Forget ``call``; for a running exec, best-effort ``kill`` of its process group."""
        with self._cond:
            if self._calls.get(call.id) is call:
                del self._calls[call.id]
            running = not call.done
            call.fail(AgentError(f"{self.name}: request abandoned"))
            self._cond.notify_all()
        if kill and running and call.id and not self.closed:
            self._send_kill(call.id, _signal.SIGKILL)

    def _send_kill(self, req_id: int, sig: int) -> None:
        try:
            self._send_frame(
                self._encode({"t": "kill", "id": req_id, "signal": int(sig)}),
                _deadline(KILL_SEND_TIMEOUT),
            )
        except (VMError, AgentError) as exc:
            log.warning("%s: could not send kill for %d: %s", self.name, req_id, exc)

    def _wait(self, call: _Call, deadline: float | None) -> None:
        with self._cond:
            while not call.done:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: no answer to {call.kind} in time")
                self._cond.wait(remaining)
            if call.error is not None:
                raise call.error

    def _request(
        self,
        call: _Call,
        header: dict[str, Any],
        payload: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> _Call:
        deadline = _deadline(self._request_timeout if timeout is None else timeout)
        self._register(call, deadline)
        try:
            self._send_frame(self._encode({**header, "id": call.id}, payload), deadline)
            self._wait(call, deadline)
        except BaseException:
            self._abandon(call)
            raise
        return call

    @staticmethod
    def _exec_header(
        req_id: int,
        argv: list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        max_output: int,
        stdin: bytes | None,
    ) -> dict[str, Any]:
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

    def _encode(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
        """Validate and encode a host request; a bad one raises ProtocolError before anything is sent."""
        try:
            proto.validate(header, sender="host")
            return proto.encode_frame(header, payload)
        except proto.ProtocolError as exc:
            raise ProtocolError(f"{self.name}: invalid {header.get('t')} request: {exc}") from exc

    def _send_stream(self, call: _Call, kind: str, data: bytes, deadline: float | None) -> None:
        view = memoryview(data)
        for start in range(0, len(view), proto.CHUNK):
            if call.done:  # the guest already answered (an error): stop streaming
                break
            frame = self._encode({"t": kind, "id": call.id}, view[start : start + proto.CHUNK])
            self._send_frame(frame, deadline)

    def _send_frame(self, data: bytes, deadline: float | None) -> None:
        """Send one whole frame, or nothing, or mark the channel dead (a partial frame)."""
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise AgentTimeout(f"{self.name}: deadline passed before sending")
        if not self._send_lock.acquire(timeout=-1 if remaining is None else remaining):
            raise AgentTimeout(f"{self.name}: channel busy until the deadline")
        try:
            with self._lock:
                self._check_alive()
            view = memoryview(data)
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLOUT)
            while view:
                try:
                    n = self._sock.send(view, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        if len(view) < len(data):
                            self._set_lost(
                                VMError(f"{self.name}: send timed out mid-frame; stream corrupt")
                            )
                        raise AgentTimeout(f"{self.name}: guest not reading the channel") from None
                    slice_s = (
                        SEND_POLL_SLICE if remaining is None else min(remaining, SEND_POLL_SLICE)
                    )
                    poller.poll(slice_s * 1000)
                    with self._lock:
                        self._check_alive()
                    continue
                except OSError as exc:
                    raise VMError(f"{self.name}: channel write failed: {exc}") from exc
                view = view[n:]
        finally:
            self._send_lock.release()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %d bytes: %r", self.name, len(data), data[8:200])

    # -- reader thread ---------------------------------------------------------------

    def _read_loop(self) -> None:
        error: VMError
        try:
            while True:
                try:
                    data = self._sock.recv(RECV_SIZE)
                except OSError as exc:
                    error = VMError(f"{self.name}: agent channel read failed: {exc}")
                    break
                if not data:
                    error = VMError(f"{self.name}: agent channel closed by the guest (EOF)")
                    break
                with self._cond:
                    if self._closing:
                        return
                    self._receive(data)
                    self._cond.notify_all()
        except Exception as exc:  # the reader must never die silently
            log.exception("%s: reader thread failed", self.name)
            error = VMError(f"{self.name}: agent channel reader failed: {exc!r}")
        self._set_lost(error)

    def _set_lost(self, error: VMError) -> None:
        with self._cond:
            if self._dead is not None:
                return
            self._dead = str(error).removeprefix(f"{self.name}: ")
            self._fail_all(lambda: VMError(str(error)))
            self._cond.notify_all()
            callback = None if self._closing else self.on_lost
        log.warning("%s", error)
        if callback is not None:
            try:
                callback(error)
            except Exception:
                log.exception("%s: on_lost callback failed", self.name)

    def _fail_all(
        self, make_error: Callable[[], VMError], keep: Mapping[int, _Call] | None = None
    ) -> None:
        """Fail and forget every pending call but those in ``keep`` (lock held)."""
        for call in self._calls.values():
            if keep is None or keep.get(call.id) is not call:
                call.fail(make_error())
        self._calls = dict(keep or {})

    def _break(self, reason: str) -> None:
        """The guest violated the protocol: fail everything until a successful sync (lock held)."""
        log.error("%s: guest broke protocol: %s", self.name, reason)
        self._broken = f"guest broke protocol: {reason}"
        msg = f"{self.name}: {self._broken}"
        self._fail_all(lambda: ProtocolError(msg))

    def _receive(self, data: bytes) -> None:
        """Feed received bytes through the sync scanner / decoder and dispatch (lock held)."""
        try:
            if self._sync is not None and not self._sync.done:
                rest = self._sync.scan(data)
                if rest is None:
                    return
                log.debug("%s: sync complete", self.name)
                self._broken = None
                self._decoder = proto.FrameDecoder()
                data = rest
            if self._broken is not None:
                return
            self._decoder.feed(data)
            for frame in self._decoder:
                proto.validate_frame(frame, sender="guest")
                self._dispatch(frame)
        except proto.ProtocolError as exc:
            self._break(str(exc))
        except Exception as exc:
            log.exception("%s: failed to process guest data", self.name)
            self._break(f"internal error: {exc!r}")

    def _dispatch(self, frame: proto.Frame) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s (+%d bytes)", self.name, frame.header, len(frame.payload))
        t = frame.type
        if t == "ready":
            if self._ready is not None:
                log.warning("%s: agent sent ready again (restarted?)", self.name)
            self._ready = frame.header
            return
        if t == "sync_ok":
            log.debug("%s: stale sync_ok dropped", self.name)
            return
        call = self._calls.get(frame.id)
        if call is None:
            log.debug("%s: %s for unknown id %d dropped", self.name, t, frame.id)
            return
        try:
            finished = call.on_frame(frame)
        except proto.ProtocolError as exc:
            call.error = ProtocolError(f"{self.name}: {exc}")
            finished = True
        if finished:
            call.done = True
            del self._calls[frame.id]


class AgentProcess:
    """A command started by :meth:`AgentChannel.spawn`, streaming its output.

    Methods are thread-safe. Output is kept (up to ``max_output`` bytes)
    until read; it is available after the process exited too.
    """

    def __init__(self, channel: AgentChannel, call: _ExecCall, argv: list[str]) -> None:
        self._channel = channel
        self._call = call
        self.argv = argv
        self._stdin_closed = False
        self._line = bytearray()

    def __repr__(self) -> str:
        return f"<AgentProcess {self.argv!r} pid={self.pid} returncode={self.returncode}>"

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The process id in the guest (also its process group and session id)."""
        assert self._call.pid is not None
        return self._call.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it exited (negative signal number if killed), else None."""
        return self._call.returncode

    @property
    def timed_out(self) -> bool:
        """True if the guest killed it for exceeding its timeout."""
        return self._call.timed_out

    @property
    def truncated(self) -> bool:
        """True if output beyond ``max_output`` was dropped."""
        return self._call.truncated

    def write_stdin(self, data: bytes, timeout: float | None = REQUEST_TIMEOUT) -> None:
        """Send ``data`` to the process's stdin (dropped by the guest if it already exited).

        Raises:
            ValueError: stdin was closed.
            AgentTimeout / VMError: the channel could not take the data in time.
        """
        if self._stdin_closed:
            raise ValueError("write_stdin() after close_stdin()")
        if self._call.done:
            return
        self._channel._send_stream(self._call, "stdin", data, _deadline(timeout))

    def close_stdin(self) -> None:
        """Signal EOF on the process's stdin. Idempotent."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if not self._call.done:
            ch = self._channel
            ch._send_frame(
                ch._encode({"t": "stdin_eof", "id": self._call.id}), _deadline(REQUEST_TIMEOUT)
            )

    def read(self, timeout: float | None) -> tuple[str, bytes] | None:
        """Return the next output chunk as ``("stdout"|"stderr", data)``, or None after exit.

        Raises:
            AgentTimeout: nothing arrived within ``timeout`` (the process keeps running).
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        cond = self._channel._cond
        with cond:
            while True:
                if self._line:
                    data = bytes(self._line)
                    self._line.clear()
                    return ("stdout", data)
                if self._call.events:
                    return self._call.events.popleft()
                if self._call.done:
                    if self._call.error is not None:
                        raise self._call.error
                    return None
                self._cond_wait(deadline, "output")

    def readline_stdout(self, timeout: float | None) -> bytes:
        """Return the next stdout line including ``b"\\n"``; at exit, the unterminated rest (maybe b"").

        Stderr chunks are left in place for :meth:`read`.

        Raises:
            AgentTimeout: no complete line within ``timeout`` (partial data is kept).
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        cond = self._channel._cond
        with cond:
            while True:
                nl = self._line.find(b"\n")
                if nl >= 0:
                    line = bytes(self._line[: nl + 1])
                    del self._line[: nl + 1]
                    return line
                events = self._call.events
                idx = next((i for i, (s, _) in enumerate(events) if s == "stdout"), None)
                if idx is not None:
                    self._line += events[idx][1]
                    del events[idx]
                    continue
                if self._call.done:
                    if self._call.error is not None:
                        raise self._call.error
                    line = bytes(self._line)
                    self._line.clear()
                    return line
                self._cond_wait(deadline, "a line of output")

    def wait(self, timeout: float | None) -> int:
        """Wait for exit and return the return code (negative signal number if killed).

        Raises:
            AgentTimeout: still running after ``timeout``.
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        with self._channel._cond:
            while not self._call.done:
                self._cond_wait(deadline, "exit")
            if self._call.error is not None:
                raise self._call.error
            assert self._call.returncode is not None
            return self._call.returncode

    def kill(self, signal: int = _signal.SIGKILL) -> None:
        """Send ``signal`` to the process group (no-op once it exited)."""
        if not self._call.done:
            self._channel._send_kill(self._call.id, signal)

    def close(self) -> None:
        """Kill the process if still running and forget it. Idempotent."""
        self._channel._abandon(self._call, kill=True)

    def _cond_wait(self, deadline: float | None, what: str) -> None:
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise AgentTimeout(
                f"{self._channel.name}: timed out waiting for {what} of {self.argv!r}"
            )
        self._channel._cond.wait(remaining)
