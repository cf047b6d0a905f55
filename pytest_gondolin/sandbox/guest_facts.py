"""What a guest image offers an interpreter carried into it: machine, glibc, libraries, its Python.

Asked once per image build with :data:`FACTS_SCRIPT` (one shell command in a
booted guest) and cached as the guest's raw answer, which is validated on
every read like any guest output (:func:`parse_facts`): bounded, exact
shapes, a ValueError naming the bad part otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import ImageError
from pytest_gondolin.sandbox.elf_checks import MACHINES
from pytest_gondolin.vm.identity import VMConfig

__all__ = ["FACTS_SCRIPT", "GuestFacts", "guest_facts", "image_facts", "parse_facts"]

log = logging.getLogger(__name__)

#: Asks the guest, once per image, what a carried interpreter needs to know.
#: Sections are separated by ``@@`` lines: machine, glibc, the image's
#: ``python3`` version, then the shared libraries its linker finds (the
#: ``ld.so`` cache, then the default folders).
FACTS_SCRIPT: Final = (
    "uname -m; echo @@; getconf GNU_LIBC_VERSION; echo @@; "
    "python3 -c 'import platform; print(platform.python_version())' 2>/dev/null; echo @@; "
    "ldconfig -p 2>/dev/null | sed -n 's/^[[:space:]]*\\([^ ]*\\) (.*/\\1/p'; "
    "for d in /lib/*-linux-gnu /usr/lib/*-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; "
    'do ls -1 "$d" 2>/dev/null; done'
)
#: The facts are a few KiB (~600 library names); anything past this is not them.
MAX_FACTS_BYTES: Final = 1 << 20
MAX_LIBRARIES: Final = 50_000
#: Asking a booted guest: one shell, no Python start-up beyond ``python3 -c`` (~0.5 s TCG).
FACTS_TIMEOUT: Final = 60.0
_LIB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,255}")
_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})\.\d{1,3}[a-z0-9+]{0,16}")


class _Execs(Protocol):
    """What :func:`guest_facts` needs of a VM (``VM.exec``)."""

    def exec(self, cmd: str, *, timeout: float | None = ..., check: bool = ...) -> _Result: ...


class _Result(Protocol):
    @property
    def stdout(self) -> str: ...


@dataclass(frozen=True)
class GuestFacts:
    """What a guest image offers an interpreter carried into it."""

    #: ``uname -m``.
    machine: str
    glibc: tuple[int, int]
    #: The image's ``python3`` version (``3.11.2``), empty if it has none.
    python: str
    #: Sonames the guest's dynamic linker finds.
    libraries: frozenset[str]

    @property
    def multiarch(self) -> str:
        return f"{self.machine}-linux-gnu"

    def default_dirs(self) -> tuple[str, ...]:
        """Folders ``ld.so`` searches without a cache entry (Debian's multiarch layout)."""
        return (f"/lib/{self.multiarch}", f"/usr/lib/{self.multiarch}", "/lib", "/usr/lib")


def parse_facts(text: str) -> GuestFacts:
    """The facts :data:`FACTS_SCRIPT` printed; ValueError naming the bad part (guest output is hostile)."""
    if len(text) > MAX_FACTS_BYTES:
        raise ValueError(f"guest facts: {len(text)} bytes, over {MAX_FACTS_BYTES}")
    parts = text.split("@@\n")
    if len(parts) != 4:
        raise ValueError(f"guest facts: {len(parts)} sections, expected 4")
    machine = parts[0].strip()
    if machine not in MACHINES:
        raise ValueError(f"guest facts: unknown machine {machine[:40]!r}")
    glibc = re.fullmatch(r"glibc (\d{1,3})\.(\d{1,3})", parts[1].strip())
    if glibc is None:
        raise ValueError(f"guest facts: bad glibc version {parts[1].strip()[:40]!r}")
    python = parts[2].strip()
    if python and _VERSION.fullmatch(python) is None:
        raise ValueError(f"guest facts: bad Python version {python[:40]!r}")
    names = {n for n in parts[3].split() if ".so" in n and _LIB_NAME.fullmatch(n)}
    if len(names) > MAX_LIBRARIES:
        raise ValueError(f"guest facts: {len(names)} libraries, over {MAX_LIBRARIES}")
    return GuestFacts(machine, (int(glibc[1]), int(glibc[2])), python, frozenset(names))


def _read_cached(image_id: str, cache: Path) -> GuestFacts | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", image_id):
        raise ValueError(f"bad image id {image_id!r}")
    try:
        return parse_facts((cache / f"guest-{image_id}.txt").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def guest_facts(vm: _Execs, image_id: str, cache: Path) -> GuestFacts:
    """The facts of image ``image_id``: from ``cache``, or asked of ``vm`` (booted from it) and cached.

    Raises ImageError when the guest's answer is not facts.
    """
    cached = _read_cached(image_id, cache)
    if cached is not None:
        return cached
    target = cache / f"guest-{image_id}.txt"
    text = vm.exec(FACTS_SCRIPT, timeout=FACTS_TIMEOUT, check=True).stdout
    try:
        facts = parse_facts(text)  # only a valid answer is cached
    except ValueError as exc:
        raise ImageError(f"image {image_id} does not say what it offers a Python: {exc}") from exc
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{target.name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:  # a read-only cache: ask again next session
        log.debug("guest facts not cached: %s", exc)
    return facts


def image_facts(
    config: VMConfig, cache: Path, *, progress: Callable[[str], None] | None = None
) -> GuestFacts:
    """The facts of ``config``'s image: cached, or asked of a guest started from its ready snapshot.

    The first session on an image pays one restore of the ready snapshot
    (a boot if there is none yet); later ones read the cache.
    """
    image_id = config.image.build_id
    cached = _read_cached(image_id, cache)
    if cached is not None:
        return cached
    # Here: booting pulls in the VM machinery, needed only the first time.
    from pytest_gondolin.vm.warm import WARM_LOCK_TIMEOUT, launch_clean

    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
    # One asker per image at a time (xdist workers starting together); the
    # others read its answer. Bounded like the ready snapshot it may build.
    lock = filelock.FileLock(str(paths.lock_path(cache / f"guest-{image_id}.lock")))
    with lock.acquire(timeout=WARM_LOCK_TIMEOUT + FACTS_TIMEOUT):
        cached = _read_cached(image_id, cache)
        if cached is not None:
            return cached
        if progress is not None:
            progress(f"asking image {image_id} what it offers the host's Python (once per image)")
        vm = launch_clean(config, name="python-probe", progress=progress)
        try:
            return guest_facts(vm, image_id, cache)
        finally:
            vm.close()
