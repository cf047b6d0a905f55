"""One VM's QEMU child process and its QMP monitor.

:class:`QemuProcess` launches QEMU (spawn; wait for its sockets; connect
QMP and the agent; wait for the agent's first answer, or resynchronise a
restored one), answers whether it still runs, turns its death into an error that
carries what is needed to act (the command line, QEMU's stderr, the
console tail), sends it monitor commands, and stops it: soft, then hard
(QMP ``quit``, SIGTERM, SIGKILL, each given :data:`SHUTDOWN_GRACE`),
idempotently. While it runs, its console log keeps only its newest part
(:mod:`~pytest_gondolin.vm.console_bound`).

QEMU runs in its own session (Ctrl-C reaches pytest, which then closes VMs
in order) under ``setpriv --pdeathsig KILL``, so it cannot outlive the
process that launched it, and without root's capabilities (see
:func:`~pytest_gondolin.vm.qemu.privilege_drop_args`). The death signal
only covers a parent that dies after setpriv set it: a pytest killed
between the fork and that moment (SIGKILL right after "starting QEMU")
left QEMU running for good, reparented, with no ``qemu.pid`` to find it
by. So a shell between setpriv and QEMU checks that its parent is still
the launching process before it becomes QEMU (:func:`parent_check`, the
check ``prctl(2)`` recommends).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pytest_gondolin.errors import SnapshotError, VMCrashed, VMError, VMLaunchError
from pytest_gondolin.logtail import read_tail_text
from pytest_gondolin.vm import console_bound
from pytest_gondolin.vm.channel import AgentChannel
from pytest_gondolin.vm.no_huge_pages import children_without_huge_pages
from pytest_gondolin.vm.qemu import MachineSpec, command_line, privilege_drop_args
from pytest_gondolin.vm.qmp import QMP, QMP_TIMEOUT

__all__ = [
    "CONSOLE_TAIL_BYTES",
    "CRASH_WAIT",
    "HMP_TIMEOUT",
    "READY_POLL",
    "SHUTDOWN_GRACE",
    "QemuProcess",
    "console_tail",
    "parent_check",
    "qemu_log_tail",
    "setpriv_prefix",
]

#: Soft shutdown: how long QEMU gets to exit after QMP quit / SIGTERM.
SHUTDOWN_GRACE = 3.0
#: How many console bytes error messages quote.
CONSOLE_TAIL_BYTES = 8192
#: A failed guest operation waits this long to learn whether QEMU exited under it.
CRASH_WAIT = 0.2
#: ``savevm``/``loadvm`` take well under a second here; 120 s covers a big guest on a loaded host.
HMP_TIMEOUT = 120.0
#: How often the sockets QEMU creates at start are looked for.
_SOCKET_POLL = 0.005
#: Boot checks this often that QEMU still runs while it waits for the agent.
READY_POLL = 0.25


def setpriv_prefix(die_with_parent: bool = True) -> list[str]:
    """``setpriv`` in front of QEMU: parent-death signal, and no capabilities (see qemu.py)."""
    setpriv = shutil.which("setpriv")
    options = (["--pdeathsig", "KILL"] if die_with_parent else []) + privilege_drop_args(
        os.geteuid()
    )
    return [setpriv, *options, "--"] if setpriv and options else []


#: How the parent check exits when the launching process is already gone.
ORPHANED_EXIT = 125


def parent_check(parent: int) -> list[str]:
    """A command prefix that runs the rest only if its parent process is ``parent``.

    Put after ``setpriv --pdeathsig``: once the death signal is set, a
    parent that is still there will send it; one that is gone never will,
    and the command must not start (it exits :data:`ORPHANED_EXIT`).
    """
    shell = shutil.which("sh") or "/bin/sh"
    return [shell, "-c", f'[ "$PPID" = {int(parent)} ] || exit {ORPHANED_EXIT}; exec "$@"', "sh"]


def qemu_log_tail(rundir: Path | None) -> str:
    """QEMU's own stderr so far, from VM folder ``rundir`` (empty if unavailable)."""
    return read_tail_text(rundir / "qemu.log" if rundir else None, CONSOLE_TAIL_BYTES)


def console_tail(rundir: Path | None) -> str:
    """The tail of the guest's serial console, from VM folder ``rundir``."""
    return read_tail_text(rundir / "console.log" if rundir else None, CONSOLE_TAIL_BYTES)


