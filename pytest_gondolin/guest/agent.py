"""The in-guest agent: runs commands and moves files for the host (stdlib only).

In the guest it is PID 1 (``python3 -m pytest_gondolin.guest.agent --device
/dev/virtio-ports/org.gondolin.agent``); in tests it serves an inherited,
already-connected socket (``--fd N``). It imports nothing from the host
package except the shared :mod:`pytest_gondolin.guest.protocol`.

Guarantees:

* The agent never dies on a bad request: it answers ``error`` and keeps
  serving. A malformed frame is logged to stderr and the receive buffer is
  discarded; the host resynchronises with ``sync``.
* Frames never interleave (one lock around every write to the channel).
* For each exec: ``started`` precedes its output, ``exit`` follows all of
  its output, and at most ``max_output`` bytes of stdout+stderr are sent.
* Every child runs in its own session (so in its own process group), and
  a timeout or ``kill`` signals the whole group.
* As PID 1 it reaps every orphan. Children are never waited for
  individually (``subprocess`` would race with the reaper and report bogus
  statuses); one reaper thread owns ``waitpid(-1)`` and hands statuses to
  the exec that registered the pid.
* An exec whose leader has exited but whose output pipes are still held
  open by background processes finishes once the pipes have been silent
  for ``OUTPUT_DRAIN_IDLE``; later output of those processes is discarded
  (they keep running, like daemons started from a shell).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import glob
import logging
import os
import queue
import random
import select
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pytest_gondolin.guest.protocol import (
    CHUNK,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    validate_frame,
)

log = logging.getLogger("pytest_gondolin.guest.agent")

#: Concurrent execs; each holds 3 threads and ~8 fds, so this bounds agent resources.
MAX_EXECS = 64
#: Concurrent unfinished write_file transfers (each holds an open temp file).
MAX_WRITES = 64
#: Stdin bytes queued for a child that is not reading; beyond this, stdin is cut off.
MAX_STDIN_BACKLOG = 64 << 20
#: After the leader exits, pipes silent this long are held only by background processes.
OUTPUT_DRAIN_IDLE = 0.5
#: After a timeout kill, give output readers this long before abandoning the pipes.
KILL_DRAIN_LIMIT = 2.0
#: How often readers re-check a pipe once the leader has exited.
DRAIN_POLL = 0.05
#: virtio-serial reads return EOF while no host is connected; re-check this often.
DISCONNECTED_POLL = 0.05
#: With no children the reaper sleeps; forks wake it, this is only a safety net
#: (long: each wake-up is Python work that also lands in restores under TCG).
REAPER_IDLE_WAIT = 60.0
#: How long to wait for the virtio port to appear (modules may still be loading).
DEVICE_WAIT = 30.0
#: Bytes per read from the channel.
READ_SIZE = 256 << 10
#: Longest error message sent (keeps the header far below MAX_HEADER).
MAX_MESSAGE = 2000

# linux/random.h: _IOW('R', 0x03, int[2]); adds bytes to the pool and credits entropy.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# linux/reboot.h
RB_POWER_OFF = 0x4321FEDC
# linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


def _errno_of(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) and exc.errno else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Channel:
    """The agent's end of the control channel: serialised frame writes."""

    def __init__(self, fd: int, *, device: bool) -> None:
        self.fd = fd
        self.device = device
        self._lock = threading.Lock()
        #: Set when a write failed in --fd mode (the host is gone); the agent exits.
        self.failed = threading.Event()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Send one frame atomically; return False (and log) if it could not be sent."""
        try:
            data = encode_frame(header, payload)
        except ProtocolError as exc:
            log.error("cannot encode %s: %s", header.get("t"), exc)
            return False
        with self._lock:
            try:
                _write_all(self.fd, data)
            except OSError as exc:
                log.warning("channel write failed: %s", exc)
                if not self.device:
                    self.failed.set()
                return False
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s (+%d bytes)", header, len(payload))
        return True

    def error(self, req_id: int, message: str, err: int | None = None) -> None:
        self.send({"t": "error", "id": req_id, "message": message[:MAX_MESSAGE], "errno": err})


class _Reaper:
    """Owns ``waitpid(-1)``: dispatches exit codes to registered pids, discards orphans."""

    def __init__(self) -> None:
        #: Held across fork+register so a fast-exiting child is never mistaken for an orphan.
        self.lock = threading.Lock()
        self._waiters: dict[int, Callable[[int], None]] = {}
        self._wake = threading.Event()

    def register(self, pid: int, callback: Callable[[int], None]) -> None:
        """Register ``callback(returncode)``; the caller must hold :attr:`lock`."""
        self._waiters[pid] = callback
        self._wake.set()

    def run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._wake.wait(REAPER_IDLE_WAIT)
                self._wake.clear()
                continue
            except Exception:
                log.exception("waitpid failed")
                time.sleep(REAPER_IDLE_WAIT)
                continue
            with self.lock:
                callback = self._waiters.pop(pid, None)
            if callback is None:
                log.debug("reaped orphan %d (status %#x)", pid, status)
                continue
            try:
                callback(os.waitstatus_to_exitcode(status))
            except Exception:
                log.exception("exit callback for pid %d failed", pid)


def _exec_candidates(prog: str, env: Mapping[str, str]) -> list[str]:
    """Paths to try for ``prog``, in execvp(3) order."""
    if "/" in prog:
        return [prog]
    path = env.get("PATH", os.defpath)
    return [os.path.join(d or ".", prog) for d in path.split(":")]


def _child(
    *,
    stdin_fd: int,
    out_w: int,
    err_w: int,
    report_w: int,
    cwd: str | None,
    candidates: list[str],
    argv: list[str],
    env: Mapping[str, str],
) -> NoReturn:
    """Runs in the forked child: set up and execve, or report errno on ``report_w``.

    Only async-signal-tolerant work happens here (no locks, logging or imports).
    """
    stage, err = b"X", 0
    try:
        os.setsid()
        if cwd is not None:
            stage = b"C"
            os.chdir(cwd)
        stage = b"X"
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive execve.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        stage, err = b"E", errno.ENOENT
        for path in candidates:
            try:
                os.execve(path, argv, env)
            except OSError as exc:
                # Like execvp(3): keep searching past ENOENT/ENOTDIR, but report
                # the first real failure (EACCES, ENOEXEC, ...) rather than a later ENOENT.
                if err == errno.ENOENT and exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    err = exc.errno or errno.ENOEXEC
    except OSError as exc:
        err = exc.errno or 0
    except BaseException:
        pass
    try:
        os.write(report_w, stage + struct.pack(">i", err))
    finally:
        os._exit(127)


def _spawn(
    candidates: list[str],
    argv: list[str],
    env: Mapping[str, str],
    stdin_fd: int,
    out_w: int,
    err_w: int,
) -> int:
    """posix_spawn (vfork-based in glibc) the first runnable candidate; return its pid.

    Under TCG, fork() of this multi-threaded Python process costs ~60 ms
    (page tables copied, then copy-on-write faults); vfork costs ~1 ms.
    Raises OSError like execvp(3): the first non-ENOENT failure wins.
    """
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    err = errno.ENOENT
    for path in candidates:
        try:
            return os.posix_spawn(
                path,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                setsigmask=(),
            )
        except OSError as exc:
            if err == errno.ENOENT and exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                err = exc.errno or errno.ENOEXEC
    raise OSError(err, os.strerror(err), argv[0])


class _Exec:
    """One running command: its pipes, output budget and the threads that serve it."""

    def __init__(
        self,
        agent: Agent,
        req_id: int,
        *,
        max_output: int,
        timeout: float | None,
    ) -> None:
        self.agent = agent
        self.id = req_id
        self.max_output = max_output
        self.timeout = timeout
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
                _close_quietly(self.wake_r, self.wake_w)

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
                self.agent.channel.send({"t": stream, "id": self.id}, data)

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
            _close_quietly(fd)
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
                    _write_all(fd, item)
                except OSError:
                    # EPIPE: the child closed its stdin; drop the rest like a shell would.
                    broken = True
        finally:
            _close_quietly(fd)

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
                self.agent.channel.send(
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
            self.agent.exec_finished(self)
            self.close_wake()


@dataclass
class _Write:
    fd: int
    tmp: str
    path: str


class Agent:
    """Serves one channel fd until the host goes away (``--fd``) or forever (``--device``)."""

    def __init__(self, fd: int, *, device: bool) -> None:
        self.channel = _Channel(fd, device=device)
        self.device = device
        self.reaper = _Reaper()
        self._reaper_thread: threading.Thread | None = None
        self._execs: dict[int, _Exec] = {}
        self._execs_lock = threading.Lock()
        self._writes: dict[int, _Write] = {}
        self._failed_writes: set[int] = set()
        self._urandom_fd: int | None = None
        self._handlers: dict[str, Callable[[Frame], None]] = {
            "sync": self._h_sync,
            "exec": self._h_exec,
            "stdin": self._h_stdin,
            "stdin_eof": self._h_stdin_eof,
            "kill": self._h_kill,
            "write_open": self._h_write_open,
            "write_chunk": self._h_write_chunk,
            "write_close": self._h_write_close,
            "read": self._h_read,
            "set_clock": self._h_set_clock,
            "entropy": self._h_entropy,
            "poweroff": self._h_poweroff,
        }

    # -- main loop -------------------------------------------------------------

    def serve(self) -> int:
        """Announce ``ready`` and dispatch requests; returns an exit status (``--fd`` only)."""
        if self._reaper_thread is None:
            self._reaper_thread = threading.Thread(
                target=self.reaper.run, name="reaper", daemon=True
            )
            self._reaper_thread.start()
        fd = self.channel.fd
        self.channel.send({"t": "ready", "id": 0, "version": PROTOCOL_VERSION, "pid": os.getpid()})
        decoder = FrameDecoder()
        # One buffer for every read: os.read(fd, READ_SIZE) would mmap and
        # munmap a fresh 256 KiB object per read, which under TCG is a
        # visible cost, and more so right after a restore (cold translations).
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while not self.channel.failed.is_set():
            try:
                n = os.readv(fd, [buf])
            except OSError as exc:
                if not self.device:
                    log.error("channel read failed: %s", exc)
                    break
                log.warning("channel read failed: %s", exc)
                time.sleep(DISCONNECTED_POLL)
                continue
            if not n:
                if not self.device:
                    break
                # No host connected: a half-received frame will never be completed.
                if decoder.buffered:
                    decoder = FrameDecoder()
                time.sleep(DISCONNECTED_POLL)
                continue
            try:
                decoder.feed(view[:n])
                for frame in decoder:
                    self._dispatch(frame)
            except ProtocolError as exc:
                log.error("malformed frame from host (%s); discarding buffered input", exc)
                decoder = FrameDecoder()
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        with self._execs_lock:
            execs = list(self._execs.values())
        for ex in execs:
            ex.kill(signal.SIGKILL)
        self._abort_writes()

    def _dispatch(self, frame: Frame) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s (+%d bytes)", frame.header, len(frame.payload))
        try:
            validate_frame(frame, sender="host")
        except ProtocolError as exc:
            self.channel.error(frame.id, f"bad request: {exc}", errno.EINVAL)
            return
        try:
            self._handlers[frame.type](frame)
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("handler for %s failed", frame.type)
            self.channel.error(frame.id, _describe(exc), _errno_of(exc))

    # -- sync ------------------------------------------------------------------

    def _h_sync(self, frame: Frame) -> None:
        # Writes in flight belong to host state that was just dropped.
        self._abort_writes()
        if frame.payload:
            try:
                self._mix_entropy(frame.payload)
            except OSError as exc:
                log.warning("sync: mixing entropy failed: %s", exc)
        if frame.header["clock_ns"] is not None:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, frame.header["clock_ns"])
            except OSError as exc:
                log.debug("sync: setting the clock failed: %s", exc)
        self.channel.send({"t": "sync_ok", "id": frame.id, "nonce": frame.header["nonce"]})

    # -- exec ------------------------------------------------------------------

    def exec_finished(self, ex: _Exec) -> None:
        with self._execs_lock:
            if self._execs.get(ex.id) is ex:
                del self._execs[ex.id]

    def _get_exec(self, frame: Frame) -> _Exec | None:
        with self._execs_lock:
            ex = self._execs.get(frame.id)
        if ex is None:
            # Normal when a command exits before reading all of its stdin.
            log.debug("%s for finished or unknown exec %d ignored", frame.type, frame.id)
        return ex

    def _h_exec(self, frame: Frame) -> None:
        h = frame.header
        with self._execs_lock:
            if frame.id in self._execs:
                raise OSError(errno.EEXIST, f"exec id {frame.id} is already running")
            if len(self._execs) >= MAX_EXECS:
                raise OSError(errno.EAGAIN, f"too many concurrent execs (limit {MAX_EXECS})")
        argv: list[str] = h["argv"]
        env: Mapping[str, str] = dict(os.environ) if h["env"] is None else h["env"]
        ex = _Exec(self, frame.id, max_output=h["max_output"], timeout=h["timeout"])
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
            candidates = _exec_candidates(argv[0], env)
            with self.reaper.lock:
                if h["cwd"] is None:
                    pid = _spawn(candidates, argv, env, stdin_r, out_w, err_w)
                    self.reaper.register(pid, ex.on_exit)
                else:
                    pid = self._fork_child(
                        h, candidates, argv, env, stdin_r, out_w, err_w, report_w, ex
                    )
            ex.pid = pid
            for fd in (out_w, err_w, stdin_r, report_w):
                fds.remove(fd)
                os.close(fd)
            report = b""
            while chunk := os.read(report_r, 64):
                report += chunk
            if report:
                # The child failed before execve; the reaper collects its 127.
                stage, err = report[:1], struct.unpack(">i", report[1:5].ljust(4, b"\0"))[0]
                what = h["cwd"] if stage == b"C" else argv[0]
                raise OSError(err, os.strerror(err) if err else "exec setup failed", what)
        except BaseException:
            _close_quietly(*fds)
            ex.close_wake()
            raise
        fds.remove(report_r)
        os.close(report_r)
        with self._execs_lock:
            self._execs[frame.id] = ex
        self.channel.send({"t": "started", "id": frame.id, "pid": pid})
        ex.start(out_r, err_r, stdin_w)

    def _fork_child(
        self,
        h: Mapping[str, Any],
        candidates: list[str],
        argv: list[str],
        env: Mapping[str, str],
        stdin_r: int,
        out_w: int,
        err_w: int,
        report_w: int,
        ex: _Exec,
    ) -> int:
        """fork + chdir + execve: the path for requests with a cwd (posix_spawn has no chdir)."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _child(
                stdin_fd=stdin_r,
                out_w=out_w,
                err_w=err_w,
                report_w=report_w,
                cwd=h["cwd"],
                candidates=candidates,
                argv=argv,
                env=env,
            )
        self.reaper.register(pid, ex.on_exit)
        return pid

    def _h_stdin(self, frame: Frame) -> None:
        ex = self._get_exec(frame)
        if ex is not None and frame.payload:
            ex.feed_stdin(frame.payload)

    def _h_stdin_eof(self, frame: Frame) -> None:
        ex = self._get_exec(frame)
        if ex is not None:
            ex.close_stdin()

    def _h_kill(self, frame: Frame) -> None:
        ex = self._get_exec(frame)
        if ex is not None:
            ex.kill(frame.header["signal"])

    # -- files -------------------------------------------------------------------

    def _abort_writes(self) -> None:
        for w in self._writes.values():
            _close_quietly(w.fd)
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
        self._writes.clear()
        self._failed_writes.clear()

    def _fail_write(self, frame: Frame, exc: BaseException) -> None:
        w = self._writes.pop(frame.id, None)
        if w is not None:
            _close_quietly(w.fd)
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
        # Remember the id so later chunks and the close are dropped silently:
        # the host gets exactly one reply per write.
        self._failed_writes.add(frame.id)
        self.channel.error(frame.id, _describe(exc), _errno_of(exc))

    def _h_write_open(self, frame: Frame) -> None:
        if frame.id in self._writes or frame.id in self._failed_writes:
            raise OSError(errno.EEXIST, f"write id {frame.id} is already open")
        if len(self._writes) >= MAX_WRITES:
            self._fail_write(frame, OSError(errno.EMFILE, "too many concurrent file writes"))
            return
        path: str = frame.header["path"]
        try:
            parent, name = os.path.split(path)
            if not name:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            try:
                os.makedirs(parent, exist_ok=True)
            except FileExistsError as exc:
                # makedirs reports a file in the way as EEXIST; open(2) would say ENOTDIR.
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent) from exc
            # A temp file in the same directory, renamed on close: readers never
            # see a partial file (rename(2) is atomic within a filesystem).
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name[:100]}.", suffix=".tmp")
            try:
                os.fchmod(fd, frame.header["mode"])
            except OSError:
                _close_quietly(fd)
                os.unlink(tmp)
                raise
        except OSError as exc:
            self._fail_write(frame, exc)
            return
        self._writes[frame.id] = _Write(fd, tmp, path)

    def _h_write_chunk(self, frame: Frame) -> None:
        if frame.id in self._failed_writes:
            return
        w = self._writes.get(frame.id)
        if w is None:
            self._fail_write(frame, OSError(errno.EBADF, f"no open write with id {frame.id}"))
            return
        try:
            _write_all(w.fd, frame.payload)
        except OSError as exc:
            self._fail_write(frame, exc)

    def _h_write_close(self, frame: Frame) -> None:
        if frame.id in self._failed_writes:
            self._failed_writes.discard(frame.id)
            return
        w = self._writes.pop(frame.id, None)
        if w is None:
            raise OSError(errno.EBADF, f"no open write with id {frame.id}")
        try:
            os.close(w.fd)
            os.replace(w.tmp, w.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(w.tmp)
            raise
        self.channel.send({"t": "ok", "id": frame.id})

    def _h_read(self, frame: Frame) -> None:
        # In a thread: a large file must not stall the dispatch of other requests.
        threading.Thread(
            target=self._read_file,
            args=(frame.id, frame.header["path"], frame.header["max_size"]),
            name=f"read-{frame.id}",
            daemon=True,
        ).start()

    def _read_file(self, req_id: int, path: str, max_size: int) -> None:
        try:
            # O_NONBLOCK: opening a FIFO must not hang; regular files ignore it.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", path)
                too_big = OSError(errno.EFBIG, f"file larger than max_size ({max_size})", path)
                if st.st_size > max_size:
                    raise too_big
                total = 0
                while chunk := os.read(fd, CHUNK):
                    total += len(chunk)
                    if total > max_size:
                        raise too_big
                    self.channel.send({"t": "data", "id": req_id}, chunk)
            finally:
                os.close(fd)
        except Exception as exc:
            self.channel.error(req_id, _describe(exc), _errno_of(exc))
            return
        self.channel.send({"t": "ok", "id": req_id})

    # -- machine -----------------------------------------------------------------

    def _h_set_clock(self, frame: Frame) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, frame.header["ns"])
        self.channel.send({"t": "ok", "id": frame.id})

    def _h_entropy(self, frame: Frame) -> None:
        self._mix_entropy(frame.payload)
        self.channel.send({"t": "ok", "id": frame.id})

    def _mix_entropy(self, payload: bytes) -> None:
        """Mix host entropy into the kernel pool, reseed the CRNG and this process's ``random``."""
        if self._urandom_fd is None:
            # Kept open: this runs right after every restore, when each new
            # kernel path (here: an open()) costs fresh translations under TCG.
            self._urandom_fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        fd = self._urandom_fd
        credited = False
        if os.geteuid() == 0 and payload:
            # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
            info = struct.pack("ii", len(payload) * 8, len(payload))
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, info + payload)
                credited = True
            except OSError as exc:
                log.debug("RNDADDENTROPY failed (%s); mixing without credit", exc)
        if not credited:
            _write_all(fd, payload)
        if credited:
            # A restored snapshot carries the kernel CRNG's state: without an
            # immediate reseed, two restores would hand out the same bytes
            # until the next scheduled reseed (up to a minute later).
            try:
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            except OSError as exc:
                log.debug("RNDRESEEDCRNG failed (%s)", exc)
        # The agent's own PRNG was cloned with the snapshot too.
        # An int seed: a bytes seed would run SHA-512 first (more cold code after a restore).
        random.seed(int.from_bytes(os.urandom(32), "big"))

    def _h_poweroff(self, frame: Frame) -> None:
        if os.getpid() != 1:
            raise OSError(errno.EPERM, "poweroff is only allowed when the agent is PID 1")
        os.sync()
        self.channel.send({"t": "ok", "id": frame.id})
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.reboot(ctypes.c_int(RB_POWER_OFF)) != 0:
            log.error("reboot(RB_POWER_OFF) failed: %s", os.strerror(ctypes.get_errno()))


