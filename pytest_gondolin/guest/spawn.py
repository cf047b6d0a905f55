"""Starting one child process for an ``exec`` request, the way execvp(3) would.

Without a working directory the child is started with ``posix_spawn``
(vfork-based in glibc); with one, with ``fork`` + ``chdir`` + ``execve``
(posix_spawn has no chdir). Either way the child leads its own session, so
its own process group, and gets default SIGPIPE/SIGXFSZ and an empty signal
mask. Its pid is registered with the :class:`~pytest_gondolin.guest.reaper.Reaper`
before anything can reap it. Standard library only.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from collections.abc import Callable, Mapping
from typing import NoReturn

from pytest_gondolin.guest.reaper import Reaper


def exec_candidates(prog: str, env: Mapping[str, str]) -> list[str]:
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


def _posix_spawn(
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


def spawn(
    argv: list[str],
    env: Mapping[str, str],
    cwd: str | None,
    *,
    stdin_fd: int,
    out_w: int,
    err_w: int,
    report_w: int,
    reaper: Reaper,
    on_exit: Callable[[int], None],
) -> int:
    """Start ``argv`` on the given fds, register ``on_exit`` for it and return its pid.

    Raises OSError when posix_spawn fails. A forked child (``cwd`` given)
    that fails before execve writes the stage and errno on ``report_w``
    instead and exits 127; :func:`check_report` turns that into an OSError.
    """
    candidates = exec_candidates(argv[0], env)
    with reaper.lock:
        if cwd is None:
            pid = _posix_spawn(candidates, argv, env, stdin_fd, out_w, err_w)
        else:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                _child(
                    stdin_fd=stdin_fd,
                    out_w=out_w,
                    err_w=err_w,
                    report_w=report_w,
                    cwd=cwd,
                    candidates=candidates,
                    argv=argv,
                    env=env,
                )
        reaper.register(pid, on_exit)
    return pid


def check_report(report_r: int, *, cwd: str | None, prog: str) -> None:
    """Read the child's setup report to EOF; raise OSError if it failed before execve.

    The write end must be closed in this process first (execve closes the
    child's copy, being close-on-exec).
    """
    report = b""
    while chunk := os.read(report_r, 64):
        report += chunk
    if report:
        # The child failed before execve; the reaper collects its 127.
        stage, err = report[:1], struct.unpack(">i", report[1:5].ljust(4, b"\0"))[0]
        what = cwd if stage == b"C" else prog
        raise OSError(err, os.strerror(err) if err else "exec setup failed", what)
