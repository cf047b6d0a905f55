"""pytest hooks of pytest-gondolin (hooks only; the work lives in other modules).

Loaded by the ``pytest11`` entry point ``gondolin`` or with ``-p gondolin``.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from pytest_gondolin import config as cfg
from pytest_gondolin.fixtures import (  # noqa: F401  (fixtures are found by name in this module)
    ACTIVE_VM_KEY,
    FACTORY_KEY,
    SETTINGS_KEY,
    session_vm,
    vm,
    vm_factory,
)

MARKER_DOC = (
    "sandboxed(*, allow_hosts=(), resolve={}, secrets={}, timeout=None, memory=None, image=None, "
    "cassette=None, block_internal=True, upstream_ca=None, requirements=()): run this test "
    "(fixtures included) inside a fresh QEMU guest restored from a clean snapshot"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    cfg.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    config.stash[SETTINGS_KEY] = cfg.load_settings(config)


def pytest_sessionstart(session: pytest.Session) -> None:
    from pytest_gondolin.vm.reaper import reap_orphans

    reap_orphans()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        machine = item.stash.get(ACTIVE_VM_KEY, None)
        if machine is not None:
            console = machine.console_log()
            if console.strip():
                report.sections.append(("gondolin: guest console (tail)", console[-4000:]))
    return report


def pytest_unconfigure(config: pytest.Config) -> None:
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is not None:
        factory.close_all()
