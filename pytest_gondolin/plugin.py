"""pytest hooks of pytest-gondolin (hooks only; the work lives in other modules).

Loaded by the ``pytest11`` entry point ``gondolin`` or with ``-p gondolin``.
``pytest_configure`` registers the feature's plugin objects, which own their
state and hooks: :class:`~pytest_gondolin.sandbox.session.SandboxSession`
(``@pytest.mark.sandboxed``) and
:class:`~pytest_gondolin.diagnostics.Diagnostics` (header, guest status,
failure artifacts, kept VMs).
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

import pytest_gondolin.config as cfg
from pytest_gondolin.diagnostics import PLUGIN_NAME as DIAGNOSTICS
from pytest_gondolin.diagnostics import Diagnostics
from pytest_gondolin.fixtures import (  # noqa: F401  (fixtures are found by name in this module)
    ACTIVE_VM_KEY,
    FACTORY_KEY,
    SETTINGS_KEY,
    session_vm,
    vm,
    vm_factory,
)
from pytest_gondolin.logtail import console_excerpt
from pytest_gondolin.sandbox.session import PLUGIN_NAME as SANDBOX
from pytest_gondolin.sandbox.session import SandboxSession


def pytest_addoption(parser: pytest.Parser) -> None:
    cfg.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", cfg.MARKER_DOC)
    settings = config.stash[SETTINGS_KEY] = cfg.load_settings(config)
    if not config.pluginmanager.has_plugin(SANDBOX):
        config.pluginmanager.register(SandboxSession(config, settings), SANDBOX)
    if not config.pluginmanager.has_plugin(DIAGNOSTICS):
        config.pluginmanager.register(Diagnostics(config), DIAGNOSTICS)


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> Generator[None, int, int]:
    from pytest_gondolin.workers import cap_auto_workers

    return cap_auto_workers(config, (yield))


def pytest_sessionstart(session: pytest.Session) -> None:
    from pytest_gondolin.vm.reaper import reap_orphans

    reap_orphans()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when != "setup" and "vm_factory" in getattr(item, "fixturenames", ()):
        _fail_on_cassette_misses(item.config, report)
    if report.failed:
        machine = item.stash.get(ACTIVE_VM_KEY, None)
        if machine is not None:
            console = machine.console_log()
            if console.strip():
                report.sections.append(
                    ("gondolin: guest console (tail)", console_excerpt(console, 4000))
                )
    return report


def _fail_on_cassette_misses(config: pytest.Config, report: pytest.TestReport) -> None:
    """A request that missed a host-side VM's cassette fails the test that made it.

    The same rule (and message) as for a sandboxed test's cassette; the test
    must have used ``vm_factory`` (directly, or through ``vm``/``session_vm``
    or a fixture of its own).
    """
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is None:
        return
    messages = factory.cassette_misses()
    if not messages:
        return
    message = "\n".join(messages)
    if report.passed:
        report.outcome = "failed"
        report.longrepr = message
    else:
        report.sections.append(("gondolin: cassette", message))


def pytest_unconfigure(config: pytest.Config) -> None:
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is not None:
        factory.close_all()
