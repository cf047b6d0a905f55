"""Root conftest: pytester for plugin-level tests, and one cache for every inner run."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

# pytester gives inner runs a fresh $HOME; without this they would each build
# the guest image again in a new ~/.cache. (Not in a guest test worker, which
# has no image cache and only the guest half of the package.)
if os.environ.get("PYTEST_GONDOLIN_WORKER") != "1":
    from pytest_gondolin import paths

    os.environ.setdefault("GONDOLIN_CACHE_DIR", str(paths.cache_dir()))

#: Plugins installed for the tests that enable them (``-p randomly``, ``-p asyncio``) are
#: off in inner pytest runs: pytest-randomly would shuffle and reseed them, pytest-asyncio
#: warns at configure (fatal under ``-W error``). tests/plugin/test_sandboxed.py's inner
#: runs set the same value.
INNER_ADDOPTS = "-p no:randomly -p no:asyncio"


@pytest.fixture(autouse=True)
def _inner_runs_without_optional_plugins(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inner pytester runs get INNER_ADDOPTS (pytester itself clears ``PYTEST_ADDOPTS``)."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
        monkeypatch.setenv("PYTEST_ADDOPTS", INNER_ADDOPTS)


# Hypothesis budget: every property test sets its own max_examples; the "ci"
# profile (chosen when $CI is set, or by GONDOLIN_HYPOTHESIS_PROFILE) makes
# the runs reproducible and immune to a loaded host's timing. Hypothesis is a
# test-only dependency the guest worker does not have.
try:
    from hypothesis import HealthCheck, settings
except ImportError:
    pass
else:
    settings.register_profile(
        "ci",
        derandomize=True,  # the same examples every run: a CI failure reproduces locally
        deadline=None,  # two shared cores: per-example timing is noise, not a signal
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.register_profile("dev")
    settings.load_profile(
        os.environ.get("GONDOLIN_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    )
