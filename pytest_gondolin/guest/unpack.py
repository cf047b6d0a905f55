"""The agent's ``unpack`` request: a small tar the host wrote to the guest, unpacked in-process.

The host copies a project tree into the guest before its worker collects
(``sandbox/worker_setup.py``). A shell running ``tar`` costs ~0.25 s under
TCG right after a restore (two processes started); the agent, already
running, unpacks a tree of a few dozen files in a fraction of that. Python's
``tarfile`` is slower per file than GNU tar (~2 ms against ~0.5 ms under
TCG), so the host sends only small trees this way and runs ``tar`` for the
rest.

The tar (several may be joined) is unpacked at ``/`` as GNU tar would as
root (modes, times, owners, links), the file is removed whatever happens,
then ``folder`` is made if it is missing (the folder the worker starts in).
The host's own data: trusted, nothing of it is filtered.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

__all__ = ["unpack_tar"]

#: ``tarfile``'s own extraction filter where it has one (3.12+, and 3.14 changes the default).
_TRUSTED: dict[str, Any] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)


def unpack_tar(path: str, folder: str) -> None:
    """Unpack the tar file ``path`` at ``/``, remove it, make ``folder``; OSError or TarError on failure."""
    try:
        # ignore_zeros reads past each joined tar's end, but skips a bad
        # header too: the first one is checked without it.
        with tarfile.open(path, mode="r:") as tar:
            tar.next()
        with tarfile.open(path, mode="r:", ignore_zeros=True) as tar:
            tar.extractall("/", **_TRUSTED)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    os.makedirs(folder, exist_ok=True)
