"""console_bound: a console log keeps its newest part, on a real file (hole punching)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pytest_gondolin.vm import console_bound

KEEP = 64 * 1024


def _grow(path: Path, lines: range) -> bytes:
    data = b"".join(b"line-%06d\n" % i for i in lines)
    with path.open("ab") as fh:
        fh.write(data)
    return data


def _stored(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_keeps_the_newest_bytes_and_frees_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = _grow(log, range(40_000))  # 440 KB, ~7 times the cap
    assert console_bound.trim(log, KEEP) > 0
    assert os.path.getsize(log) == len(data)  # the length stays: QEMU writes on at its offset
    assert _stored(log) <= KEEP + 8192
    content = log.read_bytes()
    assert content[-KEEP:] == data[-KEEP:]  # the newest part, whole
    assert (
        content[: len(data) - KEEP - 4096].count(0) == len(data) - KEEP - 4096
    )  # the rest: a hole


def test_trim_leaves_a_log_under_twice_the_cap_alone(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = _grow(log, range(10_000))  # 110 KB < 2 * KEEP
    assert console_bound.trim(log, KEEP) == 0
    assert log.read_bytes() == data


def test_the_watcher_bounds_a_growing_log_until_unwatched(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    console_bound.watch(log, KEEP)
    try:
        for start in range(0, 200_000, 20_000):
            last = _grow(log, range(start, start + 20_000))
        deadline = time.monotonic() + 30  # the thread looks every 0.5 s; generous under load
        while _stored(log) > 2 * KEEP + 8192:
            assert time.monotonic() < deadline, f"not trimmed: {_stored(log)} bytes stored"
            time.sleep(0.1)
        assert log.read_bytes().endswith(last[-KEEP // 2 :])
    finally:
        console_bound.unwatch(log)
    time.sleep(2 * console_bound.CONSOLE_CHECK_INTERVAL)  # a check under way finishes
    _grow(log, range(200_000, 260_000))  # unwatched: nothing trims it any more
    time.sleep(3 * console_bound.CONSOLE_CHECK_INTERVAL)
    assert _stored(log) > 4 * KEEP
