"""``--pdb`` on sandboxed tests, end to end: pdb runs in the guest, on a real pseudo-terminal.

An inner pytest runs under ``pexpect`` (a real pty: its stdin is a TTY, as
when a user types) against real QEMU guests. One session holds four
sandboxed tests -- a pass, two failures, one test after them -- and the
transcript is driven like a user would: ``p`` shows a value only the
guest's process has, ``l`` lists the guest's source, ``c`` goes on to the
next test, ``q`` ends the session as pytest's ``--pdb`` does on the host.
Without a TTY the same session says so up front and runs without a debugger.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import time

import pexpect
import pytest

from tests.plugin.test_sandboxed import INNER_TIMEOUT

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration

#: The run's timeout of the first failing test, and how long the "user" then
#: waits at its prompt: longer, so a timeout that ticked in pdb would fire.
RUN_TIMEOUT = 15
THINKING = RUN_TIMEOUT + 5

TESTS = f"""
import os

import pytest


@pytest.mark.sandboxed
def test_a_passes():
    print("A-RAN")


@pytest.mark.sandboxed(timeout={RUN_TIMEOUT})
def test_b_fails():
    # Only the guest worker's process has this variable: the value pdb prints is the guest's.
    local_var = os.environ["PYTEST_GONDOLIN_WORKER"] + "-worker-" + str(6 * 7)
    assert local_var == "on the host"


@pytest.mark.sandboxed
def test_c_fails_too():
    other = [1, 2, 3]
    assert other == []


@pytest.mark.sandboxed
def test_d_never_runs():
    pass
"""

PROMPT = r"\(Pdb\) "


def _run_without_terminal(inner: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    """The inner pytest with ``args``, stdin not a terminal (``/dev/null``), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "gondolin", *args],
        cwd=inner.path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )


def _spawn(
    inner: pytest.Pytester, transcript: io.StringIO, *, tests: str = TESTS, pdb: bool = True
) -> pexpect.spawn[str]:
    """The inner pytest on a pseudo-terminal (``--pdb`` unless ``pdb=False``), its output in ``transcript``."""
    inner.makepyfile(**{"test_dbg" if pdb else "test_bp": textwrap.dedent(tests)})
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "pytest",
            "-p",
            "gondolin",
            *(["--pdb"] if pdb else []),
            "-v",
            "-p",
            "no:cacheprovider",
        ],
        cwd=str(inner.path),
        encoding="utf-8",
        codec_errors="replace",
        timeout=INNER_TIMEOUT,
        dimensions=(50, 120),
    )
    child.logfile_read = transcript
    return child


def _command(child: pexpect.spawn[str], line: str, transcript: io.StringIO) -> str:
    """Type ``line`` at the prompt; what pdb answered, up to its next prompt."""
    start = len(transcript.getvalue())
    child.sendline(line)
    child.expect(PROMPT)
    return transcript.getvalue()[start:]


def test_pdb_runs_in_the_guest_on_the_hosts_terminal(inner: pytest.Pytester) -> None:
    transcript = io.StringIO()
    child = _spawn(inner, transcript)
    try:
        child.expect(PROMPT)
        before_prompt = transcript.getvalue()
        # The passing test ran without pdb; the failure is shown as pytest's --pdb shows it.
        assert "test_dbg.py::test_a_passes PASSED" in before_prompt
        traceback = re.search(r">+ traceback >+", before_prompt)
        assert traceback is not None, before_prompt
        # The FAILED line before the post-mortem, as on the host.
        failed = before_prompt.index("test_dbg.py::test_b_fails FAILED")
        assert failed < traceback.start(), before_prompt
        assert "AssertionError: assert '1-worker-42' == 'on the host'" in before_prompt
        assert '-> assert local_var == "on the host"' in before_prompt
        # The user thinks for longer than the run's timeout: pdb's wait is not counted.
        time.sleep(THINKING)
        answer = _command(child, "p local_var", transcript)
        assert "'1-worker-42'" in answer, transcript.getvalue()
        listing = _command(child, "l", transcript)
        assert re.search(r"\d+\s+->\s+assert local_var == \"on the host\"", listing), listing
        assert 'local_var = os.environ["PYTEST_GONDOLIN_WORKER"]' in listing
        # c: the run goes on; the next failure enters pdb again, in its own frame.
        after_continue = _command(child, "c", transcript)
        assert "test_dbg.py::test_c_fails_too FAILED" in after_continue
        assert after_continue.index("test_c_fails_too FAILED") < after_continue.index("-> assert")
        assert "Timeout" not in after_continue, after_continue
        assert "-> assert other == []" in after_continue
        assert "'1-worker-42'" not in _command(child, "p other", transcript)
        # q: the session ends as pytest's --pdb ends it on the host.
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    out = transcript.getvalue()
    # Each status line once: the replay after the run does not log them again.
    assert out.count("test_dbg.py::test_b_fails FAILED") == 1, out
    assert out.count("test_dbg.py::test_c_fails_too FAILED") == 1, out
    assert "_pytest.outcomes.Exit: Quitting debugger" in out, out
    assert "test_dbg.py::test_d_never_runs" not in out, out
    assert "2 failed, 1 passed" in out, out
    assert child.exitstatus == pytest.ExitCode.INTERRUPTED, out


