"""pytest-timeout and sandboxed tests: its timeout bounds the test's run in the guest.

pytest-timeout arms a SIGALRM (or a timer thread) around each item's whole
runtest protocol. On the host, a sandboxed item's protocol also prepares its
guest worker (VM boot or restore, project copy, the worker's start-up and
collection), and the alarm's ``pytest.fail`` would escape the protocol as an
INTERNALERROR. So for sandboxed items :class:`~.session.SandboxSession`
answers pytest-timeout's ``pytest_timeout_set_timer`` hook itself (no timer
is armed on the host), and :func:`plugin_timeout` reads the item's effective
pytest-timeout value, which :mod:`.options` folds into the run's timeout:
the host kills the run, shows the guest's stack dump and fails that test,
as with ``sandboxed(timeout=...)``.

pytest-timeout's precedence, read the way it reads it (its helpers are
private): the ``timeout`` marker, then ``--timeout``, then the
``PYTEST_TIMEOUT`` environment variable, then the ``timeout`` ini key; a
value of 0 or less means no timeout. ``method`` and ``func_only`` do not
apply: the host ends the run the same way whatever the method, and the
bound covers the item's setup, call and teardown in the guest.
"""

from __future__ import annotations

import os
from typing import Final

import pytest

from pytest_gondolin.errors import ConfigError

__all__ = ["PLUGIN_NAME", "plugin_timeout"]

#: pytest-timeout's name in the plugin manager (its entry point, and ``-p timeout``).
PLUGIN_NAME: Final = "timeout"
#: The environment variable pytest-timeout reads between ``--timeout`` and the ini key.
ENV_VAR: Final = "PYTEST_TIMEOUT"


def plugin_timeout(item: pytest.Item) -> float | None:
    """pytest-timeout's timeout for ``item`` in seconds; ``None`` for none.

    ``None`` also when pytest-timeout is not loaded (its marker is then just
    a marker). Raises ConfigError naming the test and the source of a value
    that is not a number.
    """
    config = item.config
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        return None
    value: object = None
    source = ""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
        source = "@pytest.mark.timeout"
    if value is None:
        value, source = config.getoption("timeout", None), "--timeout"
    if value is None:
        value, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if value is None:
        value, source = config.getini("timeout") or None, "the timeout ini key"
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{item.nodeid}: {source}: timeout must be a number, got {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{item.nodeid}: {source}: timeout must be a number, got {value!r}"
        ) from exc
    # pytest-timeout: 0 (or less) means no timeout.
    return seconds if seconds > 0 else None
