"""Sandboxed throughput on one machine with ``-n 1`` and ``-n 2``: the inputs of docs/ci.md's formula.

Each run is a fresh inner pytest session of ``n`` trivial sandboxed tests
(warm caches: image, snapshots and layers exist). A conftest in the inner
project appends each item's host-side start and stop to a file, per
process, so xdist workers are timed too. Per run: ``t0``, the time until
every worker's first test is done (restore, project copy, the guest's
pytest start-up and collection), and ``R``, tests per second after that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

Row = tuple[str, str, str]

CONFTEST = """
import json, os, time
import pytest

@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.time()
    try:
        return (yield)
    finally:
        line = json.dumps({"pid": os.getpid(), "start": start, "stop": time.time()})
        with open(os.environ["GONDOLIN_BENCH_OUT"], "a") as fh:
            fh.write(line + "\\n")
"""


def _run(n: int, workers: int) -> tuple[float, float, float]:
    """(whole run s, t0 s, R tests/s after every worker's first test) for ``n`` tests."""
    tests = textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandboxed
        @pytest.mark.parametrize("i", range({n}))
        def test_sandboxed(i):
            assert i * 2 == i + i
        """)
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-scale-") as tmp:
        (Path(tmp) / "test_scale.py").write_text(tests)
        (Path(tmp) / "conftest.py").write_text(CONFTEST)
        out = Path(tmp) / "times.jsonl"
        args = [sys.executable, "-m", "pytest", "-p", "gondolin", "-q", "-p", "no:cacheprovider"]
        if workers > 1:
            args += ["-n", str(workers)]
        started = time.time()
        res = subprocess.run(
            args,
            cwd=tmp,
            env={**os.environ, "GONDOLIN_BENCH_OUT": str(out)},
            capture_output=True,
            text=True,
        )
        whole = time.time() - started
        if res.returncode != 0:
            raise SystemExit(f"inner run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        items = [json.loads(line) for line in out.read_text().splitlines()]
    firsts: dict[int, float] = {}
    for it in sorted(items, key=lambda it: it["stop"]):
        firsts.setdefault(it["pid"], it["stop"])
    ready = max(firsts.values())
    rest = [it for it in items if it["stop"] > ready]
    last = max(it["stop"] for it in items)
    return whole, ready - started, len(rest) / (last - ready)


def scaling_section(n: int) -> list[Row]:
    count = max(60, n * 10)
    _run(2, 1)  # warm caches (snapshots, layers) so no row pays a build
    rows: list[Row] = []
    for workers in (1, 2):
        whole, t0, rate = _run(count, workers)
        rows.append(
            (
                f"sandboxed throughput, `-n {workers}` ({count} trivial tests)",
                f"{rate:.1f} tests/s after start-up",
                f"t0 (every worker's first test done) {t0:.1f} s; whole run {whole:.1f} s",
            )
        )
    return rows
