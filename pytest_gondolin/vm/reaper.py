"""Per-VM runtime folders, and reaping what a killed run left behind.

Each VM gets ``<runtime>/<owner pid>-<id>/`` holding its sockets, overlay,
console log and ``qemu.pid``. QEMU is started under ``setpriv --pdeathsig
KILL`` so it dies with its parent; if that was not possible (no setpriv,
macOS) or the parent's thread went away, :func:`reap_orphans` — called at
every session start — kills QEMUs whose owner is gone and removes their
folders. A QEMU is only killed if its command line names its folder, so a
recycled pid is never hit.
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


def _alive(pid: int) -> bool:
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


def reap_orphans() -> list[Path]:
    """Kill QEMUs and remove runtime folders whose owner process is dead. Returns the folders removed."""
    removed: list[Path] = []
    for rundir in paths.runtime_dir().iterdir():
        owner_text = rundir.name.split("-", 1)[0]
        if not owner_text.isdigit() or _alive(int(owner_text)) or not rundir.is_dir():
            continue
        try:
            qemu_pid = int((rundir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            qemu_pid = 0
        if qemu_pid and _alive(qemu_pid) and str(rundir) in _cmdline(qemu_pid):
            log.warning("killing orphaned QEMU %d left by dead process %s", qemu_pid, owner_text)
            try:
                os.kill(qemu_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(rundir)
    return removed
