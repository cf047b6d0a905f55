"""The per-boot payload appended to the image's initramfs.

Stage 1 copies ``/gondolin`` from the initramfs to ``/run/gondolin`` on the
root (tmpfs) and runs its ``init.sh``. The payload carries the guest half
of this package, which is exactly :mod:`pytest_gondolin.guest` (standard
library and pytest only) plus the package's ``__init__`` that makes it
importable, so agent changes never need an image rebuild, plus per-VM data
(the MTU, the CA to trust).
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from pytest_gondolin.image import cpio

PACKAGE_DIR = Path(__file__).resolve().parent.parent

#: The guest half of the package: every module under it is shipped.
GUEST_PACKAGE = "guest"
#: Extra top-level names in the guest: ``-p gondolin`` must find a module there.
GUEST_ALIASES = {"gondolin.py": "guest/plugin.py"}
#: The guest image's Python (Debian bookworm). When the host runs the same
#: minor version, the payload carries bytecode: compiling the agent costs
#: ~0.5 s of boot under TCG.
GUEST_PYTHON = (3, 11)


def _pyc(source: bytes, guest_path: str) -> bytes:
    """Unchecked hash-based bytecode (PEP 552): valid without matching mtimes."""
    code = compile(source, guest_path, "exec", dont_inherit=True)
    flags = (0b01).to_bytes(4, "little")  # hash-based, not checked against the source
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        # Version 2: no back-references. Versions >= 3 mark objects by their
        # refcount at dump time, so the same source could give different bytes
        # in one process, and the payload's digest (the initrd name, part of
        # the warm-snapshot key) would change between runs: cold boots and a
        # cache that grows. marshal.loads reads every version.
        + marshal.dumps(code, 2)
    )


def guest_modules() -> tuple[str, ...]:
    """The package's files the guest gets, relative to the package folder.

    Every ``.py`` file of :data:`GUEST_PACKAGE` (its modules import nothing
    else of this package; ``tests/unit/test_guest_boundary.py`` checks it),
    plus the package ``__init__.py``: importing ``pytest_gondolin.guest.x``
    runs it first. Sorted, so the payload (and its digest) is reproducible.
    """
    guest = PACKAGE_DIR / GUEST_PACKAGE
    found = sorted(
        path.relative_to(PACKAGE_DIR).as_posix()
        for path in guest.rglob("*.py")
        if "__pycache__" not in path.relative_to(guest).parts
    )
    return ("__init__.py", *found)


def _dirs_for(paths: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in seen:
                seen.append(d)
    return seen


def build_payload(extra_files: dict[str, bytes] | None = None) -> bytes:
    """Return a cpio archive with the guest code under /gondolin plus ``extra_files``.

    ``extra_files`` maps paths relative to /gondolin (e.g. ``"ca.pem"``) to contents.
    """
    files: dict[str, tuple[bytes, int]] = {
        "/gondolin/init.sh": ((PACKAGE_DIR / GUEST_PACKAGE / "init.sh").read_bytes(), 0o755),
    }
    precompile = sys.version_info[:2] == GUEST_PYTHON
    tag = sys.implementation.cache_tag
    for rel in guest_modules():
        src = PACKAGE_DIR / rel
        guest_path = f"/gondolin/py/pytest_gondolin/{rel}"
        source = src.read_bytes()
        files[guest_path] = (source, 0o644)
        if precompile:
            folder, _, name = guest_path.rpartition("/")
            pyc_path = f"{folder}/__pycache__/{name[:-3]}.{tag}.pyc"
            files[pyc_path] = (_pyc(source, "/run" + guest_path), 0o644)
    for alias, rel in GUEST_ALIASES.items():
        files[f"/gondolin/py/{alias}"] = ((PACKAGE_DIR / rel).read_bytes(), 0o644)
    for rel, data in (extra_files or {}).items():
        files[f"/gondolin/{rel.lstrip('/')}"] = (data, 0o644)
    entries = [cpio.Entry.directory(d) for d in _dirs_for(files)]
    entries += [cpio.Entry.file(path, data, mode) for path, (data, mode) in files.items()]
    return cpio.archive(entries)


def combined_initrd(base: Path, payload: bytes, cache: Path) -> Path:
    """Return a file holding ``base`` followed by ``payload``, cached by content hash.

    The name depends on the bytes alone, never on where ``base`` lies: it is
    part of the warm-snapshot key, which must survive a cache moved to
    another folder (``gondolin cache export`` / ``import``).
    """
    content = base.read_bytes() + payload  # ~3 MiB: hashing it costs a few ms
    digest = hashlib.sha256(content).hexdigest()[:20]
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"initrd-{digest}.img"
    if not target.exists():
        tmp = cache / f".initrd-{digest}.{os.getpid()}.tmp"
        tmp.write_bytes(content)
        tmp.rename(target)
    return target
