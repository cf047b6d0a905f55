"""Write Linux initramfs archives (cpio "newc" format).

The kernel unpacks every cpio archive it finds concatenated in the initrd,
later archives overriding earlier ones. The image build writes the base
archive once (busybox, modules, stage-1 init); each boot appends a small
archive with the per-boot payload (agent code, stage-2 init), so changing
the agent never rebuilds the image.

Format reference: the kernel's ``Documentation/driver-api/early-userspace/
buffer-format.rst`` (110-byte ASCII header, name and data padded to 4).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One member of an archive: a directory, regular file or symlink."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, path: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> bytes:
    name = path.lstrip("/").encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad(len(header) + len(name)) + data + _pad(len(data))


def archive(entries: Iterable[Entry]) -> bytes:
    """Return a complete newc archive (with trailer) holding ``entries`` in order.

    Parent directories must be listed before their children. Owners are
    root, mtimes zero, so the output depends only on the entries.
    """
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        out += _member(ino, entry.path, entry.mode, entry.data, entry.rdev)
    out += _member(ino + 1, _TRAILER, 0, b"")
    out += _pad(len(out))
    return bytes(out)