class QemuProcess:
    """QEMU running ``spec`` (its folder is ``spec.rundir``); call :meth:`stop` in every case."""

    def __init__(self, spec: MachineSpec, *, name: str) -> None:
        self.spec = spec
        self.name = name
        self.argv = command_line(spec)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None

    def start(
        self, *, die_with_parent: bool, deadline: float, boot_timeout: float, restored: bool
    ) -> AgentChannel:
        """Spawn QEMU, connect QMP and the agent; return the agent channel once the agent answers.

        ``restored``: QEMU starts from a saved state (``-loadvm``), whose
        agent is resynchronised rather than awaited. Raises VMLaunchError
        if QEMU exits or misses ``deadline`` (a ``time.monotonic()`` value;
        ``boot_timeout`` is the bound it came from), VMError if QMP does not
        answer. Call :meth:`stop` in every case.
        """
        spec = self.spec
        prefix = setpriv_prefix(die_with_parent)
        if die_with_parent and prefix:
            prefix += parent_check(os.getpid())
        with (spec.rundir / "qemu.log").open("wb") as errlog, children_without_huge_pages():
            self._proc = subprocess.Popen(
                prefix + self.argv,
                stdin=subprocess.DEVNULL,
                stdout=errlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=spec.rundir,
            )
        (spec.rundir / "qemu.pid").write_text(f"{self._proc.pid}\n")
        console_bound.watch(spec.console_log)  # a guest may write to its console without end
        while not (spec.qmp_socket.exists() and spec.agent_socket.exists()):
            self.raise_if_exited("QEMU exited before creating its sockets")
            if time.monotonic() > deadline:
                raise self.launch_error("QEMU did not create its sockets in time")
            time.sleep(_SOCKET_POLL)
        self._qmp = QMP(f"gondolin-{spec.rundir.name}")
        self._qmp.connect(str(spec.qmp_socket))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(spec.agent_socket))
        except OSError as exc:
            sock.close()
            raise self.launch_error(f"cannot connect to the agent socket: {exc}") from exc
        channel = AgentChannel(sock, name=self.name)
        try:
            if restored:
                self._resync(channel, deadline)
            else:
                self._wait_ready(channel, deadline, boot_timeout)
        except BaseException:
            channel.close()
            raise
        return channel

    def _wait_ready(self, channel: AgentChannel, deadline: float, boot_timeout: float) -> None:
        while True:
            self.raise_if_exited("QEMU exited during boot")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.launch_error(
                    f"the guest agent did not answer within {boot_timeout:.0f} s"
                )
            try:
                channel.wait_ready(timeout=min(READY_POLL, remaining))
                return
            except (TimeoutError, VMError) as exc:
                if channel.closed:
                    self.raise_if_exited("QEMU exited during boot")
                    raise self.launch_error(f"agent channel closed during boot: {exc}") from exc

    def _resync(self, channel: AgentChannel, deadline: float) -> None:
        try:
            channel.sync(
                timeout=max(1.0, deadline - time.monotonic()),
                entropy=os.urandom(64),
                clock_ns=time.time_ns(),
            )
        except (TimeoutError, VMError) as exc:
            self.raise_if_exited("QEMU exited while restoring")
            raise self.launch_error(f"the agent did not answer after restore: {exc}") from exc

    # -- is it running? ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the QEMU process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def exited(self, grace: float = 0.0) -> bool:
        """Whether QEMU has exited (or never started), waiting up to ``grace`` s for it to."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        if grace <= 0:
            return False
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def raise_if_exited(self, reason: str) -> None:
        """Raise VMLaunchError(``reason``) if QEMU has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise self.launch_error(reason)

    def launch_error(self, reason: str) -> VMLaunchError:
        """A VMLaunchError for ``reason`` with the command line, exit code, stderr and console."""
        code = self._proc.poll() if self._proc is not None else None
        return VMLaunchError(
            reason,
            command=self.argv,
            exitcode=code,
            stderr=qemu_log_tail(self.spec.rundir),
            console=console_tail(self.spec.rundir),
        )

    def crash_error(self, exc: BaseException) -> VMCrashed | None:
        """VMCrashed if QEMU exited under the failed operation ``exc`` (waits :data:`CRASH_WAIT`)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=CRASH_WAIT)
        except subprocess.TimeoutExpired:
            return None
        return VMCrashed(
            f"QEMU exited during a guest operation ({exc})",
            exitcode=proc.returncode,
            console=console_tail(self.spec.rundir),
        )

    # -- the monitor ----------------------------------------------------------------

    def cmd(self, command: str, timeout: float = QMP_TIMEOUT, **args: Any) -> Any:
        """Run QMP ``command``; VMError if QMP is not connected or the command fails."""
        if self._qmp is None:
            raise VMError(f"{self.name} is not running")
        return self._qmp.cmd(command, timeout=timeout, **args)

    def hmp(self, command: str, timeout: float = HMP_TIMEOUT) -> None:
        """Run human-monitor ``command`` (savevm, loadvm); SnapshotError if it prints anything."""
        out = self.cmd("human-monitor-command", timeout=timeout, **{"command-line": command})
        if isinstance(out, str) and out.strip():
            raise SnapshotError(f"{command!r} failed: {out.strip()}")

    # -- stopping ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop QEMU (QMP ``quit``, then SIGTERM, then SIGKILL) and close QMP. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._qmp is not None:
                try:
                    self._qmp.quit(timeout=SHUTDOWN_GRACE)
                except VMError:
                    pass
            _stop_process(proc)
        console_bound.unwatch(self.spec.console_log)
        self.release()

    def release(self) -> None:
        """Close the QMP connection and leave QEMU running (``--gondolin-keep-vm``)."""
        if self._qmp is not None:
            self._qmp.close()  # idempotent; later commands raise "not connected"


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=SHUTDOWN_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue
