"""Byte pipes to a test worker: the :class:`~.worker_transport.WorkerTransport` implementations.

* :class:`SubprocessTransport` -- a worker in a local child process (the
  test suite's router in ``tests/plugin/_local_worker.py`` uses it);
* :class:`VMTransport` -- a worker in a guest, as a process of the guest
  agent (:meth:`~pytest_gondolin.vm.machine.VM.spawn`).

Both honour the contract in :mod:`.worker_transport`'s docstring: bounded lines,
bounded stderr tails, ``kill`` idempotent and never raising.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Final

from pytest_gondolin.errors import AgentError, AgentTimeout, GondolinError, VMError
from pytest_gondolin.guest.worker import MAX_WORKER_LINE, WORKER_MODULE

if TYPE_CHECKING:  # annotations only: a local worker needs no VM code
    from pytest_gondolin.vm.agent_process import AgentProcess
    from pytest_gondolin.vm.machine import VM

__all__ = ["SubprocessTransport", "VMTransport", "worker_command"]

log = logging.getLogger(__name__)

#: Bytes of a local worker's stderr kept for crash reports and stack dumps.
STDERR_TAIL_BYTES: Final = 64 * 1024
#: Bytes of a guest worker's stderr kept for crash reports (the agent
#: already bounds each chunk; a guest's tracebacks are short).
VM_STDERR_TAIL_BYTES: Final = 16 * 1024
#: Most seconds the guest gets to take the request for a stack dump (a ``kill``
#: run by its agent: well under a second under TCG); the client asks with no
#: more than the test's own timeout.
INTERRUPT_TIMEOUT: Final = 10.0
#: ... and at least this long, so a test of a tiny timeout still gets its dump (an
#: exec under TCG on a loaded host takes up to ~1 s).
MIN_INTERRUPT_TIMEOUT: Final = 3.0
#: How long a killed local worker gets to be reaped.
EXIT_WAIT: Final = 5.0


# --------------------------------------------------------------------------
# a worker in a local subprocess
# --------------------------------------------------------------------------


def worker_command(args: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The argv that starts a worker with pytest arguments *args*."""
    return [python, "-m", WORKER_MODULE, *args]


