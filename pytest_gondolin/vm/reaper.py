"""Per-VM runtime folders, and reaping what a killed run left behind.

Each VM gets ``<runtime>/<owner pid>-<id>/`` holding its sockets, overlay,
console log and ``qemu.pid``. QEMU is started under ``setpriv --pdeathsig
KILL`` so it dies with its parent; if that was not possible (no setpriv,
macOS) or the parent's thread went away, :func:`reap_orphans` — called at
every session start — kills QEMUs whose owner is gone and removes their
folders. A QEMU is only killed if its command line names its folder, so a
recycled pid is never hit.

The owner of a folder is alive only if a process with its pid runs *and*
started before the folder last changed (:func:`started_before`): on a CI
host that runs job after job, a killed run's pid is soon another
process's, which must not keep its folder (and QEMU) forever.

A write into the cache goes to a temporary name that carries the writer's
pid (``.<name>.<pid>[.<thread>].tmp``), and the edit-run loop moves a
cached worker aside as ``.<name>.taken-<pid>``
(``sandbox/worker_disk.py``). A process killed with SIGKILL or SIGTERM
(pytest has no handler for it) cannot remove either, up to a guest disk
(~450 MiB) each: a temporary file was never removed, a taken one only by
a later one-test run that took a cached worker.
:func:`remove_stale_cache_files`, also called at every session start,
removes those whose writer is gone.

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
import stat
import uuid
from pathlib import Path
from typing import Final

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


#: How far :func:`process_start_time` may be off: ``/proc/stat``'s boot time is whole seconds.
START_TIME_SLACK: Final = 1.5


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, within :data:`START_TIME_SLACK`).

    None when it is gone, or its start cannot be read (no ``/proc``).
    ``/proc/<pid>``'s own times are not its start: they are when its inode
    was first looked up, which may be much later.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def started_before(pid: int, when: float) -> bool:
    """Whether process ``pid`` runs and started before time ``when``: it may have made something then.

    A process that started later (a reused pid) cannot have. Without
    ``/proc``, whether the pid runs decides.
    """
    if not pid_alive(pid):
        return False
    started = process_start_time(pid)
    return started is None or started <= when + START_TIME_SLACK


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
    return _kill(qemu_pid, rundir)


def processes_naming(rundir: Path) -> list[int]:
    """This user's processes whose command line names a file in ``rundir`` (none without /proc).

    A VM folder's name is random: only its QEMU names it.
    """
    needle = f"{rundir}/"
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
        except OSError:
            continue
        if needle in _cmdline(int(entry)):
            found.append(int(entry))
    return found


def _kill(qemu_pid: int, rundir: Path) -> int | None:
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
        try:
            changed = os.lstat(rundir).st_ctime
        except OSError:
            continue  # removed meanwhile (by its owner, or another reaper)
        if started_before(int(owner_text), changed):
            continue
        if spare_kept and (rundir / KEPT_MARKER).exists():
            continue
        qemu_pid = stop_qemu(rundir)
        if qemu_pid is not None:
            log.warning("killed orphaned QEMU %d left by dead process %s", qemu_pid, owner_text)
        # Killed before it wrote qemu.pid (right after the fork), its owner left no pid to go by.
        for pid in processes_naming(rundir):
            if _kill(pid, rundir) is not None:
                log.warning("killed orphaned QEMU %d left by dead process %s", pid, owner_text)
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(rundir)
    remove_stale_cache_files()
    return removed


#: The suffix of a taken cached worker (``sandbox/worker_disk.py``); the taker's pid follows.
TAKEN: Final = ".taken-"
#: Linux's largest pid (``pid_max`` cannot be set higher): a thread ident is never one.
PID_LIMIT: Final = 1 << 22


def writer_pid(name: str) -> int | None:
    """The pid a cache file's name gives to the process writing it; None for any other name.

    ``.<name>.taken-<pid>``, or a temporary file ``.<name>.<pid>.tmp``,
    ``.<name>.<pid>.<thread ident>.tmp`` or ``.<name>.<n>.<pid>.tmp``: of
    the two numbers before ``.tmp``, the pid is the last one that can be a
    pid (a thread ident is an address, far above :data:`PID_LIMIT`).
    """
    if not name.startswith(".") or len(name) > 255:
        return None
    base, sep, tail = name.rpartition(TAKEN)
    if sep and len(base) > 1:
        numbers = [tail]
    elif name.endswith(".tmp"):
        numbers = name[1 : -len(".tmp")].split(".")[1:][-2:][::-1]
    else:
        return None
    for number in numbers:
        if number.isascii() and number.isdigit() and 0 < int(number) < PID_LIMIT:
            return int(number)
    return None


def remove_stale_cache_files(root: Path | None = None) -> list[Path]:
    """Remove the cache files named after a writer that is gone; returns those removed.

    Looked for in the cache's folders and their subfolders (where every
    writer puts them), never deeper, never followed through a symlink to a
    file. Only this user's regular files whose writer process does not run,
    or started after the file last changed (its pid reused), are removed.
    ``root`` defaults to the cache root; a cache that does not exist is left
    alone (nothing is created).
    """
    top = paths.cache_root() if root is None else root
    removed: list[Path] = []
    for folder in _cache_folders(top):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            writer = writer_pid(name)
            if writer is None:
                continue
            path = folder / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                continue
            if writer == os.getpid() or started_before(writer, st.st_ctime):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue  # another run's reaper was first
            except OSError as exc:
                log.debug("could not remove %s: %s", path, exc)
                continue
            log.info("removed %s: the process %d writing it is gone", path, writer)
            removed.append(path)
    return removed


def _cache_folders(root: Path) -> list[Path]:
    """``root``'s folders and their folders (symlinked folders too: a cache may be assembled so)."""
    found: list[Path] = []
    for parent in (root, *_subfolders(root)):
        found.extend(_subfolders(parent))
    return found


def _subfolders(folder: Path) -> list[Path]:
    """``folder``'s folders; from the entries' types (no stat each: a cache folder holds thousands)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(entry.path) for entry in entries if entry.is_dir())
    except OSError:
        return []
