"""Root conftest: pytester for plugin-level tests, one cache for every inner run, and the
``inner`` fixture (a pytester whose runs share it) every test folder uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# pytester gives inner runs a fresh $HOME; without this they would each build
# the guest image again in a new ~/.cache. (Not in a guest test worker, which
# has no image cache and only the guest half of the package.)
if os.environ.get("PYTEST_GONDOLIN_WORKER") != "1":
    from pytest_gondolin import paths

    os.environ.setdefault("GONDOLIN_CACHE_DIR", str(paths.cache_dir()))

#: Plugins installed for the tests that enable them (``-p randomly``, ``-p asyncio``, ...) are
#: off in inner pytest runs: pytest-randomly would shuffle and reseed them, pytest-asyncio
#: warns at configure (fatal under ``-W error``), and the plugin table's (pytest-benchmark,
#: pytest-httpx, pytest-recording: tests/plugin/test_plugin_table.py) would load in every
#: inner run's guest and slow its start-up.
INNER_ADDOPTS = "-p no:randomly -p no:asyncio -p no:benchmark -p no:pytest_httpx -p no:recording"
#: Fixed terminal width for inner runs, so summary-line truncation does not
#: depend on the outer environment's ``COLUMNS``.
INNER_COLUMNS = "120"


def inner_env_changes(cache: Path) -> dict[str, str | None]:
    """Environment for an inner run: the shared VM cache, plugins autoloaded, fixed width
    (``None``: unset the variable)."""
    return {
        "GONDOLIN_CACHE_DIR": str(cache),
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": None,  # xdist must load for ``-n``
        "PYTEST_ADDOPTS": INNER_ADDOPTS,  # the optional plugins are enabled where tested
        "COLUMNS": INNER_COLUMNS,
        "PY_COLORS": "0",
        # With $CI set pytest prints whole multi-line messages in the short
        # summary (and gondolin's record mode defaults to "none"): keep the
        # inner runs' output the same on a laptop and in CI.
        "CI": None,
        "BUILD_NUMBER": None,
    }


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    from pytest_gondolin import paths

    return paths.cache_dir()


@pytest.fixture
def inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gondolin_cache: Path
) -> pytest.Pytester:
    """A pytester whose subprocess runs share the real image and snapshot cache."""
    for name, value in inner_env_changes(gondolin_cache).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return pytester


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
