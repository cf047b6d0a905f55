"""Fixtures shared by the pytester runs of ``tests/plugin``."""

from __future__ import annotations

import pytest

from pytest_gondolin import paths
from tests.plugin.test_sandboxed import _inner_env_changes


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose subprocess runs share the real image and snapshot cache."""
    for name, value in _inner_env_changes(paths.cache_dir()).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return pytester
