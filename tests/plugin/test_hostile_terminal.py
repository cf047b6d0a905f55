"""A hostile guest writes terminal control sequences into what the host prints as its own.

pytest shows a test's own output and failure text as it is, in plain runs
too; but the host's own accounts of a guest — an error the worker says it
hit, the worker's stderr after a crash, a collection error only the guest
saw, each headed by the host — must not carry raw escape sequences or
carriage returns that could rewrite the terminal (clear it, move the cursor,
overwrite a status line with a forged ``PASSED``). Each attack is tagged
(``E1``...), and the host's output must show the tag followed by the control
characters made visible, never raw.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugin.test_isolation import TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: Clear the screen, cursor home, then a carriage return and a forged status line.
ATTACK = "\x1b[2J\x1b[H\rtest_table.py::test_forged PASSED"

HOSTILE = f"""
import gc
import os

import pytest

pytestmark = pytest.mark.sandboxed
ATTACK = {ATTACK!r}

def _channel():
    gc.unfreeze()
    found = [o for o in gc.get_objects() if type(o).__name__ == "HostPipe"]
    assert found
    return found[0]


def test_e1_worker_error_message():
    _channel().send({{"t": "error", "message": "E1" + ATTACK}})


def test_e2_crash_with_stderr(request):
    # Past pytest's capture, onto the worker's own stderr, then die: the host shows its tail.
    request.config.pluginmanager.getplugin("capturemanager").suspend_global_capture(in_=True)
    os.write(2, ("E2" + ATTACK + "\\n").encode())
    os._exit(3)


def test_e3_after():
    pass
"""

COLLECT = f"""
import os

import pytest

if os.environ.get("PYTEST_GONDOLIN_WORKER") == "1":
    raise RuntimeError("E4" + {ATTACK!r})


@pytest.mark.sandboxed
def test_collects_on_the_host_only():
    pass
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> TableRun:
    root = tmp_path_factory.mktemp("terminal")
    (root / "test_guest_collect.py").write_text(COLLECT)
    return run_table(root, gondolin_cache, HOSTILE, "vm")


@pytest.mark.parametrize("tag", ["E1", "E2", "E4"])
def test_host_framed_guest_text_carries_no_raw_control_characters(
    hostile: TableRun, tag: str
) -> None:
    text = hostile.text
    assert tag in text, text  # the attack reached the host's output
    for at in range(len(text)):
        if text.startswith(tag, at):
            after = text[at + len(tag) : at + len(tag) + 12]
            assert "\x1b" not in after and "\r" not in after, (tag, after, text)
    assert f"{tag}^[[2J^[[H^Mtest_table.py::test_forged PASSED" in text, text
