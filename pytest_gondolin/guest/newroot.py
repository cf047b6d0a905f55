"""The new root of a process-isolated test: the system calls and the plan of its mounts.

:func:`plan_root` turns the worker's mount table into the mounts of the test's
root (pure: unit-tested on a captured table); :func:`build_root` makes them
under the per-test tmpfs at :data:`SCRATCH`, inside the test's own mount
namespace (:mod:`pytest_gondolin.guest.isolation` calls both). The system
calls go through ``ctypes`` (``os.unshare`` and ``os.setns`` exist only from
Python 3.12). Standard library only: this module runs in the guest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple

__all__ = [
    "SCRATCH",
    "SCRATCH_SIZE",
    "MountEntry",
    "Step",
    "build_root",
    "check",
    "escape",
    "libc",
    "mount",
    "parse_mountinfo",
    "pivot_root",
    "plan_root",
    "setns",
    "umount",
    "unshare",
]

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWPID: Final = 0x20000000
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2
#: ``pivot_root`` has no libc wrapper: its system call number per machine.
_SYS_PIVOT_ROOT: Final = {"x86_64": 155, "aarch64": 41, "arm64": 41}

#: Where each run's tmpfs is mounted (in the run's own mount namespace only).
SCRATCH: Final = "/run/gondolin-isolation"
#: The per-test tmpfs mounts (upper layers, /tmp, /dev/shm) are bounded, so
#: that a test filling one gets ENOSPC rather than drive the guest out of
#: memory (the worker must survive it). tmpfs takes a share of RAM.
SCRATCH_SIZE: Final = "40%"

#: File systems bound as they are into the new root (kernel views, not files).
_BIND_TYPES: Final = frozenset(
    {
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "bpf",
        "pstore",
        "configfs",
        "fusectl",
        "mqueue",
        "devpts",
        "hugetlbfs",
        "binfmt_misc",
        "efivarfs",
    }
)
#: Trees that get a fresh, empty tmpfs per test rather than an overlay.
_FRESH: Final = ("/tmp", "/dev/shm")

# -- system calls ------------------------------------------------------------------

_LIBC: list[ctypes.CDLL] = []


def libc() -> ctypes.CDLL:
    """The C library, loaded once (before any fork: looking it up in a child is slow)."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # not glibc: ask (slow: runs ldconfig), once
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _LIBC.append(libc)
    return _LIBC[0]


def check(result: int, what: str) -> int:
    """``result`` of a C call; OSError naming ``what`` and errno when it is negative."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    """unshare(2); OSError naming the flags."""
    check(libc().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """setns(2); OSError naming the type."""
    check(libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); OSError naming the file system and the target."""
    result = libc().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    check(result, f"mount {fstype or 'bind'} {source} on {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    check(libc().umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (a raw system call)."""
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: no system call number known for {platform.machine()}")
    result = libc().syscall(ctypes.c_long(number), new_root.encode(), put_old.encode())
    check(result, f"pivot_root({new_root}, {put_old})")


# -- the new root, as a plan (pure) -------------------------------------------------


class MountEntry(NamedTuple):
    """One line of ``/proc/self/mountinfo`` (proc(5)): the parts a plan needs."""

    point: str
    fstype: str
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` (octal)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The mounts of ``text`` (mountinfo format), in its order; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail or not fields[4].startswith("/"):
            continue
        entries.append(MountEntry(_unescape(fields[4]), tail[0], "ro" in fields[5].split(",")))
    return entries


class Step(NamedTuple):
    """One mount of the new root: ``kind`` is ``overlay``, ``tmpfs``, ``bind`` or ``bind-ro``."""

    kind: str
    point: str


def plan_root(mounts: Iterable[MountEntry], *, is_dir: Callable[[str], bool]) -> list[Step]:
    """The mounts that make the new root out of the current one, parents first.

    ``/`` and every writable tree become overlays (the tree as it is below,
    a per-test upper layer); ``/tmp`` and ``/dev/shm`` fresh tmpfs; kernel
    views and read-only mounts are bound as they are, ``/sys`` read-only
    (its writes are kernel state); a file mounted on a file is bound
    read-only. ``/proc`` is left out: the test mounts its own.
    """
    steps: list[Step] = []
    for entry in mounts:
        point = entry.point
        if point == SCRATCH or point.startswith(SCRATCH + "/") or entry.fstype == "proc":
            continue
        if point == "/":
            steps.append(Step("overlay", point))
        elif point in _FRESH:
            steps.append(Step("tmpfs", point))
        elif entry.fstype == "sysfs":
            steps.append(Step("bind-ro", point))
        elif entry.fstype in _BIND_TYPES or entry.read_only:
            steps.append(Step("bind", point))
        elif not is_dir(point):
            steps.append(Step("bind-ro", point))
        else:
            steps.append(Step("overlay", point))
    # Parents before children: mountinfo lists /proc, /sys and /dev before /
    # (the initramfs mounted them first), and a mount made before its
    # parent's would be hidden under it.
    return sorted(steps, key=lambda step: 0 if step.point == "/" else step.point.count("/"))


def escape(path: str) -> str:
    """``path`` in an overlay option: ``,`` separates options, ``:`` layers (escaped with ``\\``)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def build_root(steps: Sequence[Step]) -> str:
    """Mount ``steps`` under :data:`SCRATCH`/root; return the new root's path."""
    root = f"{SCRATCH}/root"
    os.mkdir(root)
    for n, step in enumerate(steps):
        target = root + step.point if step.point != "/" else root
        if step.kind == "overlay":
            upper, work = f"{SCRATCH}/{n}u", f"{SCRATCH}/{n}w"
            os.mkdir(upper)
            os.mkdir(work)
            if not os.path.isdir(target):
                os.makedirs(target)
            data = f"lowerdir={escape(step.point)},upperdir={upper},workdir={work}"
            mount("overlay", target, "overlay", 0, data)
        elif step.kind == "tmpfs":
            if not os.path.isdir(target):
                os.makedirs(target)
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={SCRATCH_SIZE}")
        else:
            if not os.path.lexists(target):
                if os.path.isdir(step.point):
                    os.makedirs(target)
                else:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(step.point, target, "", MS_BIND)
            if step.kind == "bind-ro":
                mount("none", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY)
    return root
