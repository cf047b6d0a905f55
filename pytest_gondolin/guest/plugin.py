"""The plugin as the guest sees it: importable there as the top-level module ``gondolin``.

Registers the same marker and options as the host plugin (so ``-p gondolin``
in a project's ``addopts`` and ``--strict-markers`` work in the guest too)
plus the markers of the plugins the host applies around a run
(pytest-timeout's ``timeout``, pytest-rerunfailures' ``flaky``), and
replaces the host-only fixtures with ones that explain why they are not
available. In the test worker, ``breakpoint()`` in a run stops it in pdb on
the host's terminal (:func:`pytest_gondolin.guest.debugger.breakpoints`), and
Hypothesis's ``deadline`` is off for the run (:func:`without_hypothesis_deadline`).
Imports only pytest and :mod:`pytest_gondolin.guest`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager

import pytest

from pytest_gondolin.guest import debugger, options


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", options.MARKER_DOC)
    if not config.pluginmanager.has_plugin("timeout"):
        # pytest-timeout is a host plugin: the host enforces its marker on the
        # run (sandbox/timeout_plugin.py); registered so --strict-markers holds.
        config.addinivalue_line("markers", options.TIMEOUT_MARKER_DOC)
    if not config.pluginmanager.has_plugin("rerunfailures"):
        # Likewise pytest-rerunfailures: the host reruns a sandboxed test.
        config.addinivalue_line("markers", options.FLAKY_MARKER_DOC)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # A run of the worker: pdb in it gets the host's terminal (or fails saying why not).
    with debugger.breakpoints(), without_hypothesis_deadline(item):
        return (yield)


#: Where ``@given`` keeps the settings a test runs with; read on every call
#: (hypothesis/core.py), so replacing it before the run takes effect.
_HYPOTHESIS_SETTINGS = "_hypothesis_internal_use_settings"


@contextmanager
def without_hypothesis_deadline(item: pytest.Item) -> Iterator[None]:
    """Run a Hypothesis test (``@given``) with ``deadline=None``; other items untouched.

    A deadline is a wall-clock check, and a sandboxed test runs in a guest
    restored just before it, where the first pass through any code is
    slower than on the host (under TCG each new QEMU translates it again):
    attrs' suite failed two tests with "Unreliable test timings! On an
    initial run, this test took 763ms, which exceeded the deadline of
    400ms, but on a subsequent run it took 213ms". Hypothesis turns the
    deadline off on CI for the same reason. The test's other settings
    (its profile, ``@settings``) stay; the host's runs keep the deadline.
    """
    function = getattr(item, "function", None)
    current = getattr(function, _HYPOTHESIS_SETTINGS, None)
    if function is None or current is None or not getattr(function, "is_hypothesis_test", False):
        yield
        return
    # type(current) is hypothesis.settings: not imported here (the guest half
    # imports only pytest), and a test module that uses @given imported it.
    setattr(function, _HYPOTHESIS_SETTINGS, type(current)(parent=current, deadline=None))
    try:
        yield
    finally:
        setattr(function, _HYPOTHESIS_SETTINGS, current)


def _host_only(name: str) -> object:
    @pytest.fixture(name=name)
    def fixture() -> None:
        pytest.fail(
            f"fixture {name!r} is a host fixture (it drives VMs from the host) and is not available "
            "inside a @pytest.mark.sandboxed test, which already runs in a VM",
            pytrace=False,
        )

    return fixture


@pytest.fixture
def http_traffic() -> object:
    """This test's HTTP traffic as the host recorded it (requests, get_requests, assert_request_made, stub, clear)."""
    from pytest_gondolin.guest.traffic import GuestTraffic

    return GuestTraffic()


vm = _host_only("vm")
session_vm = _host_only("session_vm")
vm_factory = _host_only("vm_factory")
