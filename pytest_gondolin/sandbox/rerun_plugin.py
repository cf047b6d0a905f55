"""pytest-rerunfailures and sandboxed tests: each rerun starts from a fresh restore.

pytest-rerunfailures reruns a failed test inside its own
``pytest_runtest_protocol``; :class:`~.session.SandboxSession` runs
sandboxed items in its own (``tryfirst``) implementation of that hook, so
pytest-rerunfailures never sees them. The session reruns them itself, the
way pytest-rerunfailures does on the host: :func:`plugin_reruns` reads the
item's rerun settings through pytest-rerunfailures' own functions
(``--reruns``, ``@pytest.mark.flaky(reruns=..., reruns_delay=...,
reruns_delay_backoff_factor=..., condition=..., only_rerun=...,
rerun_except=...)``, ``--force-reruns``, ``--reruns-mode``,
``--rerun-exclude-path``, ``--max-suite-reruns``); after each run,
:func:`mark_attempt` marks the failed reports of an attempt that will be
rerun ``outcome == "rerun"`` and every report with its attempt number
``rerun`` -- what pytest-rerunfailures' ``RERUN`` status, ``R`` progress
letter and ``rerun test summary info`` read. Each attempt is a separate run
in a VM restored to the collected snapshot: nothing of the failed attempt
survives into the next.

``--only-rerun`` and ``--rerun-except`` match the guest's exception as the
report shows it (``ExceptionType: message``, the first line of the crash
message; the exception chain is not crossed). A ``condition`` is evaluated
on the host.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import pytest

from pytest_gondolin.errors import ConfigError

__all__ = ["PLUGIN_NAME", "Reruns", "mark_attempt", "plugin_reruns"]

#: pytest-rerunfailures' name in the plugin manager (its entry point, and ``-p rerunfailures``).
PLUGIN_NAME: Final = "rerunfailures"
#: Most reruns one sandboxed test may ask for (each costs a VM restore and a run).
MAX_RERUNS: Final = 1000


@dataclass(frozen=True)
class Reruns:
    """How often and how a sandboxed item is rerun when it fails."""

    count: int
    delay: float = 0.0
    backoff: float = 1.0

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before rerun number ``attempt`` (1 for the first rerun)."""
        return self.delay * self.backoff ** (attempt - 1)


def _module(config: pytest.Config) -> Any | None:
    return config.pluginmanager.get_plugin(PLUGIN_NAME)


def plugin_reruns(item: pytest.Item) -> Reruns | None:
    """pytest-rerunfailures' settings for ``item``; ``None`` when it is not rerun.

    ``None`` also when pytest-rerunfailures is not loaded (its ``flaky``
    marker is then just a marker). Raises ConfigError naming the test for
    a rerun count or delay that is not a number.
    """
    module = _module(item.config)
    if module is None:
        return None
    if module._is_rerun_path_excluded(item):
        return None
    count = module.get_reruns_count(item)
    if count is None:
        return None
    try:
        reruns = int(count)
        delay = float(module.get_reruns_delay(item) or 0)
        backoff = float(module.get_reruns_delay_backoff_factor(item) or 1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{item.nodeid}: pytest-rerunfailures: {exc}") from exc
    if not 0 <= reruns <= MAX_RERUNS:
        raise ConfigError(f"{item.nodeid}: reruns must be in 0..{MAX_RERUNS}, got {count!r}")
    if reruns == 0:
        return None
    return Reruns(reruns, max(delay, 0.0), backoff)


def _crash_text(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    text = message if isinstance(message, str) else str(report.longrepr)
    return text.partition("\n")[0]


def _matches(patterns: Sequence[Any], text: str) -> bool:
    return any(isinstance(p, str) and re.search(p, text) for p in patterns)


def _rerunnable(item: pytest.Item, report: pytest.TestReport) -> bool:
    """Whether this failure is one pytest-rerunfailures reruns (``--only-rerun``,
    ``--rerun-except``, the marker's ``condition``)."""
    module = _module(item.config)
    if module is None:
        return False
    text = _crash_text(report)
    only = module._get_rerun_filter_regex(item, "only_rerun") or []
    except_ = module._get_rerun_filter_regex(item, "rerun_except") or []
    if only and not _matches(only, text):
        return False
    if except_ and _matches(except_, text):
        return False
    try:
        return bool(module.get_reruns_condition(item))
    finally:
        # pytest-rerunfailures caches the condition per attempt.
        getattr(item, "_rerun_condition_results", {}).clear()


def _suite_allows(item: pytest.Item) -> bool:
    """``--max-suite-reruns``: takes one rerun from the suite's budget, if any is left."""
    limit = getattr(item.config.option, "max_suite_reruns", None)
    if limit is None:
        return True
    db = getattr(item.config, "failures_db", None)
    return db is None or bool(db.try_increment_suite_reruns(limit))


def mark_attempt(
    item: pytest.Item, reports: Sequence[pytest.TestReport], attempt: int, reruns: Reruns
) -> bool:
    """Mark one attempt's reports as pytest-rerunfailures would; ``True`` if it is rerun.

    ``attempt`` counts from 0. Every report gets ``rerun = attempt``; when
    attempts are left and a failure qualifies, that failed report and every
    later failed one get ``outcome = "rerun"``.
    """
    triggered = False
    for report in reports:
        report.rerun = attempt  # type: ignore[attr-defined]
        if triggered:
            if report.failed:
                report.outcome = "rerun"  # type: ignore[assignment]
            continue
        if (
            attempt < reruns.count
            and report.failed
            and not hasattr(report, "wasxfail")
            and _rerunnable(item, report)
            and _suite_allows(item)
        ):
            report.outcome = "rerun"  # type: ignore[assignment]
            triggered = True
    return triggered
