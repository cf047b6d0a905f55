"""The host interpreter's choice is cached by its folders' mtimes (``host_python.decide``).

Checking the host's interpreter (the ELF checks of every extension module)
costs 0.3-0.4 s a session; a session whose interpreter folders did not change
reads the choice from the cache instead. The interpreter here is a tree of
the host's real files (tests/unit/sandbox/test_host_python.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.sandbox import host_python
from pytest_gondolin.sandbox.host_python import Choice, HostLayout
from tests.unit.sandbox.test_host_python import FACTS, _interpreter


@pytest.fixture
def checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[HostLayout]:
    """The layouts ``choose`` checked, with the host being the tree of ``_interpreter``."""
    layout = _interpreter(tmp_path)
    monkeypatch.setattr(HostLayout, "current", classmethod(lambda cls: layout))
    monkeypatch.setattr(host_python, "image_facts", lambda *args, **kwargs: FACTS)
    checked: list[HostLayout] = []
    real = host_python.choose

    def choose(layout: HostLayout, facts: Any) -> Choice:
        checked.append(layout)
        return real(layout, facts)

    monkeypatch.setattr(host_python, "choose", choose)
    return checked


def decide(cache: Path) -> Choice:
    return host_python.decide(None, cache)  # type: ignore[arg-type]  # facts are patched


def test_the_host_is_checked_once_while_its_folders_do_not_change(
    checks: list[HostLayout], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = decide(cache)
    assert first.interpreter is not None and len(checks) == 1
    assert decide(cache) == first and len(checks) == 1  # read back whole, not checked again
    stdlib = Path(checks[0].stdlib[0])
    # A module added (pip, an upgrade: a new name or a rename): its folder's mtime changes.
    (stdlib / "added.py").write_text("")
    third = decide(cache)
    assert len(checks) == 2
    assert third.interpreter is not None
    assert str(stdlib / "added.py") in {f.path for f in third.interpreter.files}
    assert decide(cache) == third and len(checks) == 2


def test_a_changed_binary_or_library_outside_the_stdlib_folders_is_noticed(
    checks: list[HostLayout], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    decide(cache)
    binary = os.path.realpath(checks[0].executable)
    st = os.stat(binary)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    decide(cache)
    assert len(checks) == 2


def test_a_cache_that_cannot_be_written_checks_every_session(
    checks: list[HostLayout], tmp_path: Path
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    first = decide(blocked / "cache")  # a file where the folder should be
    assert decide(blocked / "cache") == first
    assert len(checks) == 2


def test_a_damaged_cache_entry_is_checked_again(checks: list[HostLayout], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = decide(cache)
    (entry,) = cache.glob("choice-*.json")
    entry.write_text('{"stamp": "x", "choice": 5}')
    assert decide(cache) == first and len(checks) == 2
    entry.write_text("not json")
    assert decide(cache) == first and len(checks) == 3
    stamp = json.loads(entry.read_text())["stamp"]  # rewritten by that check
    entry.write_text(json.dumps({"stamp": stamp, "choice": {"interpreter": 5}}))
    assert decide(cache) == first and len(checks) == 4


_ENTRY = """
import sys
from pathlib import Path
from pytest_gondolin.sandbox import guest_facts, host_python
libraries = frozenset(f"lib{i}.so.{i % 7}" for i in range(200))
facts = guest_facts.GuestFacts("x86_64", (2, 36), "3.11.2", libraries)
print(host_python.choice_entry(Path("/c"), host_python.HostLayout.current(), facts).name)
"""


def test_every_process_finds_the_same_cache_entry() -> None:
    """The entry's name does not follow string hashing (a new name each session: never a hit)."""
    names = {
        subprocess.run(
            [sys.executable, "-c", _ENTRY],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(names) == 1 and next(iter(names)).startswith("choice-")
