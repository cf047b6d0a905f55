"""What an ELF object needs to run somewhere: its machine, glibc symbol versions, shared libraries.

:func:`read_elf` reads a host file (the interpreter, ``libpython``, an
extension module, a shared library) with ``pyelftools`` and returns an
:class:`ElfNeeds`; :func:`why_not_runnable` says whether a guest with the
given machine, glibc and libraries can load it. Files are the host's own,
but a broken or truncated one is still possible: anything ``pyelftools``
cannot read is an :class:`ElfReadError` naming the file, never another
exception.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

__all__ = [
    "MACHINES",
    "ElfNeeds",
    "ElfReadError",
    "glibc_version",
    "is_elf",
    "read_elf",
    "why_not_runnable",
]

#: ``uname -m`` in the guest → ELF ``e_machine`` (as pyelftools names it).
MACHINES: Final = {
    "x86_64": "EM_X86_64",
    "aarch64": "EM_AARCH64",
    "i686": "EM_386",
    "i386": "EM_386",
    "riscv64": "EM_RISCV",
    "ppc64le": "EM_PPC64",
    "s390x": "EM_S390",
}
#: Host files are read whole by nobody; pyelftools seeks. A "library" bigger
#: than this is not one we carry (libpython is ~25 MB with symbols).
MAX_ELF_BYTES: Final = 512 * 1024 * 1024
#: Bounds on what one object may list (real ones have tens).
MAX_NEEDED: Final = 1024
MAX_VERSIONS: Final = 4096
_GLIBC = re.compile(r"GLIBC_(\d{1,3})\.(\d{1,3})(?:\.\d{1,3})?")
_MAGIC: Final = b"\x7fELF"


class ElfReadError(Exception):
    """A file that should be an ELF object could not be read as one."""


@dataclass(frozen=True)
class ElfNeeds:
    """What one ELF object asks of the system that loads it."""

    #: ``e_machine`` as pyelftools names it (``EM_X86_64``).
    machine: str
    #: ``DT_NEEDED`` sonames, in order.
    needed: tuple[str, ...]
    #: ``DT_RUNPATH`` (or ``DT_RPATH``) folders, ``$ORIGIN`` expanded.
    runpath: tuple[str, ...]
    #: The newest ``GLIBC_x.y`` symbol version it needs (None: none).
    glibc: tuple[int, int] | None


def glibc_version(name: str) -> tuple[int, int] | None:
    """``(2, 34)`` for ``GLIBC_2.34`` (and ``GLIBC_2.2.5`` → ``(2, 2)``); None otherwise."""
    match = _GLIBC.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def is_elf(path: str) -> bool:
    """Whether ``path`` is a regular file starting with the ELF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _MAGIC
    except OSError:
        return False


def read_elf(path: str) -> ElfNeeds:
    """The machine, needed libraries, run path and glibc need of ELF file ``path``.

    Raises ElfReadError (naming ``path``) when it is not a readable ELF object.
    """
    # Imported here: pyelftools costs ~0.05-0.25 s to import, and a session
    # whose interpreter choice is cached (host_python) reads no ELF file.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        size = os.path.getsize(path)
        if size > MAX_ELF_BYTES:
            raise ElfReadError(f"{path}: {size} bytes, over {MAX_ELF_BYTES} for an ELF object")
        with open(path, "rb") as fh:
            return _read(ELFFile(fh), path)
    except ElfReadError:
        raise
    # pyelftools raises ELFError for what it recognises, struct/Value/Unicode
    # errors for truncated or inconsistent tables.
    except (ELFError, OSError, ValueError, struct.error, UnicodeDecodeError, KeyError) as exc:
        raise ElfReadError(f"{path}: not a readable ELF object ({exc})") from exc


def _read(elf: ELFFile, path: str) -> ElfNeeds:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.gnuversions import GNUVerNeedSection

    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    glibc: tuple[int, int] | None = None
    origin = os.path.dirname(os.path.abspath(path))
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                kind = tag.entry.d_tag
                if kind == "DT_NEEDED":
                    needed.append(str(getattr(tag, "needed", "")))
                elif kind == "DT_RUNPATH":
                    runpath += str(getattr(tag, "runpath", "")).split(":")
                elif kind == "DT_RPATH":
                    rpath += str(getattr(tag, "rpath", "")).split(":")
                if len(needed) > MAX_NEEDED:
                    raise ElfReadError(f"{path}: more than {MAX_NEEDED} needed libraries")
        elif isinstance(section, GNUVerNeedSection):
            count = 0
            for _verneed, auxiliaries in section.iter_versions():
                for aux in auxiliaries:
                    count += 1
                    if count > MAX_VERSIONS:
                        raise ElfReadError(f"{path}: more than {MAX_VERSIONS} version needs")
                    version = glibc_version(str(aux.name))
                    if version is not None and (glibc is None or version > glibc):
                        glibc = version
    # ld.so ignores DT_RPATH when DT_RUNPATH is present.
    folders = runpath or rpath
    expanded = tuple(
        os.path.normpath(f.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
        for f in folders
        if f
    )
    return ElfNeeds(str(elf["e_machine"]), tuple(needed), expanded, glibc)


def why_not_runnable(
    path: str,
    needs: ElfNeeds,
    *,
    machine: str,
    glibc: tuple[int, int],
    libraries: Collection[str],
) -> str | None:
    """Why a guest (``machine``, ``glibc``, sonames ``libraries``) cannot load ``path``; None: it can."""
    if needs.machine != machine:
        return f"{path} is built for {needs.machine}, the guest is {machine}"
    if needs.glibc is not None and needs.glibc > glibc:
        return (
            f"{path} needs glibc {needs.glibc[0]}.{needs.glibc[1]}, "
            f"the guest has {glibc[0]}.{glibc[1]}"
        )
    missing = [name for name in needs.needed if name not in libraries]
    if missing:
        return f"{path} needs {', '.join(missing)}, which the guest lacks"
    return None
