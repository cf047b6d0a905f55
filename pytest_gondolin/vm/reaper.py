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

Only this user's folders are touched: the runtime roots are private
(checked by :mod:`pytest_gondolin.paths`), a VM folder is created 0700 by a
mkdir that fails on any existing entry (a symlink included), and the
scanners (:func:`vm_folders`) skip every entry that lstat does not call a
folder owned by this user.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import VMError

log = logging.getLogger(__name__)


def new_rundir() -> Path:
    """Create and return a fresh runtime folder owned by this process: 0700, never a symlink.

    Raises VMError if the folder cannot be created or is not private afterwards.
    """
    path = paths.runtime_dir() / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # Fails on any existing entry; a symlink at this name is never followed.
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise VMError(f"cannot create the VM runtime folder {path}: {exc}") from exc
    problem = paths.private_dir_problem(path)
    if problem is not None:
        raise VMError(f"the new VM runtime folder {path} {problem}")
    return path


def vm_folders() -> list[Path]:
    """The VM folders (``<owner pid>-<id>``) in this user's private runtime roots.

    Entries that are not real folders owned by this user (symlinks, files,
    another uid's folders) are skipped: they are not ours, and are never
    followed, read or removed. Roots are private, so nobody else can add any.
    """
    found: list[Path] = []
    for root in paths.runtime_roots():
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        for rundir in entries:
            owner, sep, ident = rundir.name.partition("-")
            if sep and owner.isdigit() and ident and paths.owned_dir_problem(rundir) is None:
                found.append(rundir)
    return found


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
    for rundir in vm_folders():
        owner_text = rundir.name.split("-", 1)[0]
        if pid_alive(int(owner_text)):
            continue
        if spare_kept and (rundir / KEPT_MARKER).exists():
            continue
        qemu_pid = stop_qemu(rundir)
        if qemu_pid is not None:
            log.warning("killed orphaned QEMU %d left by dead process %s", qemu_pid, owner_text)
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(rundir)
    return removed
