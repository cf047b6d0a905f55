"""The example suite ``make demo`` runs passes, as the README says it does.

The examples are what a new user runs first (``make demo``); a change in
behaviour they show (DNS answering only names the policy knows) once left
them failing with nothing in ``make test`` noticing. A real inner pytest
session over ``examples/``, with the real image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_suite_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "gondolin", "examples", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary, summary
