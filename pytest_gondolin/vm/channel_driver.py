"""The agent channel's driver: its locks, deadlines and socket, and one request's plumbing.

:class:`ChannelDriver` is the base of :class:`~pytest_gondolin.vm.channel.AgentChannel`
(the public API). It owns a
:class:`~pytest_gondolin.vm.frame_socket.FrameSocket` (the socket and its
reader thread) and the sans-IO
:class:`~pytest_gondolin.vm.channel_core.ChannelCore`, touched only under
the channel's lock; a request is registered (waiting out a sync), sent,
waited for until its deadline and, on any failure, abandoned -- a running
command's process group killed, best effort. The reader thread feeds the
core and wakes every waiter; a lost socket fails every call with
:class:`~pytest_gondolin.errors.VMError`.
"""

from __future__ import annotations

import logging
import signal as _signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pytest_gondolin.errors import AgentError, AgentTimeout, VMError
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.vm.agent_calls import Call
from pytest_gondolin.vm.channel_core import ChannelCore, ChannelState
from pytest_gondolin.vm.frame_socket import FrameSocket

__all__ = [
    "EXEC_GRACE",
    "KILL_SEND_TIMEOUT",
    "REQUEST_TIMEOUT",
    "ChannelDriver",
    "deadline_after",
    "time_left",
]

log = logging.getLogger(__name__)

#: The guest enforces exec timeouts itself; this covers its kill, output drain and TCG slowness.
EXEC_GRACE = 10.0
#: A small request (open, clock, entropy) takes milliseconds; 30 s covers a loaded TCG guest.
REQUEST_TIMEOUT = 30.0
#: Best-effort ``kill`` after a host-side deadline must not block the caller for long.
KILL_SEND_TIMEOUT = 2.0


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline``, negative once it passed (None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


class ChannelDriver:
    """Locks, deadlines, the socket and the request plumbing of an agent channel.

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

    def close(self) -> None:
        """Close the channel and its socket; pending calls fail with VMError. Idempotent."""
        with self._cond:
            if not self._core.close():
                return
            self._cond.notify_all()
        self._socket.close()

    # -- request plumbing ----------------------------------------------------------

    def _register(self, call: Call, deadline: float | None) -> None:
        """Give ``call`` a fresh id and file it; waits while a sync is in progress."""
        with self._cond:
            self._wait_until(
                lambda: self._core.state is not ChannelState.SYNCING,
                deadline,
                "a sync did not finish in time",
            )
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
                deadline_after(KILL_SEND_TIMEOUT),
            )
        except (VMError, AgentError) as exc:
            log.warning("%s: could not send kill for %d: %s", self.name, req_id, exc)

    def _wait_until(
        self,
        done: Callable[[], bool],
        deadline: float | None,
        late: str,
        *,
        check: Callable[[], None] | None = None,
    ) -> None:
        """With the lock held: wait until ``done()``, calling ``check()`` (which may raise)
        before each wait; AgentTimeout naming the channel and ``late`` once ``deadline`` passed."""
        while not done():
            if check is not None:
                check()
            remaining = time_left(deadline)
            if remaining is not None and remaining <= 0:
                raise AgentTimeout(f"{self.name}: {late}")
            self._cond.wait(remaining)

    def _wait(self, call: Call, deadline: float | None) -> None:
        with self._cond:
            self._wait_until(lambda: call.done, deadline, f"no answer to {call.kind} in time")
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
        deadline = deadline_after(self._request_timeout if timeout is None else timeout)
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
        # Not a warning: a call under way fails with this error (and a test's
        # report says its VM died), and a VM closed while a background restore
        # starts its QEMU loses a channel nobody uses (a stray line on the
        # terminal after pytest's summary).
        log.info("%s", error)
        if callback is not None:
            try:
                callback(error)
            except Exception:
                log.exception("%s: on_lost callback failed", self.name)
