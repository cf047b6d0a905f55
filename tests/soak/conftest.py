"""Soak tests run only when asked for: ``make soak`` (``pytest tests/soak -m soak``).

They take many minutes; a plain ``pytest tests`` (or ``make test``, which
passes ``-m "not soak"``) must not pay for them by accident.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("markexpr") or "").replace("not soak", ""):
        return
    skip = pytest.mark.skip(reason="soak test: run it with `make soak` (pytest -m soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
