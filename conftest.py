"""Root conftest: pytester for plugin-level tests, and one cache for every inner run."""

from __future__ import annotations

import os

pytest_plugins = ["pytester"]

# pytester gives inner runs a fresh $HOME; without this they would each build
# the guest image again in a new ~/.cache. (Not in a guest test worker, which
# has no image cache and only the guest half of the package.)
if os.environ.get("PYTEST_GONDOLIN_WORKER") != "1":
    from pytest_gondolin import paths

    os.environ.setdefault("GONDOLIN_CACHE_DIR", str(paths.cache_dir()))
