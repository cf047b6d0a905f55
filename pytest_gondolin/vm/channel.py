"""Host side of the control channel to the in-guest agent: the public API.

:class:`AgentChannel` drives the protocol of :mod:`pytest_gondolin.guest.protocol`
over a connected stream socket (in QEMU, the host end of a virtio-serial
chardev): the agent's ``ready``, ``sync`` after a restore, commands, files,
the clock and entropy. Its base,
:class:`~pytest_gondolin.vm.channel_driver.ChannelDriver`, owns the locks,
every deadline and a :class:`~pytest_gondolin.vm.frame_socket.FrameSocket`
(the socket and its reader thread); all protocol state -- pending calls,
framing, resync and the channel's lifecycle
(:class:`~pytest_gondolin.vm.channel_core.ChannelState`) -- lives in its
sans-IO :class:`~pytest_gondolin.vm.channel_core.ChannelCore`, touched only
under the channel's lock. The public API is synchronous and thread-safe, so
several threads may run commands at once; a spawned command is an
:class:`~pytest_gondolin.vm.agent_process.AgentProcess`.

Every wait has a deadline. A guest that breaks the protocol breaks the
channel (calls raise :class:`~pytest_gondolin.errors.AgentProtocolError`)
until a successful :meth:`AgentChannel.sync`; a lost socket fails
everything with :class:`~pytest_gondolin.errors.VMError`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
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
    ExecCall,
    RawExecResult,
    ReadCall,
    SimpleCall,
    WriteCall,
)
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.channel_core import ChannelState, exec_header
from pytest_gondolin.vm.channel_driver import (
    EXEC_GRACE,
    REQUEST_TIMEOUT,
    ChannelDriver,
    deadline_after,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "EXEC_GRACE",
    "MIN_TRANSFER_RATE",
    "REQUEST_TIMEOUT",
    "AgentChannel",
]

#: Slowest transfer we still call healthy (TCG guests move several MiB/s); scales file deadlines.
MIN_TRANSFER_RATE = 1 << 20
#: Default cap on stdout+stderr buffered for one command.
DEFAULT_MAX_OUTPUT = 64 << 20


class AgentChannel(ChannelDriver):
    """Synchronous, thread-safe client of the guest agent over a connected stream socket.

    The channel owns ``sock`` (it is closed by :meth:`close`). ``on_lost`` is
    called once, from the reader thread, with the error when the socket hits
    EOF or fails (not after :meth:`close`).
    """

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

    # -- public API --------------------------------------------------------------

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Return the agent's ``ready`` header (received now or earlier).

        Raises:
            AgentTimeout: no ``ready`` within ``timeout``.
            AgentProtocolError: the agent speaks another protocol version, or broke framing.
            VMError: the channel is closed or lost.
        """
        deadline = deadline_after(timeout)
        with self._cond:
            self._wait_until(
                lambda: self._core.ready is not None,
                deadline,
                f"agent not ready within {timeout:g} s",
                check=self._core.check_usable,
            )
            assert self._core.ready is not None
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
        deadline = deadline_after(timeout)
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
                    self._wait_until(
                        lambda: scan.done,
                        deadline,
                        f"agent did not answer sync within {timeout:g} s",
                        check=self._core.check_alive,
                    )
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
        deadline = deadline_after(self._request_timeout)
        call = ExecCall(max_output, streaming=True)
        self._register(call, deadline)
        try:
            header = exec_header(call.id, argv, env, cwd, timeout, max_output, b"")
            self._send_frame(self._core.encode(header), deadline)
            with self._cond:
                self._wait_until(
                    lambda: call.pid is not None or call.done,
                    deadline,
                    f"{argv!r} not started in time",
                )
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
        deadline = deadline_after(self._request_timeout + len(data) / MIN_TRANSFER_RATE)
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

    def bind(self, pairs: list[tuple[str, str]]) -> None:
        """Bind each ``(disk folder, folder)`` pair's disk folder over its folder (``guest/binds.py``).

        Raises AgentRequestError (errno ENOTEMPTY) when a folder holds files.
        """
        self._request(SimpleCall("bind"), {"t": "bind", "pairs": [list(p) for p in pairs]})

    def unpack(self, path: str, folder: str, *, timeout: float) -> None:
        """Unpack the guest's tar file ``path`` at ``/``, remove it, make ``folder`` (``guest/unpack.py``)."""
        self._request(
            SimpleCall("unpack"), {"t": "unpack", "path": path, "folder": folder}, timeout=timeout
        )

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
