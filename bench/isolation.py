"""Per-test cost of ``isolation="vm"`` and ``isolation="process"`` side by side, and throughput.

    python bench/isolation.py [--n 40] [--suite 500]

Section one: one inner pytest session holding ``n`` plain tests, ``n``
sandboxed tests with ``isolation="vm"`` and ``n`` with ``isolation="process"``
(the same prepared guest worker serves both modes); each item's whole
protocol is timed on the host (``timing_plugin``), the first of each kind
left out (it pays for the worker's start-up). Section two: ``suite`` trivial
sandboxed tests per mode in a session of their own; tests per second after
the first test (start-up excluded), and the whole session's wall time.
Under TCG on a shared 2-core host the numbers are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Row = tuple[str, str, str]

#: Times each item on the host only: in the guest the variable is not set,
#: and a hook that raised there would make every process-isolated run count
#: as failed (a worker error), so each would be followed by a VM restore.
CONFTEST = """
import json, os, time
import pytest

OUT = os.environ.get("GONDOLIN_BENCH_OUT")

@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.time()
    try:
        return (yield)
    finally:
        if OUT and os.environ.get("GONDOLIN_GUEST") != "1":
            line = json.dumps({"nodeid": item.nodeid, "start": start, "stop": time.time()})
            with open(OUT, "a") as fh:
                fh.write(line + "\\n")
"""


#: What the host logs (INFO) for each fallback restore in process mode (sandbox/isolation.py).
RESTORE_LOG = "restoring the VM after a process-isolated run"


def _session(tests: str, *args: str) -> tuple[list[dict[str, object]], float]:
    """Run ``tests`` in an inner session; (each item's timing, the session's wall time in s).

    Trivial tests never need a fallback restore but the "every N" one: another
    in the log fails the bench (it would measure restores, not process isolation).
    """
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-isolation-") as tmp:
        (Path(tmp) / "test_bench.py").write_text(tests)
        (Path(tmp) / "conftest.py").write_text(CONFTEST)
        out = Path(tmp) / "times.jsonl"
        env = {**os.environ, "GONDOLIN_BENCH_OUT": str(out)}
        started = time.monotonic()
        argv = [sys.executable, "-m", "pytest", "-p", "gondolin", "-q", "-p", "no:cacheprovider"]
        argv += ["-o", "log_cli=true", "--log-cli-level=INFO"]
        res = subprocess.run(
            [*argv, "-p", "no:randomly", "test_bench.py", *args],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        if res.returncode != 0:
            raise SystemExit(f"inner run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        restores = [
            line
            for line in res.stdout.splitlines()
            if RESTORE_LOG in line and "runs since the last restore" not in line  # "every N"
        ]
        if restores:
            raise SystemExit(f"{len(restores)} fallback restores on trivial tests: {restores[0]}")
        return [json.loads(line) for line in out.read_text().splitlines()], wall


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
    return f"{statistics.median(values) * 1000:.0f} ms (p90 {p90 * 1000:.0f})"


def side_by_side(n: int) -> list[Row]:
    """Per-test wall time: plain, vm and process in one session."""
    tests = textwrap.dedent(f"""
        import pytest

        @pytest.mark.parametrize("i", range({n + 1}))
        def test_plain(i):
            assert i >= 0

        @pytest.mark.sandboxed(isolation="vm")
        @pytest.mark.parametrize("i", range({n + 1}))
        def test_vm(i):
            assert i >= 0

        @pytest.mark.sandboxed(isolation="process")
        @pytest.mark.parametrize("i", range({n + 1}))
        def test_process(i):
            assert i >= 0
        """)
    times, _ = _session(tests)
    kinds: dict[str, list[float]] = {"plain": [], "vm": [], "process": []}
    for entry in times:
        kind = str(entry["nodeid"]).split("::test_")[1].split("[")[0]
        kinds[kind].append(float(entry["stop"]) - float(entry["start"]))  # type: ignore[arg-type]
    plain, vm, process = (kinds[k][1:] for k in ("plain", "vm", "process"))
    base = statistics.median(plain)
    return [
        ("plain test (host)", _ms(plain), f"median of {len(plain)}, same session"),
        ("isolation=vm test", _ms(vm), f"+{(statistics.median(vm) - base) * 1000:.0f} ms vs plain"),
        (
            "isolation=process test",
            _ms(process),
            f"+{(statistics.median(process) - base) * 1000:.0f} ms vs plain; "
            f"{statistics.median(vm) / statistics.median(process):.1f}x faster than vm",
        ),
    ]


def throughput(suite: int, mode: str) -> Row:
    """Tests per second for ``suite`` trivial sandboxed tests in ``mode`` (after the first)."""
    tests = textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandboxed
        @pytest.mark.parametrize("i", range({suite}))
        def test_trivial(i):
            assert i * 2 == i + i
        """)
    times, wall = _session(tests, f"--gondolin-isolation={mode}")
    first_done = min(float(t["stop"]) for t in times)  # type: ignore[arg-type]
    last_done = max(float(t["stop"]) for t in times)  # type: ignore[arg-type]
    rate = (len(times) - 1) / (last_done - first_done)
    return (
        f"{suite} trivial tests, isolation={mode}",
        f"{rate:.1f} tests/s",
        f"after the first test; whole session {wall:.0f} s",
    )


def isolation_section(n: int, suite: int) -> list[Row]:
    """Both measurements, as rows for bench/run.py's table."""
    return [*side_by_side(n), throughput(suite, "vm"), throughput(suite, "process")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="tests of each kind side by side")
    parser.add_argument("--suite", type=int, default=500, help="tests per mode for throughput")
    args = parser.parse_args()
    for name, value, note in isolation_section(args.n, args.suite):
        print(f"| {name} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
