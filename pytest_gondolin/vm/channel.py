"""Host side of the control channel to the in-guest agent: the threaded driver.

:class:`AgentChannel` drives the protocol of :mod:`pytest_gondolin.guest.protocol`
over a connected stream socket (in QEMU, the host end of a virtio-serial
chardev). It owns the locks and every deadline, and a
:class:`~pytest_gondolin.vm.frame_socket.FrameSocket` (the socket and its
reader thread); all protocol state -- pending calls, framing, resync and the
channel's lifecycle (:class:`~pytest_gondolin.vm.channel_core.ChannelState`)
-- lives in its sans-IO :class:`~pytest_gondolin.vm.channel_core.ChannelCore`,
touched only under the channel's lock. The public API is synchronous and
thread-safe, so several threads may run commands at once; a spawned command
is an :class:`~pytest_gondolin.vm.agent_process.AgentProcess`.

Every wait has a deadline. A guest that breaks the protocol breaks the
channel (calls raise :class:`~pytest_gondolin.errors.AgentProtocolError`)
until a successful :meth:`AgentChannel.sync`; a lost socket fails
everything with :class:`~pytest_gondolin.errors.VMError`.
"""

from __future__ import annotations

import logging
import signal as _signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from pytest_gondolin.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    ExecTimeout,
    VMError,
)
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.vm.agent_calls import (
    Call,
    ExecCall,
    RawExecResult,
    ReadCall,
    SimpleCall,
    WriteCall,
)
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.channel_core import ChannelCore, ChannelState, exec_header
from pytest_gondolin.vm.frame_socket import FrameSocket

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "EXEC_GRACE",
    "MIN_TRANSFER_RATE",
    "REQUEST_TIMEOUT",
    "AgentChannel",
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
#: Best-effort ``kill`` after a host-side deadline must not block the caller for long.
KILL_SEND_TIMEOUT = 2.0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()
        self._core = ChannelCore(name)  # guarded by _lock
        self._socket = FrameSocket(
            sock,
            name=name,
            on_data=self._on_data,
            on_lost=self._set_lost,
            check_alive=self._check_alive,
        )

    def __repr__(self) -> str:
        return f"<AgentChannel {self.name} {self.state.value}>"

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
    def state(self) -> ChannelState:
        """Where the channel is in its lifecycle (see :mod:`pytest_gondolin.vm.channel_core`)."""
        return self._core.state

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the socket was lost."""
        return self._core.gone

    @property
    def condition(self) -> threading.Condition:
        """The channel's lock, notified whenever a call changes (for AgentProcess)."""
        return self._cond

    # -- public API --------------------------------------------------------------

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Return the agent's ``ready`` header (received now or earlier).

        Raises:
            AgentTimeout: no ``ready`` within ``timeout``.
            AgentProtocolError: the agent speaks another protocol version, or broke framing.
            VMError: the channel is closed or lost.
        """
        deadline = _deadline(timeout)
        with self._cond:
            while self._core.ready is None:
                self._core.check_usable()
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: agent not ready within {timeout:g} s")
                self._cond.wait(remaining)
            ready = dict(self._core.ready)
        if ready["version"] != proto.PROTOCOL_VERSION:
            raise AgentProtocolError(
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
            with self._cond:
                self._core.check_alive()
                request, scan = self._core.start_sync(
                    [proc.call for proc in preserve], entropy=entropy, clock_ns=clock_ns
                )
            try:
                self._send_frame(request, deadline)
                with self._cond:
                    while not scan.done:
                        self._core.check_alive()
                        remaining = _remaining(deadline)
                        if remaining is not None and remaining <= 0:
                            raise AgentTimeout(
                                f"{self.name}: agent did not answer sync within {timeout:g} s"
                            )
                        self._cond.wait(remaining)
            finally:
                with self._cond:
                    self._core.finish_sync()
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
            AgentProtocolError: a bad request or a guest protocol violation.
            AgentError / VMError: state reset by :meth:`sync`, channel lost or closed.
        """
        argv = list(argv)
        deadline = None if timeout is None else time.monotonic() + timeout + self._exec_grace
        call = ExecCall(max_output, streaming=False)
        self._register(call, deadline)
        try:
            self._send_frame(
                self._core.encode(exec_header(call.id, argv, env, cwd, timeout, max_output, input)),
                deadline,
            )
            if input is not None:
                self.send_stdin(call, input, deadline)
                self.send_stdin_eof(call, deadline)
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
            AgentProtocolError / AgentError / VMError: as for :meth:`exec`.
        """
        argv = list(argv)
        deadline = _deadline(self._request_timeout)
        call = ExecCall(max_output, streaming=True)
        self._register(call, deadline)
        try:
            header = exec_header(call.id, argv, env, cwd, timeout, max_output, b"")
            self._send_frame(self._core.encode(header), deadline)
            with self._cond:
                while call.pid is None and not call.done:
                    remaining = _remaining(deadline)
                    if remaining is not None and remaining <= 0:
                        raise AgentTimeout(f"{self.name}: {argv!r} not started in time")
                    self._cond.wait(remaining)
                if call.error is not None:
                    raise call.error
                if call.pid is None:
                    raise AgentProtocolError(f"{self.name}: guest sent 'exit' before 'started'")
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
        call = ExecCall(max_output, streaming=True, pid=process.call.pid)
        with self._cond:
            self._core.check_alive()
            self._core.attach(call, process.call.id)
        return AgentProcess(self, call, list(process.argv))

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Atomically create or replace ``path`` in the guest (parents created) with ``data``.

        Raises:
            GuestFileError: the guest could not write it; an OSError subclass
                by errno (``GuestPermissionError``, ...) whose ``filename`` is ``path``.
            AgentTimeout: not done within ``REQUEST_TIMEOUT`` plus size / ``MIN_TRANSFER_RATE``.
            AgentProtocolError / AgentError / VMError: as for :meth:`exec`.
        """
        deadline = _deadline(self._request_timeout + len(data) / MIN_TRANSFER_RATE)
        call = WriteCall(path)
        self._register(call, deadline)
        try:
            self._send_frame(
                self._core.encode({"t": "write_open", "id": call.id, "path": path, "mode": mode}),
                deadline,
            )
            self._send_stream(call, "write_chunk", data, deadline)
            self._send_frame(self._core.encode({"t": "write_close", "id": call.id}), deadline)
            self._wait(call, deadline)
        except BaseException:
            self._abandon(call)
            raise

    def read_file(self, path: str, *, max_size: int) -> bytes:
        """Return the contents of the regular file ``path`` in the guest.

        Raises:
            GuestFileError: missing (``GuestFileNotFoundError``), a folder
                (``GuestIsADirectoryError``), not a regular file (EINVAL) or
                larger than ``max_size`` (EFBIG); an OSError whose ``filename`` is ``path``.
            AgentProtocolError: the guest sent more than ``max_size`` bytes.
            AgentTimeout / AgentError / VMError: as for :meth:`write_file`.
        """
        call = ReadCall(max_size, path=path)
        self._request(
            call,
            {"t": "read", "path": path, "max_size": max_size},
            timeout=self._request_timeout + max_size / MIN_TRANSFER_RATE,
        )
        with self._lock:
            return bytes(call.data)

    def set_clock(self, ns: int) -> None:
        """Set the guest's wall clock to ``ns`` nanoseconds since the epoch."""
        self._request(SimpleCall("set_clock"), {"t": "set_clock", "ns": ns})

    def add_entropy(self, data: bytes) -> None:
        """Mix ``data`` into the guest kernel RNG (and reseed the agent's ``random``)."""
        self._request(SimpleCall("entropy"), {"t": "entropy"}, data)

    def poweroff(self) -> None:
        """Ask the guest to sync its disks and power off.

        Losing the channel while waiting for the answer counts as success:
        the machine going away is the expected outcome.
        """
        try:
            self._request(SimpleCall("poweroff"), {"t": "poweroff"})
        except AgentError:
            raise
        except VMError:
            if self._core.state is not ChannelState.LOST:
                raise

    def close(self) -> None:
        """Close the channel and its socket; pending calls fail with VMError. Idempotent."""
        with self._cond:
            if not self._core.close():
                return
            self._cond.notify_all()
        self._socket.close()

    # -- for AgentProcess (see agent_process.ProcessLink) -------------------------------

    def send_stdin(self, call: ExecCall, data: bytes, deadline: float | None) -> None:
        """Stream ``data`` to the stdin of ``call``'s process, in protocol-sized chunks."""
        self._send_stream(call, "stdin", data, deadline)

    def send_stdin_eof(self, call: ExecCall, deadline: float | None) -> None:
        """Close the stdin of ``call``'s process."""
        self._send_frame(self._core.encode({"t": "stdin_eof", "id": call.id}), deadline)

    def send_signal(self, call: ExecCall, signal: int) -> None:
        """Best effort: send ``signal`` to ``call``'s process group (failures are logged)."""
        self._send_kill(call.id, signal)

    def abandon(self, call: ExecCall) -> None:
        """Forget ``call``, killing its process group if it still runs."""
        self._abandon(call, kill=True)

    # -- request plumbing ----------------------------------------------------------

    def _register(self, call: Call, deadline: float | None) -> None:
        """Give ``call`` a fresh id and file it; waits while a sync is in progress."""
        with self._cond:
            while self._core.state is ChannelState.SYNCING:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: a sync did not finish in time")
                self._cond.wait(remaining)
            self._core.check_usable()
            self._core.register(call)

    def _abandon(self, call: Call, *, kill: bool = False) -> None:
        """Forget ``call``; for a running exec, best-effort ``kill`` of its process group."""
        with self._cond:
            self._core.forget(call)
            running = not call.done
            call.fail(AgentError(f"{self.name}: request abandoned"))
            self._cond.notify_all()
        if kill and running and call.id and not self.closed:
            self._send_kill(call.id, _signal.SIGKILL)

    def _send_kill(self, req_id: int, sig: int) -> None:
        try:
            self._send_frame(
                self._core.encode({"t": "kill", "id": req_id, "signal": int(sig)}),
                _deadline(KILL_SEND_TIMEOUT),
            )
        except (VMError, AgentError) as exc:
            log.warning("%s: could not send kill for %d: %s", self.name, req_id, exc)

    def _wait(self, call: Call, deadline: float | None) -> None:
        with self._cond:
            while not call.done:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise AgentTimeout(f"{self.name}: no answer to {call.kind} in time")
                self._cond.wait(remaining)
            if call.error is not None:
                raise call.error

    def _send_stream(self, call: Call, kind: str, data: bytes, deadline: float | None) -> None:
        view = memoryview(data)
        for start in range(0, len(view), proto.CHUNK):
            if call.done:  # the guest already answered (an error): stop streaming
                break
            frame = self._core.encode({"t": kind, "id": call.id}, view[start : start + proto.CHUNK])
            self._send_frame(frame, deadline)

    def _request(
        self,
        call: Call,
        header: dict[str, Any],
        payload: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> None:
        deadline = _deadline(self._request_timeout if timeout is None else timeout)
        self._register(call, deadline)
        try:
            self._send_frame(self._core.encode({**header, "id": call.id}, payload), deadline)
            self._wait(call, deadline)
        except BaseException:
            self._abandon(call)
            raise

    # -- the socket's callbacks ---------------------------------------------------------

    def _send_frame(self, data: bytes, deadline: float | None) -> None:
        self._socket.send(data, deadline)

    def _check_alive(self) -> None:
        with self._lock:
            self._core.check_alive()

    def _on_data(self, data: bytes) -> bool:
        """Reader thread: feed ``data`` to the core; False once the channel is closed."""
        with self._cond:
            if self._core.state is ChannelState.CLOSED:
                return False
            self._core.receive_data(data)
            self._cond.notify_all()
        return True

    def _set_lost(self, error: VMError) -> None:
        with self._cond:
            if not self._core.lose(error):
                return
            self._cond.notify_all()
            callback = self.on_lost
        log.warning("%s", error)
        if callback is not None:
            try:
                callback(error)
            except Exception:
                log.exception("%s: on_lost callback failed", self.name)
