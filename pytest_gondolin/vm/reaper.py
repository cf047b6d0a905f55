"""Per-VM runtime folders, and reaping what a killed run left behind.

Each VM gets ``<runtime>/<owner pid>-<id>/`` holding its sockets, overlay,
console log and ``qemu.pid``. QEMU is started under ``setpriv --pdeathsig
KILL`` so it dies with its parent; if that was not possible (no setpriv,
macOS) or the parent's thread went away, :func:`reap_orphans` — called at
every session start — kills QEMUs whose owner is gone and removes their
folders. A QEMU is only killed if its command line names its folder, so a
recycled pid is never hit.

A VM kept for debugging (``--gondolin-keep-vm``) has a :data:`KEPT_MARKER`
file in its folder and no death signal; its owner (the pytest run) is gone
once the run ends, so the next run reaps it. The ``gondolin`` CLI reaps
with ``spare_kept=True``: it must not kill what a user is debugging.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import uuid
from pathlib import Path

from pytest_gondolin import paths

log = logging.getLogger(__name__)


def new_rundir() -> Path:
    """Create and return a fresh runtime folder owned by this process."""
    path = paths.runtime_dir() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    return path


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


KEPT_MARKER = "kept.json"


def stop_qemu(rundir: Path) -> int | None:
    """SIGKILL the QEMU recorded in ``rundir/qemu.pid`` if it is alive and runs that folder.

    Returns the pid signalled, or None if there was nothing (safe) to kill.
    """
    try:
        qemu_pid = int((rundir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if qemu_pid <= 0 or not pid_alive(qemu_pid) or str(rundir) not in _cmdline(qemu_pid):
        return None
    try:
        os.kill(qemu_pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    except PermissionError:
        log.warning("not permitted to kill QEMU %d of %s", qemu_pid, rundir)
        return None
    return qemu_pid


def reap_orphans(*, spare_kept: bool = False) -> list[Path]:
    """Kill QEMUs and remove runtime folders whose owner process is dead. Returns the folders removed.

    With ``spare_kept``, folders of VMs kept for debugging are left alone.
    """
    removed: list[Path] = []
    for rundir in paths.runtime_dir().iterdir():
        owner_text = rundir.name.split("-", 1)[0]
        if not owner_text.isdigit() or pid_alive(int(owner_text)) or not rundir.is_dir():
            continue
        if spare_kept and (rundir / KEPT_MARKER).exists():
            continue
        qemu_pid = stop_qemu(rundir)
        if qemu_pid is not None:
            log.warning("killed orphaned QEMU %d left by dead process %s", qemu_pid, owner_text)
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(rundir)
    return removed
