"""Per-test process isolation in the guest: a fork in fresh namespaces over an overlay root.

The worker (:mod:`pytest_gondolin.guest.process_runs`) runs a ``process``-mode
test through :class:`Isolation`; the worker itself never runs test code::

    worker: unshare(PID) ──fork──▶ test process, PID 1 of a new PID namespace:
            setns(own PID ns)       unshare(mount, UTS, IPC), mounts private,
                                    a per-test tmpfs, the new root (overlays
                                    whose upper layers live on that tmpfs),
                                    pivot_root, a new /proc, cwd; waits for
    run: the order ──(pipe)──────▶  its order; the test; _exit

The fork happens ahead (:meth:`Isolation.prepare`, right after the previous
run's checks), so a run pays only for the test itself. One fork a test: the
worker's children land in a new PID namespace only between its
``unshare(CLONE_NEWPID)`` and the ``setns`` back to its own.
Every file the test writes lands in the per-test tmpfs and vanishes with the
mount namespace; when the test process (PID 1) exits, the kernel kills every
other process of its PID namespace before the worker's ``waitpid`` returns.

What namespaces cannot hold is checked per run, cheaply: writes to the test's
``/proc`` and ``/sys`` (kernel parameters) through a fanotify mark the worker
reads after the test, and before/after digests (:class:`KernelState`) of
loaded modules, the worker's own mounts, network links, addresses and routes,
and the clock's offset. :meth:`Isolation.check` names what changed; the host
then restores the VM from its snapshot.

The new root's mounts are planned and made by :mod:`pytest_gondolin.guest.newroot`.
Linux only, run as root; standard library only (``os.unshare`` and
``os.setns`` exist only from Python 3.12, so the calls go through ``ctypes``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import hashlib
import os
import signal
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from pytest_gondolin.guest.newroot import (
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    SCRATCH,
    SCRATCH_SIZE,
    Step,
    build_root,
    check,
    libc,
    mount,
    parse_mountinfo,
    pivot_root,
    plan_root,
    setns,
    umount,
    unshare,
)

__all__ = [
    "ISOLATION_ENV",
    "RESTORE_QUERY",
    "IsolatedRun",
    "Isolation",
    "KernelState",
    "dirty_reasons",
    "kernel_state",
]

#: Set to ``"process"`` in a run command's environment: run that test isolated
#: (the worker takes it out of the environment the test sees).
ISOLATION_ENV: Final = "PYTEST_GONDOLIN_ISOLATION"
#: The ``query`` kind by which the worker asks the host to restore the VM
#: after a run (its ``args``: ``{"reason": str}``); the answer carries nothing.
RESTORE_QUERY: Final = "gondolin-restore"

_PR_SET_PDEATHSIG: Final = 1
#: Written files under /proc and /sys named in a restore reason at most.
_MAX_NAMED_WRITES: Final = 3
_FAN_CLOEXEC: Final = 0x1
_FAN_NONBLOCK: Final = 0x2
_FAN_MARK_ADD: Final = 0x1
_FAN_MARK_MOUNT: Final = 0x10
_FAN_MODIFY: Final = 0x2
_FAN_Q_OVERFLOW: Final = 0x4000
_AT_FDCWD: Final = -100
#: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid.
_FAN_EVENT: Final = struct.Struct("=IBBHQii")

#: Exit status of a test process whose namespaces could not be set up (the
#: test never ran; the reason is on the worker's stderr).
SETUP_FAILED: Final = 120
#: Status of a test process that did not return normally but raised.
RAISED: Final = 121
#: Status of a prepared test process whose order never came (:meth:`Isolation.abandon`).
ABANDONED: Final = 122
#: Largest order a test process reads (the worker's command line bound).
MAX_ORDER: Final = 64 * 1024 * 1024


def _read_order(fd: int) -> bytes:
    """Everything the worker writes to ``fd`` until it closes it (at most :data:`MAX_ORDER`)."""
    chunks, size = [], 0
    try:
        while size <= MAX_ORDER and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


#: Network state a test shares with the worker (one network namespace),
#: digested before and after: links' flags and MTUs, addresses, routes.
_NET_FILES: Final = ("/proc/net/route", "/proc/net/if_inet6", "/proc/net/ipv6_route")


def _enter(steps: Sequence[Step], watch_fd: int, cwd: str) -> None:
    """In the test process: new namespaces, the new root, /proc, the watch, ``cwd``."""
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
    mount("none", "/", "", MS_REC | MS_PRIVATE)
    os.makedirs(SCRATCH, exist_ok=True)
    mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=700,size={SCRATCH_SIZE}")
    root = build_root(steps)
    # pivot_root(".", "."), then detach the old root stacked under the new
    # one (pivot_root(2), NOTES): the worker's tree is out of reach.
    os.chdir(root)
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir("/")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for watched in ("/proc", "/sys"):
        check(
            libc().fanotify_mark(
                ctypes.c_int(watch_fd),
                ctypes.c_uint(_FAN_MARK_ADD | _FAN_MARK_MOUNT),
                ctypes.c_uint64(_FAN_MODIFY),
                ctypes.c_int(_AT_FDCWD),
                watched.encode(),
            ),
            f"fanotify_mark {watched}",
        )
    os.close(watch_fd)  # the test must not read (or drain) the worker's watch
    os.chdir(cwd)


# -- what namespaces cannot hold ------------------------------------------------------

#: The clock counts as changed when wall time moved this far against the monotonic clock.
CLOCK_TOLERANCE: Final = 0.5


@dataclass(frozen=True)
class KernelState:
    """Digests of kernel state a test shares with the worker despite its namespaces."""

    modules: str
    mounts: str
    network: str
    #: CLOCK_REALTIME minus CLOCK_MONOTONIC, in seconds.
    clock_offset: float


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                break
        return b"".join(chunks)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _links() -> bytes:
    """Each network link's name, flags and MTU."""
    out = []
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return b""
    for name in names:
        for attr in ("flags", "mtu"):
            out.append(name.encode() + b" " + _read(f"/sys/class/net/{name}/{attr}"))
    return b"".join(out)


def kernel_state() -> KernelState:
    """What a test could change beyond its namespaces, as digests (~1-2 ms under TCG)."""
    modules = b"\n".join(line.split(b" ", 1)[0] for line in _read("/proc/modules").splitlines())
    network = b"\0".join([*(_read(p) for p in _NET_FILES), _links()])
    return KernelState(
        modules=hashlib.sha256(modules).hexdigest(),
        mounts=hashlib.sha256(_read("/proc/self/mountinfo")).hexdigest(),
        network=hashlib.sha256(network).hexdigest(),
        clock_offset=time.clock_gettime(time.CLOCK_REALTIME) - time.monotonic(),
    )


def dirty_reasons(before: KernelState, after: KernelState) -> list[str]:
    """What changed between two states, in words (empty: nothing)."""
    reasons = []
    if before.modules != after.modules:
        reasons.append("kernel modules were loaded or unloaded")
    if before.mounts != after.mounts:
        reasons.append("the worker's mounts changed")
    if before.network != after.network:
        reasons.append("network links, addresses or routes changed")
    moved = after.clock_offset - before.clock_offset
    if abs(moved) > CLOCK_TOLERANCE:
        reasons.append(f"the clock was set ({moved:+.1f} s)")
    return reasons


# -- one isolated run ------------------------------------------------------------------


@dataclass(frozen=True)
class IsolatedRun:
    """How one isolated run ended.

    ``status``: 0 when the test function returned, :data:`RAISED` when it
    raised, :data:`SETUP_FAILED` when the namespaces could not be set up, the
    process's exit code when it exited on its own, 128 + N when signal N
    killed it. ``dirty``: what the test changed that namespaces cannot hold.
    """

    status: int
    dirty: tuple[str, ...] = ()

    def describe(self) -> str:
        """The status in words."""
        if self.status == SETUP_FAILED:
            return "the test's namespaces could not be set up (the worker's stderr says why)"
        if self.status == RAISED:
            return "the test process failed outside the test protocol"
        if self.status > 128:
            try:
                name = signal.Signals(self.status - 128).name
            except ValueError:
                name = f"signal {self.status - 128}"
            return f"the test process was killed by {name}"
        return f"the test process exited with status {self.status} before the test finished"


#: Signals the worker takes with sigtimedwait while a test process runs.
_WAITED: Final = frozenset({signal.SIGCHLD, signal.SIGUSR1})
#: How often the worker looks at the test process without a signal (a lost SIGCHLD).
_WAIT_POLL: Final = 1.0


def _wait_forwarding(pid: int) -> int:
    """Wait for ``pid`` (its wait status), forwarding SIGUSR1 to it; _WAITED must be blocked.

    Unbounded: the host bounds the run (on a timeout it kills the worker's
    process group, and the test process dies with the worker).
    """
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return raw
        info = signal.sigtimedwait(_WAITED, _WAIT_POLL)
        if info is not None and info.si_signo == signal.SIGUSR1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)


def _exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255


class Isolation:
    """The worker's side of process isolation: one instance per worker, made lazily.

    Holds what every run reuses: the worker's own PID namespace (to step
    back into after each fork), the fanotify group that sees writes to the
    tests' ``/proc`` and ``/sys``, the plan of the new root (made from the
    worker's mounts once), the kernel state after the previous run, and the
    next test process, forked ahead (:meth:`prepare`).

    A run is :meth:`prepare` (off the test's path: after the previous run),
    :meth:`run` (hands the order over, waits for the exit), :meth:`check`.
    """

    def __init__(self, serve: Callable[[bytes], None], *, cwd: str) -> None:
        c = libc()
        self._serve = serve
        self._cwd = cwd
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._watch = check(
            c.fanotify_init(
                ctypes.c_uint(_FAN_CLOEXEC | _FAN_NONBLOCK), ctypes.c_uint(os.O_RDONLY)
            ),
            "fanotify_init",
        )
        with open("/proc/self/mountinfo") as f:
            self._steps = plan_root(parse_mountinfo(f.read()), is_dir=os.path.isdir)
        self._state: KernelState | None = None
        #: The prepared test process: its pid and the pipe end its order goes to.
        self._next: tuple[int, int] | None = None

    @property
    def prepared(self) -> bool:
        """Whether a test process waits for its order."""
        return self._next is not None

    def prepare(self) -> None:
        """Fork the next test process: it enters fresh namespaces and its new root, then waits.

        The order (:meth:`run`) reaches it through a pipe; it passes it to
        ``serve`` and exits 0 (:data:`ABANDONED` if the pipe closed without
        one). Raises OSError when no process could be forked.
        """
        if self._next is not None:
            return
        if self._state is None:
            self._state = kernel_state()
        # The child flushes its streams before it exits: they must not hold
        # the worker's pending output, or it would be written twice.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # Frozen, the worker's objects are out of the collector's sight: a
        # collection in the test process does not write to (and so copy) every
        # page the worker's objects live on.
        gc.freeze()
        order_r, order_w = os.pipe()
        pid = -1
        unshare(CLONE_NEWPID)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about forking with threads (-s runs a pump
                # thread); the test process makes its own (worker.py).
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the test process
                os.close(order_w)
                self._child(order_r)
        finally:
            if pid != 0:
                setns(self._own_pid_ns, CLONE_NEWPID)
                os.close(order_r)
                if pid < 0:
                    os.close(order_w)
        self._next = (pid, order_w)

    def run(self, order: bytes) -> int:
        """Hand ``order`` to the prepared test process (prepared now if none); its exit status.

        When this returns, every process the test started is gone and so is
        every file it wrote; the status is as :class:`IsolatedRun` says.
        Raises OSError when no process could be forked.
        """
        self.prepare()
        assert self._next is not None
        (pid, order_w), self._next = self._next, None
        # SIGCHLD and SIGUSR1 wait in the worker's main thread until the test
        # process ends (sigtimedwait): the host's SIGUSR1 (a stack dump, on a
        # timeout) is forwarded to the test process, whose faulthandler
        # registration is the worker's (inherited).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        try:
            with contextlib.suppress(OSError):  # a dead test process: its status says why
                view = memoryview(order)
                while view:
                    view = view[os.write(order_w, view) :]
            os.close(order_w)
            raw = _wait_forwarding(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return _exit_status(raw)

    def check(self) -> tuple[str, ...]:
        """What the last run changed that namespaces cannot hold (empty: nothing); ~2-5 ms."""
        before = self._state if self._state is not None else kernel_state()
        after = kernel_state()
        dirty = dirty_reasons(before, after)
        written = self._drain_watch()
        if written:
            dirty.insert(
                0, f"the test wrote to /proc or /sys (kernel parameters): {', '.join(written)}"
            )
        self._state = None if dirty else after
        return tuple(dirty)

    def abandon(self) -> None:
        """End the prepared test process, if any, without a run (it exits :data:`ABANDONED`)."""
        if self._next is None:
            return
        (pid, order_w), self._next = self._next, None
        os.close(order_w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _child(self, order_r: int) -> None:
        code = SETUP_FAILED
        try:
            # A test that kills the worker takes its own process down with it
            # (the worker's output pipe must close for the host to see the crash).
            check(libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            os.close(self._own_pid_ns)
            _enter(self._steps, self._watch, self._cwd)
            code = ABANDONED
            order = _read_order(order_r)
            if order:
                code = RAISED
                self._serve(order)
                code = 0
        except BaseException as exc:  # the process ends here either way
            if code == SETUP_FAILED:
                os.write(2, f"pytest-gondolin isolation: {exc}\n".encode(errors="replace"))
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed or broken stream
                    stream.flush()
            os._exit(code)

    def _drain_watch(self) -> list[str]:
        """The files written under the watched mounts since the last call (a few; closes their fds)."""
        written: list[str] = []
        while True:
            try:
                data = os.read(self._watch, 4096)
            except BlockingIOError:
                return written
            except OSError as exc:
                return [*written, f"(the watch failed: {exc})"]  # assume the worst
            if not data:
                return written
            offset = 0
            while offset + _FAN_EVENT.size <= len(data):
                length, _, _, _, mask, fd, _ = _FAN_EVENT.unpack_from(data, offset)
                name = "(events lost)" if mask & _FAN_Q_OVERFLOW else "(unknown file)"
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        name = os.readlink(f"/proc/self/fd/{fd}")
                    os.close(fd)
                if mask & (_FAN_MODIFY | _FAN_Q_OVERFLOW) and len(written) < _MAX_NAMED_WRITES:
                    written.append(name)
                offset += max(length, _FAN_EVENT.size)
