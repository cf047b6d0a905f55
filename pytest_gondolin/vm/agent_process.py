"""A handle on one command running in the guest, streaming its stdin and output.

:class:`AgentProcess` is what ``AgentChannel.spawn`` / ``attach`` return.
Its state is the :class:`~pytest_gondolin.vm.agent_calls.ExecCall` it
wraps (``PENDING -> RUNNING -> DONE | FAILED``, rewound to RUNNING by a
sync that preserves it); this module adds the waiting, under the lock of
the channel that drives it. It knows that channel only through the small
:class:`ProcessLink` interface, so it imports nothing of the driver.
"""

from __future__ import annotations

import signal as _signal
import threading
import time
from types import TracebackType
from typing import Protocol

from pytest_gondolin.errors import AgentTimeout
from pytest_gondolin.vm.agent_calls import ExecCall

__all__ = ["STDIN_TIMEOUT", "AgentProcess", "ProcessLink"]

#: Sending stdin or its EOF is a small request; 30 s covers a loaded TCG guest.
STDIN_TIMEOUT = 30.0


class ProcessLink(Protocol):
    """What a process handle needs from the channel that drives it."""

    name: str

    @property
    def condition(self) -> threading.Condition:
        """The channel's lock, notified whenever a call changes."""
        ...

    def send_stdin(self, call: ExecCall, data: bytes, deadline: float | None) -> None: ...

    def send_stdin_eof(self, call: ExecCall, deadline: float | None) -> None: ...

    def send_signal(self, call: ExecCall, signal: int) -> None: ...

    def abandon(self, call: ExecCall) -> None: ...


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class AgentProcess:
    """A command started by ``AgentChannel.spawn``, streaming its output.

    Methods are thread-safe. Output is kept (up to ``max_output`` bytes)
    until read; it is available after the process exited too.
    """

    def __init__(self, link: ProcessLink, call: ExecCall, argv: list[str]) -> None:
        self._link = link
        self._call = call
        self.argv = argv
        self._stdin_closed = False

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
    def call(self) -> ExecCall:
        """The request behind this process (for the channel: sync and attach use it)."""
        return self._call

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

    def write_stdin(self, data: bytes, timeout: float | None = STDIN_TIMEOUT) -> None:
        """Send ``data`` to the process's stdin (dropped by the guest if it already exited).

        Raises:
            ValueError: stdin was closed.
            AgentTimeout / VMError: the channel could not take the data in time.
        """
        if self._stdin_closed:
            raise ValueError("write_stdin() after close_stdin()")
        if self._call.done:
            return
        self._link.send_stdin(self._call, data, _deadline(timeout))

    def close_stdin(self) -> None:
        """Signal EOF on the process's stdin. Idempotent."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if not self._call.done:
            self._link.send_stdin_eof(self._call, _deadline(STDIN_TIMEOUT))

    def read(self, timeout: float | None) -> tuple[str, bytes] | None:
        """Return the next output chunk as ``("stdout"|"stderr", data)``, or None after exit.

        Raises:
            AgentTimeout: nothing arrived within ``timeout`` (the process keeps running).
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        with self._link.condition:
            while True:
                chunk = self._call.take_chunk()
                if chunk is not None:
                    return chunk
                if self._call.done:
                    if self._call.error is not None:
                        raise self._call.error
                    return None
                self._wait(deadline, "output")

    def readline_stdout(self, timeout: float | None) -> bytes:
        """Return the next stdout line including ``b"\\n"``; at exit, the unterminated rest (maybe b"").

        Stderr chunks are left in place for :meth:`read`.

        Raises:
            AgentTimeout: no complete line within ``timeout`` (partial data is kept).
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        with self._link.condition:
            while True:
                line = self._call.take_line()
                if line is not None:
                    return line
                if self._call.done:
                    if self._call.error is not None:
                        raise self._call.error
                    return self._call.take_rest()
                self._wait(deadline, "a line of output")

    def wait(self, timeout: float | None) -> int:
        """Wait for exit and return the return code (negative signal number if killed).

        Raises:
            AgentTimeout: still running after ``timeout``.
            AgentError / VMError: the request was reset or the channel lost.
        """
        deadline = _deadline(timeout)
        with self._link.condition:
            while not self._call.done:
                self._wait(deadline, "exit")
            if self._call.error is not None:
                raise self._call.error
            assert self._call.returncode is not None
            return self._call.returncode

    def kill(self, signal: int = _signal.SIGKILL) -> None:
        """Send ``signal`` to the process group (no-op once it exited)."""
        if not self._call.done:
            self._link.send_signal(self._call, signal)

    def close(self) -> None:
        """Kill the process if still running and forget it. Idempotent."""
        self._link.abandon(self._call)

    def _wait(self, deadline: float | None, what: str) -> None:
        """Wait on the channel's condition (held) until notified or ``deadline``."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise AgentTimeout(f"{self._link.name}: timed out waiting for {what} of {self.argv!r}")
        self._link.condition.wait(remaining)