# ---------------------------------------------------------------------------
# Process setup


def _ensure_std_fds() -> None:
    # If 0-2 were closed, pipes could land there and dup2 in children would clobber them.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


def _set_subreaper() -> None:
    # Outside the guest (tests) orphans of our children come back to us, as they would to PID 1.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _find_port(device: str) -> str | None:
    """Return the device node for ``device``, also when udev has not made the symlink."""
    if os.path.exists(device):
        return device
    wanted = os.path.basename(device)
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        try:
            with open(name_file) as f:
                if f.read().strip() == wanted:
                    return "/dev/" + os.path.basename(os.path.dirname(name_file))
        except OSError:
            continue
    return None


def _open_device(device: str) -> int:
    deadline = time.monotonic() + DEVICE_WAIT
    while True:
        path = _find_port(device)
        if path is not None:
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.debug("opening %s: %s", path, exc)
        elif time.monotonic() >= deadline:
            raise FileNotFoundError(errno.ENOENT, "virtio port not found", device)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="pytest_gondolin.guest.agent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="virtio-serial port to serve")
    where.add_argument("--fd", type=int, help="connected socket/pipe fd to serve (tests)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="gondolin-agent[%(process)d] %(levelname)s %(message)s",
    )
    _ensure_std_fds()
    if args.fd is not None:
        fd: int = args.fd
        os.set_inheritable(fd, False)
        _set_subreaper()
        return Agent(fd, device=False).serve()
    while True:
        try:
            fd = _open_device(args.device)
            break
        except OSError as exc:
            log.error("cannot open %s: %s", args.device, exc)
            if os.getpid() != 1:
                return 1
            # PID 1 must not exit (the kernel would panic); keep trying.
    agent = Agent(fd, device=True)
    while True:
        try:
            agent.serve()
        except Exception:
            log.exception("agent loop crashed; restarting it")
            time.sleep(DISCONNECTED_POLL)
        if os.getpid() != 1:
            return 1


if __name__ == "__main__":
    sys.exit(main())
