"""What items report when their guest worker could not be prepared (``sandbox/session.py``)."""

from __future__ import annotations

import pytest

from pytest_gondolin.errors import (
    AgentError,
    ConfigError,
    ExecError,
    VMLaunchError,
    WorkerProtocolError,
)
from pytest_gondolin.sandbox.replay import IN_GUEST
from pytest_gondolin.sandbox.session import _preparation_failure


@pytest.mark.parametrize(
    ("exc", "headline"),
    [
        (
            AgentError("test worker exited before collecting (exit code 4)\nImportError: x"),
            f"{IN_GUEST} AgentError: test worker exited before collecting (exit code 4)",
        ),
        (
            WorkerProtocolError("while collecting: bad line"),
            f"{IN_GUEST} WorkerProtocolError: while collecting: bad line",
        ),
        (ExecError("guest command ['tar'] exited with 2"), f"{IN_GUEST} ExecError: guest command"),
        # The host's side: QEMU, the host's pip.
        (VMLaunchError("QEMU exited"), "VMLaunchError: VM failed to start: QEMU exited"),
        (ConfigError("pip could not install"), "ConfigError: pip could not install"),
    ],
)
def test_a_failure_the_guest_caused_says_so(exc: Exception, headline: str) -> None:
    failure = _preparation_failure(exc)
    assert failure.kind == "error"
    assert failure.headline.startswith(headline)
    assert failure.headline.startswith(IN_GUEST) == headline.startswith(IN_GUEST)


def test_a_bug_keeps_its_traceback() -> None:
    try:
        raise KeyError("oops")
    except KeyError as exc:
        failure = _preparation_failure(exc)
    assert failure.headline == "KeyError: 'oops'"
    assert "Traceback (most recent call last)" in failure.detail
    assert 'raise KeyError("oops")' in failure.detail
