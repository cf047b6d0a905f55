"""Soak: hundreds of sandboxed tests in one session, with no growth in host fds, threads or memory.

An outer test runs an inner pytest session of ``GONDOLIN_SOAK_TESTS``
(default 500) sandboxed tests; half of them also make a (denied) HTTP
request, so the network driver, its flows and the per-test recorders are
exercised as well as restores. A host-side probe plugin in the inner
session samples its own ``/proc/self`` (RSS, threads, open fds) after
every test. After a warm-up, the counts must stay flat and RSS must not
trend upwards; the numbers are printed (run with ``-s``).

Run with ``make soak`` or ``pytest tests/soak -m soak -s``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import INNER_ADDOPTS
from pytest_gondolin import paths

pytestmark = [pytest.mark.soak, pytest.mark.integration]

SOAK_TESTS = int(os.environ.get("GONDOLIN_SOAK_TESTS", "500"))
#: Tests before the measurement window: caches fill, the second lane
#: starts, pytest's own lists of reports grow to their steady pace.
WARMUP = 50
#: 500 restores plus runs at ~0.5-1 s each under TCG.
SOAK_TIMEOUT = 3600.0
#: Allowed growth after the warm-up.
MAX_FD_GROWTH = 2
MAX_THREAD_GROWTH = 2
#: pytest keeps every test report (terminal summary, junit): a few KiB per
#: test is expected; a leaked VM, recorder or buffer per test is far more.
MAX_RSS_SLOPE_KIB_PER_TEST = 16.0
INNER_PYTEST = (sys.executable, "-m", "pytest", "-p", "gondolin", "-p", "soakprobe", "-q")
INNER_PYTEST += ("-p", "no:cacheprovider")

PROBE = """
import json
import os
from pathlib import Path

SAMPLES = []


def _sample():
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            status[key] = int(value.split()[0])
    return {"rss_kib": status["VmRSS"], "threads": status["Threads"],
            "fds": len(os.listdir("/proc/self/fd"))}


def pytest_runtest_logfinish(nodeid, location):
    SAMPLES.append(_sample())


def pytest_sessionfinish(session):
    Path(os.environ["SOAK_SAMPLES"]).write_text(json.dumps(SAMPLES))
"""

SOAK = """
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest


@pytest.mark.sandboxed
@pytest.mark.parametrize("i", range({count}))
def test_soak(i, tmp_path):
    Path("/soak-marker").write_text(str(i))  # the next test must not see it
    (tmp_path / "data").write_bytes(os.urandom(4096))
    assert subprocess.run(["true"]).returncode == 0
    if i % 2:
        try:
            urllib.request.urlopen("http://soak.test/%d" % i, timeout=20)
        except urllib.error.URLError as exc:  # deny-all: the name does not even resolve
            assert "Name or service not known" in str(exc.reason), exc
        else:
            raise AssertionError("the default policy let a request through")


@pytest.fixture(autouse=True)
def _fresh():
    assert not Path("/soak-marker").exists(), "state leaked from an earlier test"
"""


def _slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def test_hundreds_of_sandboxed_tests_leak_nothing(pytester: pytest.Pytester) -> None:
    assert SOAK_TESTS > WARMUP + 50, "GONDOLIN_SOAK_TESTS is too small to measure a trend"
    pytester.makepyfile(test_soak_inner=SOAK.format(count=SOAK_TESTS), soakprobe=PROBE)
    samples_file = pytester.path / "samples.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(GONDOLIN_CACHE_DIR=str(paths.cache_dir()), SOAK_SAMPLES=str(samples_file))
    env["PYTEST_ADDOPTS"] = INNER_ADDOPTS
    result = subprocess.run(
        [*INNER_PYTEST, "test_soak_inner.py"],
        cwd=pytester.path,
        env={**env, "PYTHONPATH": str(pytester.path)},
        capture_output=True,
        text=True,
        timeout=SOAK_TIMEOUT,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    assert f"{SOAK_TESTS} passed" in result.stdout, tail
    samples = json.loads(samples_file.read_text())
    assert len(samples) == SOAK_TESTS

    window = samples[WARMUP:]
    fds = [s["fds"] for s in window]
    threads = [s["threads"] for s in window]
    rss = [s["rss_kib"] for s in window]
    slope = _slope([float(r) for r in rss])
    report = {
        "tests": SOAK_TESTS,
        "fds (start/after warm-up/max/end)": (samples[0]["fds"], fds[0], max(fds), fds[-1]),
        "threads (start/after warm-up/max/end)": (
            samples[0]["threads"],
            threads[0],
            max(threads),
            threads[-1],
        ),
        "rss MiB (start/after warm-up/max/end)": tuple(
            round(v / 1024, 1) for v in (samples[0]["rss_kib"], rss[0], max(rss), rss[-1])
        ),
        "rss slope KiB/test": round(slope, 2),
    }
    print("\nsoak:", json.dumps(report, indent=1))
    Path(os.environ.get("GONDOLIN_SOAK_REPORT", pytester.path / "soak.json")).write_text(
        json.dumps(report)
    )
    assert max(fds) <= fds[0] + MAX_FD_GROWTH, report
    assert max(threads) <= threads[0] + MAX_THREAD_GROWTH, report
    assert slope < MAX_RSS_SLOPE_KIB_PER_TEST, report
