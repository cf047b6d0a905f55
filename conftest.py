"""Root conftest: pytester for plugin-level tests, and one cache for every inner run."""

from __future__ import annotations

import os

from pytest_gondolin import paths

pytest_plugins = ["pytester"]

# pytester gives inner runs a fresh $HOME; without this they would each build
# the guest image again in a new ~/.cache.
os.environ.setdefault("GONDOLIN_CACHE_DIR", str(paths.cache_dir()))
