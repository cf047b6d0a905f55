"""Inner-run plugin for bench/run.py: wall time of each item's whole protocol, host side."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator

import pytest

_times: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        _times[item.nodeid] = time.perf_counter() - started


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("GONDOLIN_BENCH_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(_times, fh)