def test_without_a_terminal_it_says_so_up_front_and_runs_on(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_dbg=textwrap.dedent(TESTS))
    # Negative control of the test above: the same session, stdin not a TTY.
    result = _run_without_terminal(inner, "--pdb", "-v", "-k", "b_fails or d_")
    out = result.stdout
    notice = "--pdb does not enter sandboxed tests (2 here): stdin is not a terminal"
    assert notice in out, out
    assert out.index(notice) < out.index("test_dbg.py::test_b_fails"), out
    assert "(Pdb)" not in out and "entering PDB" not in out, out
    assert "1 failed, 1 passed" in out, out
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out


BREAKPOINT_TESTS = """
import os

import pytest


@pytest.mark.sandboxed
def test_e_stops_at_a_breakpoint():
    local_var = os.environ["PYTEST_GONDOLIN_WORKER"] + "-at-the-breakpoint"
    breakpoint()
    print("E-GOES-ON")
    assert local_var.endswith("breakpoint")


@pytest.mark.sandboxed
def test_f_quits_there():
    pytest.set_trace()


@pytest.mark.sandboxed
def test_g_never_runs():
    pass
"""


def test_a_breakpoint_stops_the_sandboxed_test_in_pdb_on_the_hosts_terminal(
    inner: pytest.Pytester,
) -> None:
    """No --pdb: breakpoint() / pytest.set_trace() in a sandboxed test, as on the host."""
    transcript = io.StringIO()
    child = _spawn(inner, transcript, tests=BREAKPOINT_TESTS, pdb=False)
    try:
        child.expect(PROMPT)
        before_prompt = transcript.getvalue()
        assert "PDB set_trace (in the guest; IO-capturing turned off)" in before_prompt
        assert '-> print("E-GOES-ON")' in before_prompt, before_prompt
        assert "'1-at-the-breakpoint'" in _command(child, "p local_var", transcript)
        # c: the test goes on and passes; the next one stops at its pytest.set_trace().
        after_continue = _command(child, "c", transcript)
        assert "PDB continue (in the guest; IO-capturing resumed)" in after_continue
        assert "test_bp.py::test_e_stops_at_a_breakpoint PASSED" in after_continue
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    out = transcript.getvalue()
    assert "_pytest.outcomes.Exit: Quitting debugger" in out, out
    assert "test_bp.py::test_g_never_runs" not in out, out
    # As on the host: the quit test stops there, unreported (no BdbQuit failure).
    assert "BdbQuit" not in out and "failed" not in out, out
    assert "1 passed" in out, out
    assert child.exitstatus == pytest.ExitCode.INTERRUPTED, out


@pytest.mark.parametrize(
    ("args", "why"),
    [((), "stdin is not a terminal"), (("-n", "1"), "pytest-xdist workers have no terminal")],
    ids=["no-tty", "xdist"],
)
def test_without_a_terminal_a_breakpoint_fails_its_test_saying_why(
    inner: pytest.Pytester, args: tuple[str, ...], why: str
) -> None:
    inner.makepyfile(test_bp=textwrap.dedent(BREAKPOINT_TESTS))
    # Negative control of the test above: no terminal; nothing may wait for input.
    result = _run_without_terminal(inner, "-v", "-rf", "-k", "e_stops or g_", *args)
    out = result.stdout
    assert "test_bp.py::test_e_stops_at_a_breakpoint" in out, out
    assert f"needs the host's terminal, and there is none: {why}" in out, out
    assert "(Pdb)" not in out and "E-GOES-ON" not in out, out
    assert "1 failed, 1 passed" in out, out
