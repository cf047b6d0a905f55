"""Commands the agent runs for the host: ``exec``, ``stdin``, ``stdin_eof``, ``kill``.

:class:`Execs` owns the running commands (at most :data:`MAX_EXECS`); each
:class:`Exec` owns its pipes, its output budget and the threads that serve
it. Guarantees, per exec:

* ``started`` precedes its output, ``exit`` follows all of its output, and
  at most ``max_output`` bytes of stdout+stderr are sent.
* The child runs in its own session (so in its own process group), and a
  timeout or ``kill`` signals the whole group.
* Its exit status comes from the :class:`~pytest_gondolin.guest.reaper.Reaper`,
  never from waiting for the pid here.
* When the leader has exited but background processes still hold its
  output pipes open, the exec finishes once the pipes have been silent for
  :data:`OUTPUT_DRAIN_IDLE`; later output of those processes is discarded
  (they keep running, like daemons started from a shell).

Standard library and :mod:`pytest_gondolin.guest` only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping

from pytest_gondolin.guest.agentio import FrameWriter, close_quietly, write_all
from pytest_gondolin.guest.protocol import CHUNK, Frame
from pytest_gondolin.guest.reaper import Reaper
from pytest_gondolin.guest.spawn import check_report, spawn

log = logging.getLogger(__name__)

#: Concurrent execs; each holds 3 threads and ~8 fds, so this bounds agent resources.
MAX_EXECS = 64
#: Stdin bytes queued for a child that is not reading; beyond this, stdin is cut off.
MAX_STDIN_BACKLOG = 64 << 20
#: After the leader exits, pipes silent this long are held only by background processes.
OUTPUT_DRAIN_IDLE = 0.5
#: After a timeout kill, give output readers this long before abandoning the pipes.
KILL_DRAIN_LIMIT = 2.0
#: How often readers re-check a pipe once the leader has exited.
DRAIN_POLL = 0.05


class Exec:
    """One running command: its pipes, output budget and the threads that serve it."""

    def __init__(
        self,
        writer: FrameWriter,
        req_id: int,
        *,
        max_output: int,
        timeout: float | None,
        on_done: Callable[[Exec], None],
    ) -> None:
        self.writer = writer
        self.id = req_id
        self.max_output = max_output
        self.timeout = timeout
        self.on_done = on_done
        self.pid = 0
        # `lock` orders output frames before `exit` and guards the budget.
        self.lock = threading.Lock()
        self.sent = 0
        self.truncated = False
        self.exit_sent = False
        # `cond` guards the lifecycle fields below.
        self.cond = threading.Condition()
        self.returncode: int | None = None
        self.readers_done = 0
        self.timed_out = False
        self.abandon = False
        self.wake_r, self.wake_w = os.pipe()
        self.wake_closed = False
        # Separate from `lock` so the dispatcher never waits behind an output send.
        self.stdin_lock = threading.Lock()
        self.stdin_q: queue.SimpleQueue[bytes | None] | None = None
        self.stdin_closed = False
        self.stdin_backlog = 0

    # -- callbacks from other threads ------------------------------------

    def on_exit(self, returncode: int) -> None:
        """Reaper callback: the leader has exited."""
        with self.cond:
            self.returncode = returncode
            self.cond.notify_all()
            # Under `cond` so the fd cannot be closed (and its number reused) meanwhile.
            if not self.wake_closed:
                with contextlib.suppress(OSError):
                    os.write(self.wake_w, b"x")

    def close_wake(self) -> None:
        """Close the wake pipe once no reader polls it and no exit callback can write it."""
        with self.cond:
            if not self.wake_closed:
                self.wake_closed = True
                close_quietly(self.wake_r, self.wake_w)

    def kill(self, sig: int) -> None:
        """Signal the whole process group; a vanished group is not an error."""
        if self.pid <= 0:
            return  # never started: killpg(0) would signal the agent's own group
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("kill(%d, %d): %s", self.pid, sig, exc)

    def feed_stdin(self, data: bytes) -> None:
        with self.stdin_lock:
            if self.stdin_q is None or self.stdin_closed:
                return
            if self.stdin_backlog + len(data) > MAX_STDIN_BACKLOG:
                log.error("exec %d: child not reading stdin; closing it", self.id)
                self.stdin_closed = True
                self.stdin_q.put(None)
                return
            self.stdin_backlog += len(data)
            self.stdin_q.put(data)

    def close_stdin(self) -> None:
        with self.stdin_lock:
            if self.stdin_q is None or self.stdin_closed:
                return
            self.stdin_closed = True
            self.stdin_q.put(None)

    # -- threads -----------------------------------------------------------

    def start(self, out_r: int, err_r: int, stdin_w: int) -> None:
        threads = [
            threading.Thread(target=self._pump, args=(out_r, "stdout"), daemon=True),
            threading.Thread(target=self._pump, args=(err_r, "stderr"), daemon=True),
            threading.Thread(target=self._supervise, daemon=True),
        ]
        if stdin_w >= 0:
            self.stdin_q = queue.SimpleQueue()
            threads.append(threading.Thread(target=self._write_stdin, args=(stdin_w,), daemon=True))
        for t in threads:
            t.name = f"exec-{self.id}-{t.name}"
            t.start()

    def _forward(self, stream: str, data: bytes) -> None:
        with self.lock:
            if self.exit_sent:
                return
            room = max(self.max_output - self.sent, 0)
            if len(data) > room:
                self.truncated = True
                data = data[:room]
            if data:
                self.sent += len(data)
                self.writer.send({"t": stream, "id": self.id}, data)

    def _reader_done(self) -> None:
        with self.cond:
            self.readers_done += 1
            self.cond.notify_all()

    def _pump(self, fd: int, stream: str) -> None:
        """Forward one output pipe until EOF, or until it falls silent after the leader exit."""
        detached = False
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self.wake_r, select.POLLIN)
            leader_running = True
            idle_since: float | None = None
            while True:
                events = poller.poll(None if leader_running else DRAIN_POLL * 1000)
                readable = False
                for efd, _ in events:
                    if efd == fd:
                        readable = True
                    elif leader_running:
                        poller.unregister(self.wake_r)
                        leader_running = False
                if readable:
                    data = os.read(fd, CHUNK)
                    if not data:
                        return
                    self._forward(stream, data)
                    idle_since = None
                if leader_running:
                    continue
                now = time.monotonic()
                if readable or idle_since is None:
                    idle_since = now
                if self.abandon or now - idle_since >= OUTPUT_DRAIN_IDLE:
                    # Only background processes hold the pipe now: stop forwarding,
                    # but keep draining so they neither block nor get SIGPIPE.
                    detached = True
                    self._reader_done()
                    while os.read(fd, CHUNK):
                        pass
                    return
        except Exception:
            log.exception("exec %d: %s reader failed", self.id, stream)
        finally:
            close_quietly(fd)
            if not detached:
                self._reader_done()

    def _write_stdin(self, fd: int) -> None:
        assert self.stdin_q is not None
        broken = False
        try:
            while True:
                item = self.stdin_q.get()
                if item is None:
                    return
                with self.stdin_lock:
                    self.stdin_backlog -= len(item)
                if broken:
                    continue
                try:
                    write_all(fd, item)
                except OSError:
                    # EPIPE: the child closed its stdin; drop the rest like a shell would.
                    broken = True
        finally:
            close_quietly(fd)

    def _supervise(self) -> None:
        """Enforce the timeout, wait for exit and output, then send ``exit``."""
        try:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            with self.cond:
                while self.returncode is None or self.readers_done < 2:
                    now = time.monotonic()
                    if self.returncode is None:
                        if deadline is None or self.timed_out:
                            self.cond.wait()
                        elif now >= deadline:
                            self.timed_out = True
                            self.kill(signal.SIGKILL)
                        else:
                            self.cond.wait(deadline - now)
                    elif deadline is None:
                        self.cond.wait()
                    else:
                        # Leader gone, output still draining: bounded when a timeout was given.
                        if now >= deadline + KILL_DRAIN_LIMIT:
                            self.abandon = True
                        self.cond.wait(DRAIN_POLL)
                returncode = self.returncode
            with self.lock:
                self.exit_sent = True
                self.writer.send(
                    {
                        "t": "exit",
                        "id": self.id,
                        "returncode": returncode,
                        "timed_out": self.timed_out,
                        "truncated": self.truncated,
                    }
                )
        except Exception:
            log.exception("exec %d: supervisor failed", self.id)
        finally:
            self.close_stdin()
            self.on_done(self)
            self.close_wake()


class Execs:
    """The running commands, by request id, and the handlers that act on them."""

    def __init__(self, writer: FrameWriter, reaper: Reaper) -> None:
        self.writer = writer
        self.reaper = reaper
        self._execs: dict[int, Exec] = {}
        self._lock = threading.Lock()

    def kill_all(self) -> None:
        """SIGKILL every running command's process group."""
        with self._lock:
            execs = list(self._execs.values())
        for ex in execs:
            ex.kill(signal.SIGKILL)

    def _finished(self, ex: Exec) -> None:
        with self._lock:
            if self._execs.get(ex.id) is ex:
                del self._execs[ex.id]

    def _get(self, frame: Frame) -> Exec | None:
        with self._lock:
            ex = self._execs.get(frame.id)
        if ex is None:
            # Normal when a command exits before reading all of its stdin.
            log.debug("%s for finished or unknown exec %d ignored", frame.type, frame.id)
        return ex

    def start(self, frame: Frame) -> None:
        """``exec``: start the command, reply ``started`` (or raise OSError for ``error``)."""
        h = frame.header
        with self._lock:
            if frame.id in self._execs:
                raise OSError(errno.EEXIST, f"exec id {frame.id} is already running")
            if len(self._execs) >= MAX_EXECS:
                raise OSError(errno.EAGAIN, f"too many concurrent execs (limit {MAX_EXECS})")
        argv: list[str] = h["argv"]
        env: Mapping[str, str] = dict(os.environ) if h["env"] is None else h["env"]
        ex = Exec(
            self.writer,
            frame.id,
            max_output=h["max_output"],
            timeout=h["timeout"],
            on_done=self._finished,
        )
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            if h["stdin"]:
                stdin_r, stdin_w = os.pipe()
                fds += [stdin_r, stdin_w]
            else:
                stdin_r, stdin_w = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1
                fds.append(stdin_r)
            report_r, report_w = os.pipe()
            fds += [report_r, report_w]
            pid = spawn(
                argv,
                env,
                h["cwd"],
                stdin_fd=stdin_r,
                out_w=out_w,
                err_w=err_w,
                report_w=report_w,
                reaper=self.reaper,
                on_exit=ex.on_exit,
            )
            ex.pid = pid
            for fd in (out_w, err_w, stdin_r, report_w):
                fds.remove(fd)
                os.close(fd)
            check_report(report_r, cwd=h["cwd"], prog=argv[0])
        except BaseException:
            close_quietly(*fds)
            ex.close_wake()
            raise
        fds.remove(report_r)
        os.close(report_r)
        with self._lock:
            self._execs[frame.id] = ex
        self.writer.send({"t": "started", "id": frame.id, "pid": pid})
        ex.start(out_r, err_r, stdin_w)

    def stdin(self, frame: Frame) -> None:
        """``stdin``: queue the payload for the command's stdin."""
        ex = self._get(frame)
        if ex is not None and frame.payload:
            ex.feed_stdin(frame.payload)

    def stdin_eof(self, frame: Frame) -> None:
        """``stdin_eof``: close the command's stdin once the queue is written."""
        ex = self._get(frame)
        if ex is not None:
            ex.close_stdin()

    def kill(self, frame: Frame) -> None:
        """``kill``: signal the command's process group."""
        ex = self._get(frame)
        if ex is not None:
            ex.kill(frame.header["signal"])
