"""The worker's pause once configured (``guest/configured.py``).

The recorder runs in a fresh interpreter (an audit hook stays for the
process's life): it must list what was opened or imported from the project,
leave out the interpreter's own files, and give up (None) past its bounds.
The pause serves ``ping`` and refuses other commands until ``collect``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from pytest_gondolin.guest import configured

SCRIPT = """
import json, os, sys
from pytest_gondolin.guest.configured import ReadRecorder
recorder = ReadRecorder()
recorder.start()
project = sys.argv[1]
sys.path.insert(0, project)
import project_module
open(os.path.join(project, "data.txt")).read()
open(os.__file__).read()  # the interpreter's own: not the project's
for i in range(int(sys.argv[2])):
    try:
        open(os.path.join(project, f"missing-{i}"))
    except OSError:
        pass
print(json.dumps(recorder.stop()))
open(os.path.join(project, "after.txt"), "w").close()  # after stop: not recorded
print(json.dumps(recorder.stop()))
"""


def _record(tmp_path: Path, misses: int) -> list[Any]:
    (tmp_path / "project_module.py").write_text("VALUE = 1\n")
    (tmp_path / "data.txt").write_text("x")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path), str(misses)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_recorder_lists_the_project_files_read_and_imported(tmp_path: Path) -> None:
    first, second = _record(tmp_path, misses=2)
    project = str(tmp_path)
    assert os.__file__ not in first
    assert [path for path in first if path.startswith(project)] == sorted(
        [
            f"{project}/data.txt",
            f"{project}/missing-0",
            f"{project}/missing-1",
            f"{project}/project_module.py",
        ]
    )
    assert second == first  # nothing after stop


def test_the_recorder_gives_up_past_its_bound(tmp_path: Path) -> None:
    first, _ = _record(tmp_path, misses=configured.MAX_READS + 1)
    assert first is None


def _pause(commands: list[dict[str, Any] | None]) -> tuple[bool, list[dict[str, Any]], list[str]]:
    sent: list[dict[str, Any]] = []
    calls: list[str] = []
    queue = list(commands)

    class Recorder(configured.ReadRecorder):
        def stop(self) -> list[str] | None:
            calls.append("stop")
            return ["/p/conftest.py"]

    def before() -> None:
        calls.append("before snapshot")

    result = configured.pause(Recorder(), sent.append, lambda: queue.pop(0), before)
    return result, sent, calls


def test_the_pause_says_configured_after_dropping_and_waits_for_collect() -> None:
    ok, sent, calls = _pause(
        [
            {"t": "ping", "nonce": "n1"},
            {"t": "run", "nodeid": "x", "seed": 1},
            {"t": "invalid", "message": "command is not JSON"},
            {"t": "collect"},
        ]
    )
    assert ok is True
    assert calls == ["stop", "before snapshot"]
    assert sent == [
        {"t": "configured", "read": ["/p/conftest.py"]},
        {"t": "pong", "nonce": "n1"},
        {"t": "error", "message": "expected 'collect', got 'run'"},
        {"t": "error", "message": "command is not JSON"},
    ]


def test_the_pause_ends_on_quit_or_end_of_input() -> None:
    assert _pause([{"t": "quit"}])[0] is False
    assert _pause([None])[0] is False