class SubprocessTransport:
    """:class:`WorkerTransport` over a local child process with pipes.

    The child runs in its own session, so :meth:`kill` also ends whatever
    the tests started.  stdout lines are handed over by a reader thread
    (one line in flight: a worker cannot make the host buffer more than
    about three maximum-size lines); stderr is drained by another thread
    into a tail buffer of ``tail_bytes``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_line: int = MAX_WORKER_LINE,
        tail_bytes: int = STDERR_TAIL_BYTES,
    ) -> None:
        self.argv = list(argv)
        self._max_line = max_line
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        self._lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._eof = False
        self._closing = threading.Event()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(f"cannot start test worker {self.argv[0]!r}: {exc}") from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._read_stdout,
                args=(self._proc.stdout,),
                name="gondolin-worker-out",
                daemon=True,
            ),
            threading.Thread(
                target=self._drain_stderr,
                args=(self._proc.stderr,),
                name="gondolin-worker-err",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        log.debug("started worker pid %d: %s", self._proc.pid, self.argv)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _put(self, item: bytes | None) -> bool:
        while not self._closing.is_set():
            try:
                self._lines.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_stdout(self, stream: IO[bytes]) -> None:
        try:
            while True:
                line = stream.readline(self._max_line + 1)
                if not line:
                    break
                if not self._put(line) or not line.endswith(b"\n"):
                    return  # closing, oversized or cut short: stop reading
        except (OSError, ValueError):
            pass
        finally:
            self._put(None)

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        read = getattr(stream, "read1", stream.read)
        try:
            while chunk := read(65536):
                with self._tail_lock:
                    self._tail += chunk
                    del self._tail[: -self._tail_bytes]
        except (OSError, ValueError):
            pass

    def send(self, data: bytes, timeout: float | None = None) -> None:
        # A local worker is the host's own process, not a guest: no send deadline.
        del timeout
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(data)  # OSError (BrokenPipeError) means the worker is gone
        stdin.flush()

    def recv_line(self, timeout: float) -> bytes | None:
        if self._eof:
            return None
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from the worker within {timeout:g}s") from None
        if line is None:
            self._eof = True
        return line

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self, timeout: float) -> str | None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGUSR1)
        return None

    def kill(self) -> None:
        self._closing.set()
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                self._proc.kill()
        try:
            self._proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("test worker pid %d did not die after SIGKILL", self._proc.pid)
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        for thread in self._threads:
            # A grandchild that left the session and holds stderr open keeps
            # the drain thread alive; it is a daemon, so do not wait long.
            thread.join(timeout=0.5)
        if not self._threads[1].is_alive() and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()

    def stderr_tail(self) -> str:
        with self._tail_lock:
            return self._tail.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# a worker in a guest
# --------------------------------------------------------------------------


class VMTransport:
    """The worker's stdin/stdout over the guest agent: a guest process of ``vm``."""

    def __init__(self, vm: VM, proc: AgentProcess) -> None:
        self.vm = vm
        self.proc = proc
        self._buf = bytearray()
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0

    def rewind(self) -> None:
        """Forget buffered output and the stderr tail: the guest was restored to a snapshot."""
        self._buf.clear()
        self._stderr.clear()
        self._stderr_size = 0

    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Send within ``timeout`` (``None``: the process's ``STDIN_TIMEOUT``); TimeoutError
        if the guest took nothing more by then (it stopped reading its channel)."""
        try:
            if timeout is None:
                self.proc.write_stdin(data)
            else:
                self.proc.write_stdin(data, timeout)
        except AgentTimeout as exc:
            raise TimeoutError(str(exc)) from exc

    def _take(self, chunk: tuple[str, bytes]) -> None:
        """Route one output chunk: stdout to the line buffer, stderr to the bounded tail."""
        stream, data = chunk
        if stream == "stdout":
            self._buf += data
            return
        self._stderr.append(data)
        self._stderr_size += len(data)
        while self._stderr_size > VM_STDERR_TAIL_BYTES and len(self._stderr) > 1:
            self._stderr_size -= len(self._stderr.popleft())

    def _pop(self, size: int) -> bytes:
        line = bytes(self._buf[:size])
        del self._buf[:size]
        return line

    def recv_line(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                return self._pop(nl + 1)
            if len(self._buf) > MAX_WORKER_LINE:
                return self._pop(len(self._buf))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from the guest worker within {timeout:g} s")
            try:
                chunk = self.proc.read(remaining)
            except AgentTimeout as exc:
                raise TimeoutError(str(exc)) from exc
            if chunk is None:
                return self._pop(len(self._buf)) if self._buf else None
            self._take(chunk)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except (AgentError, VMError):
            return None

    def interrupt(self, timeout: float) -> str | None:
        bound = max(min(timeout, INTERRUPT_TIMEOUT), MIN_INTERRUPT_TIMEOUT)
        failed: list[GondolinError] = []
        done = threading.Event()

        def ask() -> None:
            try:
                self.vm.exec(["kill", "-USR1", str(self.proc.pid)], timeout=bound)
            except GondolinError as exc:
                failed.append(exc)
            finally:
                done.set()

        # exec's own host-side deadline adds EXEC_GRACE (10 s) to ``bound``: a guest
        # that stopped reading is left to it in the background (the lane's restore
        # or close ends it), and the run goes on after ``bound`` (red team round 3).
        threading.Thread(target=ask, name=f"{self.vm.name}-interrupt", daemon=True).start()
        if not done.wait(bound):
            return f"the guest did not take the request for a stack dump within {bound:g} s"
        if failed:
            log.debug("could not ask the worker for a stack dump: %s", failed[0])
            return f"the guest did not take the request for a stack dump ({failed[0]})"
        return None

    def kill(self) -> None:
        try:
            self.proc.kill(signal.SIGKILL)
        except GondolinError as exc:
            log.debug("could not kill the worker: %s", exc)

    def stderr_tail(self) -> str:
        # Take in what already arrived (without waiting), so a report has the latest stderr.
        while True:
            try:
                chunk = self.proc.read(0)
            except (AgentError, VMError):
                break
            if chunk is None:
                break
            self._take(chunk)
        return b"".join(self._stderr).decode(errors="replace")
