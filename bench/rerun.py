"""Benchmark rows for the edit-run loop (issue 17): first run, re-run, re-run after an edit.

    python bench/rerun.py           # print these rows only

Each row is a real ``pytest -p gondolin test_x.py::test_one`` in a fresh
process, in a one-file project holding one sandboxed test, with the real
cache (the image, ready and layered snapshots, the started worker). Timed:
the whole process (wall), and from just before the process starts to the
first sandboxed test's report (a tiny host plugin writes the time). The
start-up phases come from the session's own log line
(``sandbox/guest_worker.py``: "start-up phases").

* **first run**: a project the cache has not seen (its collected worker is
  new): the started worker is restored, the tree copied, collected,
  snapshotted (the snapshot is kept in the cache when the VM closes, after
  the test: ``sandbox/worker_disk.py``);
* **re-run**: nothing changed: the cached collected worker is restored (one
  test: QEMU runs on the cached file in place, no copy);
* **after an edit**: the test file changed: the configured worker is
  restored in place from the previous tree's collected file (its
  ``gondolin-configured`` snapshot: ``sandbox/configured.py``), the tree
  copied and collected again;
* **after editing the conftest**: pytest's configuration read it, so the
  started worker is restored in place instead (``gondolin-clean``), and the
  worker configures pytest again before it collects.

pytest-randomly is left on when installed (the development venv has it):
each run draws a new seed, which the cached workers do not depend on.

Others' edits to an editable install the guest carries (this checkout, in a
development venv) change the tree between runs; run it from a venv whose
sources do not change meanwhile.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

Row = tuple[str, str, str]

TEST = """
    import pytest

    @pytest.mark.sandboxed
    def test_one(base):
        assert base + {value} == base + {value}
"""
CONFTEST = """
    import pytest

    @pytest.fixture
    def base():
        return {value}
"""
PLUGIN = """
import os, time

_sent = False


def pytest_runtest_logreport(report):
    global _sent
    if report.when == "call" and not _sent:
        _sent = True
        with open(os.environ["RERUN_BENCH_OUT"], "w") as fh:
            fh.write(repr(time.time()))
"""
_PHASES = re.compile(r"start-up phases: (?P<phases>.*)$", re.M)


def _run(project: Path, value: int, base: int = 0) -> tuple[float, float, dict[str, float], str]:
    """One inner run: wall s, s to the first report, start-up phases, output."""
    (project / "test_x.py").write_text(textwrap.dedent(TEST.format(value=value)))
    (project / "conftest.py").write_text(textwrap.dedent(CONFTEST.format(value=base)))
    out = project.parent / "first-report"
    log = project.parent / "log.txt"
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "RERUN_BENCH_OUT": str(out),
        "PYTHONPATH": str(project.parent / "plugins"),
    }
    args = [sys.executable, "-m", "pytest", "-p", "gondolin", "-p", "rerun_timing"]
    args += ["-p", "no:cacheprovider", f"--log-file={log}", "--log-file-level=INFO"]
    started = time.time()
    res = subprocess.run(
        [*args, "test_x.py::test_one"], cwd=project, env=env, capture_output=True, text=True
    )
    wall = time.time() - started
    if res.returncode != 0 or not out.exists():
        raise SystemExit(f"inner pytest run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    first = float(out.read_text()) - started
    phases: dict[str, float] = {}
    match = _PHASES.search(log.read_text())
    if match:
        for part in match["phases"].split(", "):
            words = part.split()  # "host python 0.32 s"
            phases[" ".join(words[:-2])] = float(words[-2])
    return wall, first, phases, res.stdout


def _phase_note(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())


def rerun_section(n: int = 3) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gondolin-rerun-") as tmp:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        (plugins / "rerun_timing.py").write_text(PLUGIN)
        results: dict[str, list[tuple[float, float, dict[str, float]]]] = {
            "first": [],
            "rerun": [],
            "edit": [],
            "conftest": [],
        }
        for i in range(n):
            project = Path(tmp) / f"project{i}"  # a new tree: a new collected worker
            project.mkdir()
            wall, first, phases, _ = _run(project, 1000 + i)
            results["first"].append((wall, first, phases))
            wall, first, phases, output = _run(project, 1000 + i)
            if "restored the cached collected worker" not in output:
                raise SystemExit(f"the re-run did not restore the collected worker:\n{output}")
            results["rerun"].append((wall, first, phases))
            wall, first, phases, output = _run(project, 2000 + i)
            if "restored the configured worker" not in output:
                raise SystemExit(f"the edit's run did not restore the configured worker:\n{output}")
            results["edit"].append((wall, first, phases))
            wall, first, phases, output = _run(project, 2000 + i, base=1)
            if "restored the started worker in place" not in output:
                raise SystemExit(f"the conftest's edit did not configure again:\n{output}")
            results["conftest"].append((wall, first, phases))
    labels = {
        "first": "sandboxed one-test file, first run of the project (started worker cached)",
        "rerun": "same, re-run with nothing changed (cached collected worker)",
        "edit": "same, re-run after editing the test file (configured worker)",
        "conftest": "same, re-run after editing the conftest (configured again)",
    }
    first_wall = statistics.median(r[0] for r in results["first"])
    for kind, label in labels.items():
        runs = results[kind]
        wall = statistics.median(r[0] for r in runs)
        report = statistics.median(r[1] for r in runs)
        middle = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
        ratio = f"; {first_wall / wall:.1f}x faster than the first run" if kind != "first" else ""
        rows.append(
            (
                label,
                f"{report:.2f} s to the first report, {wall:.2f} s wall",
                f"median of {n}{ratio}; start-up phases (s): {_phase_note(middle[2])}",
            )
        )
    return rows


def main() -> int:
    n = 2 if "--quick" in sys.argv else 3
    for what, result, notes in rerun_section(n):
        print(f"| {what} | {result} | {notes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
