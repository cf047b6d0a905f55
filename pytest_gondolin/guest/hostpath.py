"""The host's import path in the guest: its site folders on ``sys.path``, in the host's order.

Runs the guest test worker as::

    PYTHON -s -m pytest_gondolin.guest.hostpath [worker args ...]

where PYTHON is the host's own ``sys.executable`` carried into the guest
(``sandbox/host_python.py``), or the image's ``python3`` when it cannot run
there, with :data:`HOST_PATH_ENV` naming the host's folders (copied to the same
absolute paths by the host). Before anything imports pytest, each folder is
put on ``sys.path`` the way the host's interpreter put it there: a site
folder through :func:`site.addsitedir`, so its ``.pth`` files run (editable
installs of every kind: plain paths, setuptools' and hatchling's import
finders), a plain folder as is. They go right after the guest's standard
library, where the host has them, ahead of the image's own
``dist-packages``; then the worker (:mod:`pytest_gondolin.guest.worker`)
runs as ``__main__``. Standard library only.
"""

from __future__ import annotations

import json
import os
import runpy
import site
import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["HOST_PATH_ENV", "PLAIN", "SITE", "install", "parse_entries"]

#: Environment variable holding the host's folders: a JSON list of
#: ``[kind, path]`` pairs, kind :data:`SITE` or :data:`PLAIN`.
HOST_PATH_ENV: Final = "GONDOLIN_HOST_PATH"
#: A site folder: added with ``site.addsitedir`` (its ``.pth`` files run).
SITE: Final = "site"
#: A plain folder on the host's ``sys.path`` (``PYTHONPATH``, ``pip --target``).
PLAIN: Final = "path"
_WORKER_MODULE: Final = "pytest_gondolin.guest.worker"


def parse_entries(text: str) -> list[tuple[str, str]]:
    """The ``[kind, path]`` pairs of :data:`HOST_PATH_ENV`; ValueError on anything else."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{HOST_PATH_ENV} must be a JSON list")
    out: list[tuple[str, str]] = []
    for item in data:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in (SITE, PLAIN)
            or not isinstance(item[1], str)
            or not item[1].startswith("/")
        ):
            raise ValueError(f"{HOST_PATH_ENV}: bad entry {item!r}")
        out.append((item[0], item[1]))
    return out


def _first_site_index(path: Sequence[str]) -> int:
    """Where the guest's own site folders start (after its standard library)."""
    for i, entry in enumerate(path):
        if os.path.basename(entry.rstrip("/")) in ("site-packages", "dist-packages"):
            return i
    return len(path)


def install(entries: Sequence[tuple[str, str]]) -> None:
    """Put ``entries`` on ``sys.path`` after the guest's standard library, in order.

    Site folders go through :func:`site.addsitedir`, which appends the folder
    and then what its ``.pth`` files name (existing folders only) and runs
    their ``import`` lines, exactly as the host's ``site`` module did. A
    folder already on ``sys.path`` is left where it is: when the worker runs
    as the host's own interpreter (``sandbox/host_python.py``), ``site`` set
    up the host's site folders at start-up, ``.pth`` files included, and
    running those again would install their import hooks twice.
    """
    at = _first_site_index(sys.path)
    head, tail = sys.path[:at], sys.path[at:]
    present = set(sys.path)
    sys.path[:] = head
    for kind, folder in entries:
        if folder in present:
            continue
        if kind == SITE:
            site.addsitedir(folder)
        elif folder not in sys.path:
            sys.path.append(folder)
    sys.path.extend(entry for entry in tail if entry not in sys.path)


def main() -> None:
    """Install the host's path from the environment, then run the worker with our argv."""
    text = os.environ.get(HOST_PATH_ENV)
    if text:
        install(parse_entries(text))
    sys.argv[0] = _WORKER_MODULE
    runpy.run_module(_WORKER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
