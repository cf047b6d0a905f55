"""Where pytest-gondolin keeps its files.

* cache (images, warm snapshots, the MITM CA): ``$GONDOLIN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/pytest-gondolin``, else ``~/.cache/pytest-gondolin``.
* runtime (per-VM sockets, overlays, console logs): a private directory
  under ``$XDG_RUNTIME_DIR`` or the system temp dir, one subdirectory per
  VM, reaped when its owner process is gone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache root, creating it if needed."""
    env = os.environ.get("GONDOLIN_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-gondolin"
    root.mkdir(parents=True, exist_ok=True)
    return root


def runtime_dir() -> Path:
    """Return the per-user runtime root (mode 0700), creating it if needed.

    Kept short: Unix socket paths are limited to 107 bytes.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    root = Path(base) / f"gondolin-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root
