"""``@pytest.mark.sandboxed`` end to end: real inner pytest runs against real QEMU guests.

Every inner session that holds sandboxed items pays for a VM restore, the
copy of the project tree and the guest worker's start-up and collection
(~8-25 s under TCG on a loaded 2-core host), so the behaviours are grouped:

* one *shared* session (module scope) holds ~25 items covering outcomes,
  fixtures, output capture, isolation, marker validation, host/guest mixing,
  ``-rA``, ``--junitxml`` and ``--strict-markers``; each behaviour is then
  asserted by its own small test below, so a regression names itself.
  ``pytester`` is function-scoped, so this one session is run the way
  ``Pytester.runpytest_subprocess`` runs one (same interpreter, ``-mpytest``,
  ``--basetemp``, ``PY_COLORS=0``, ``PYTEST_ADDOPTS`` only turning off pytest-randomly
  and pytest-asyncio) and its output is
  wrapped in a :class:`pytest.RunResult`;
* behaviours that change the whole session (``-x``, ``-k``, ``--lf``,
  timeout and crash, ``-n 2``) each get their own ``pytester`` run.

All inner runs use the outer session's image and snapshot cache
(``GONDOLIN_CACHE_DIR``), so nothing is rebuilt.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import inner_env_changes as _inner_env_changes  # also imported from here

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: Bound on one inner session: VM restore, project copy and guest collection
#: under TCG take ~25 s on a busy 2-core host; 600 s leaves room for a cold
#: snapshot rebuild without letting a hung run block the suite forever.
INNER_TIMEOUT = 600.0
#: The statuses pytest prints in ``-v`` progress lines.
_VERBOSE_LINE = re.compile(
    r"^(?P<nodeid>\S+::\S+) (?P<status>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
)


def run_gondolin(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "gondolin", *args, timeout=INNER_TIMEOUT)


def verbose_statuses(result: pytest.RunResult) -> dict[str, list[str]]:
    """Node id -> the statuses its ``-v`` progress lines show, in order."""
    statuses: dict[str, list[str]] = {}
    for line in result.outlines:
        match = _VERBOSE_LINE.match(line)
        if match:
            statuses.setdefault(match["nodeid"], []).append(match["status"])
    return statuses


def line_of(source: str, needle: str) -> int:
    """1-based line number of the only line containing *needle* in *source* as written.

    Files are written dedented and without leading blank lines (as
    ``pytester.makepyfile`` and :func:`_write` do).
    """
    written = textwrap.dedent(source).lstrip("\n").splitlines()
    lines = [n for n, text in enumerate(written, start=1) if needle in text]
    assert len(lines) == 1, f"{needle!r} found on lines {lines}"
    return lines[0]


# --------------------------------------------------------------------------
# the shared session
# --------------------------------------------------------------------------

SHARED_CONFTEST = """
    import os

    import pytest


    @pytest.fixture
    def guest_only():
        node = os.uname().nodename
        assert node == "gondolin", f"conftest fixture ran on {node!r}"
        return "from-conftest"


    @pytest.fixture
    def broken_setup():
        raise RuntimeError("setup-boom")


    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown-boom")
"""

SHARED_PACKAGE = """
    import os

    ANSWER = 42


    def where():
        return os.uname().nodename
"""

SHARED_MAIN = """
    import logging
    import os
    import random
    import uuid
    from pathlib import Path

    import pytest

    sandboxed = pytest.mark.sandboxed
    STATE = "original"
    MARKER_FILE = Path("/gondolin-isolation-marker")


    @sandboxed
    def test_pass():
        assert os.uname().nodename == "gondolin"


    @sandboxed
    def test_fail_introspection():
        x = 4
        assert x == 5


    @sandboxed
    def test_setup_error(broken_setup):
        pass


    @sandboxed
    def test_teardown_error(broken_teardown):
        pass


    @sandboxed
    def test_skip():
        pytest.skip("skip-reason-in-guest")


    @sandboxed
    @pytest.mark.xfail(reason="xfail-reason-in-guest")
    def test_xfail():
        assert os.uname().nodename == "host"


    @sandboxed
    @pytest.mark.xfail(reason="xpass-reason-in-guest")
    def test_xpass():
        pass


    @sandboxed
    @pytest.mark.xfail(strict=True, reason="strict-reason-in-guest")
    def test_xpass_strict():
        pass


    @sandboxed
    @pytest.mark.parametrize(("base", "square"), [(2, 4), (3, 9)])
    def test_param(base, square):
        assert base * base == square


    @sandboxed
    class TestGroup:
        def test_one(self):
            assert os.uname().nodename == "gondolin"

        def test_two(self):
            assert type(self).__name__ == "TestGroup"


    @sandboxed
    def test_conftest_fixture(guest_only):
        assert guest_only == "from-conftest"


    @sandboxed
    def test_capsys(capsys):
        print("captured-by-capsys")
        assert capsys.readouterr().out == "captured-by-capsys\\n"


    @sandboxed
    def test_output_on_failure():
        print("stdout-shown-on-failure")
        logging.getLogger("inner").warning("log-shown-on-failure")
        assert os.uname().nodename == "not-gondolin"


    @sandboxed
    def test_caplog(caplog):
        logging.getLogger("inner").warning("caplog-message")
        assert [r.getMessage() for r in caplog.records] == ["caplog-message"]


    @sandboxed
    def test_tmp_path(tmp_path):
        target = tmp_path / f"guest-{uuid.uuid4().hex}.txt"
        target.write_text("written in the guest")
        assert target.read_text() == "written in the guest"
        assert os.uname().nodename == "gondolin"
        print(f"GUEST_TMP_FILE={target}")


    # Four rounds on VMs that take turns: each VM serves twice, so a round that
    # finds a trace of an earlier one means a restore did not clean up.
    @sandboxed
    @pytest.mark.parametrize("round_", range(4))
    def test_isolation(round_):
        global STATE
        assert STATE == "original"
        assert not MARKER_FILE.exists()
        STATE = "mutated"
        MARKER_FILE.write_text("left behind")
        assert (STATE, MARKER_FILE.read_text()) == ("mutated", "left behind")
        print(f"RANDOM_SAMPLE={random.getrandbits(64)}:{os.urandom(16).hex()}")


    @sandboxed
    def test_wants_vm(vm):
        pass


    @sandboxed
    def test_project_package():
        import mypkg

        assert mypkg.ANSWER == 42
        assert mypkg.where() == "gondolin"
        assert mypkg.__file__ == str(Path(__file__).parent / "mypkg" / "__init__.py")


    def test_on_host():
        import mypkg

        assert mypkg.where() != "gondolin"
        assert os.environ.get("PYTEST_GONDOLIN_WORKER") is None
"""

SHARED_MODULE_MARK = """
    import os

    import pytest

    pytestmark = pytest.mark.sandboxed


    def test_module_marked_a():
        assert os.uname().nodename == "gondolin"


    def test_module_marked_b():
        assert os.environ.get("PYTEST_GONDOLIN_WORKER") == "1"
"""

#: Node id -> the statuses of its ``-v`` progress lines in the shared session.
SHARED_STATUSES: dict[str, list[str]] = {
    "test_main.py::test_pass": ["PASSED"],
    "test_main.py::test_fail_introspection": ["FAILED"],
    "test_main.py::test_setup_error": ["ERROR"],
    "test_main.py::test_teardown_error": ["PASSED", "ERROR"],
    "test_main.py::test_skip": ["SKIPPED"],
    "test_main.py::test_xfail": ["XFAIL"],
    "test_main.py::test_xpass": ["XPASS"],
    "test_main.py::test_xpass_strict": ["FAILED"],
    "test_main.py::test_param[2-4]": ["PASSED"],
    "test_main.py::test_param[3-9]": ["PASSED"],
    "test_main.py::TestGroup::test_one": ["PASSED"],
    "test_main.py::TestGroup::test_two": ["PASSED"],
    "test_main.py::test_conftest_fixture": ["PASSED"],
    "test_main.py::test_capsys": ["PASSED"],
    "test_main.py::test_output_on_failure": ["FAILED"],
    "test_main.py::test_caplog": ["PASSED"],
    "test_main.py::test_tmp_path": ["PASSED"],
    "test_main.py::test_isolation[0]": ["PASSED"],
    "test_main.py::test_isolation[1]": ["PASSED"],
    "test_main.py::test_isolation[2]": ["PASSED"],
    "test_main.py::test_isolation[3]": ["PASSED"],
    "test_main.py::test_wants_vm": ["ERROR"],
    "test_main.py::test_project_package": ["PASSED"],
    "test_main.py::test_on_host": ["PASSED"],
    "test_module_mark.py::test_module_marked_a": ["PASSED"],
    "test_module_mark.py::test_module_marked_b": ["PASSED"],
}


@dataclass(frozen=True)
class SharedRun:
    result: pytest.RunResult
    junit: ET.Element
    text: str


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(source).lstrip("\n"))


def _run_subprocess(root: Path, cache: Path, *args: str) -> pytest.RunResult:
    """Run pytest in *root* the way ``Pytester.runpytest_subprocess`` does."""
    env = dict(os.environ)
    for name, value in _inner_env_changes(cache).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    basetemp = root / "basetemp"
    argv = [sys.executable, "-mpytest", f"--basetemp={basetemp}", "-p", "gondolin", *args]
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=INNER_TIMEOUT,
        check=False,
    )
    return pytest.RunResult(
        proc.returncode,
        proc.stdout.splitlines(),
        proc.stderr.splitlines(),
        time.monotonic() - started,
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> SharedRun:
    root = tmp_path_factory.mktemp("shared")
    _write(
        root,
        {
            "conftest.py": SHARED_CONFTEST,
            "mypkg/__init__.py": SHARED_PACKAGE,
            "test_main.py": SHARED_MAIN,
            "test_module_mark.py": SHARED_MODULE_MARK,
        },
    )
    junit = root / "junit.xml"
    result = _run_subprocess(
        root, gondolin_cache, "-v", "-rA", "--strict-markers", f"--junitxml={junit}"
    )
    text = "\n".join(result.outlines + result.errlines)
    assert junit.is_file(), text
    return SharedRun(result, ET.parse(junit).getroot(), text)


def _main_line(needle: str) -> int:
    return line_of(SHARED_MAIN, needle)


def test_shared_counts_and_exit_code(shared: SharedRun) -> None:
    shared.result.assert_outcomes(passed=18, failed=3, errors=3, skipped=1, xfailed=1, xpassed=1)
    assert shared.result.ret == pytest.ExitCode.TESTS_FAILED, shared.text


@pytest.mark.parametrize(("nodeid", "statuses"), list(SHARED_STATUSES.items()))
def test_shared_item_status(shared: SharedRun, nodeid: str, statuses: list[str]) -> None:
    assert verbose_statuses(shared.result).get(nodeid) == statuses, shared.text


def test_shared_runs_exactly_the_expected_items(shared: SharedRun) -> None:
    assert set(verbose_statuses(shared.result)) == set(SHARED_STATUSES), shared.text


def test_failure_shows_assertion_introspection(shared: SharedRun) -> None:
    shared.result.stdout.fnmatch_lines(
        [
            "*_ test_fail_introspection _*",
            "",
            "    @sandboxed",
            "    def test_fail_introspection():",
            "        x = 4",
            ">       assert x == 5",
            "E       assert 4 == 5",
            "",
            f"test_main.py:{_main_line('assert x == 5')}: AssertionError",
        ],
        consecutive=True,
    )


def test_fixture_setup_and_teardown_errors(shared: SharedRun) -> None:
    shared.result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_setup_error _*",
            "*",
            "    @pytest.fixture",
            "    def broken_setup():",
            '>       raise RuntimeError("setup-boom")',
            "E       RuntimeError: setup-boom",
            "",
            f"conftest.py:{line_of(SHARED_CONFTEST, 'setup-boom')}: RuntimeError",
            "*_ ERROR at teardown of test_teardown_error _*",
            "*",
            "    @pytest.fixture",
            "    def broken_teardown():",
            "        yield",
            '>       raise RuntimeError("teardown-boom")',
            "E       RuntimeError: teardown-boom",
            "",
            f"conftest.py:{line_of(SHARED_CONFTEST, 'teardown-boom')}: RuntimeError",
        ]
    )


def test_captured_stdout_and_log_shown_on_failure(shared: SharedRun) -> None:
    shared.result.stdout.fnmatch_lines(
        [
            "*_ test_output_on_failure _*",
            "E       AssertionError: assert 'gondolin' == 'not-gondolin'",
            "*- Captured stdout call -*",
            "stdout-shown-on-failure",
            "*- Captured log call -*",
            f"WARNING  inner:test_main.py:{_main_line('log-shown-on-failure')} log-shown-on-failure",
        ]
    )


def test_capsys_consumes_output_in_the_guest(shared: SharedRun) -> None:
    # test_capsys passed (status table) only if readouterr() saw the print;
    # what it read is consumed, so it is in no captured section.
    assert "captured-by-capsys" not in shared.text


def test_caplog_records_in_the_guest(shared: SharedRun) -> None:
    line = _main_line('warning("caplog-message")')
    shared.result.stdout.fnmatch_lines(
        [
            "*= PASSES =*",
            "*_ test_caplog _*",
            "*- Captured log call -*",
            f"WARNING  inner:test_main.py:{line} caplog-message",
        ]
    )


def test_tmp_path_lives_in_the_guest(shared: SharedRun) -> None:
    found = [
        line.partition("=")[2]
        for line in shared.result.outlines
        if line.startswith("GUEST_TMP_FILE=")
    ]
    assert len(found) == 1, shared.text
    guest_file = Path(found[0])
    assert guest_file.is_absolute()
    assert re.fullmatch(r"guest-[0-9a-f]{32}\.txt", guest_file.name), guest_file
    # The guest wrote and read it back (the test passed); the host never saw it.
    assert not guest_file.exists()


def test_every_restore_gets_fresh_randomness(shared: SharedRun) -> None:
    """The isolation rounds all start from one snapshot: Python's ``random`` and the
    kernel RNG must still give each of them different values."""
    samples = [
        line.partition("=")[2].split(":")
        for line in shared.result.outlines
        if line.startswith("RANDOM_SAMPLE=")
    ]
    assert len(samples) == 4, shared.text
    for part in (0, 1):
        values = [sample[part] for sample in samples]
        assert len(set(values)) == 4, values


def test_host_fixture_in_sandboxed_test_is_explained(shared: SharedRun) -> None:
    shared.result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_wants_vm _*",
            "fixture 'vm' is a host fixture (it drives VMs from the host) and is not available "
            "inside a @pytest.mark.sandboxed test, which already runs in a VM",
        ],
        consecutive=True,
    )


# Bad marker arguments are collection errors: tests/plugin/test_collection_errors.py.


def test_short_summary_with_rA(shared: SharedRun) -> None:
    skip_line = _main_line('pytest.skip("skip-reason-in-guest")')
    shared.result.stdout.fnmatch_lines(
        [
            "*= short test summary info =*",
            "PASSED test_main.py::test_pass",
            "PASSED test_main.py::test_teardown_error",
            "PASSED test_main.py::test_param[[]2-4[]]",
            "PASSED test_main.py::test_param[[]3-9[]]",
            "PASSED test_main.py::TestGroup::test_one",
            "PASSED test_main.py::TestGroup::test_two",
            "PASSED test_main.py::test_conftest_fixture",
            "PASSED test_main.py::test_capsys",
            "PASSED test_main.py::test_caplog",
            "PASSED test_main.py::test_tmp_path",
            "PASSED test_main.py::test_isolation[[]0[]]",
            "PASSED test_main.py::test_isolation[[]1[]]",
            "PASSED test_main.py::test_isolation[[]2[]]",
            "PASSED test_main.py::test_isolation[[]3[]]",
            "PASSED test_main.py::test_project_package",
            "PASSED test_main.py::test_on_host",
            "PASSED test_module_mark.py::test_module_marked_a",
            "PASSED test_module_mark.py::test_module_marked_b",
            f"SKIPPED [[]1[]] test_main.py:{skip_line}: skip-reason-in-guest",
            "XFAIL test_main.py::test_xfail - xfail-reason-in-guest",
            "XPASS test_main.py::test_xpass - xpass-reason-in-guest",
            "ERROR test_main.py::test_setup_error - RuntimeError: setup-boom",
            "ERROR test_main.py::test_teardown_error - RuntimeError: teardown-boom",
            "ERROR test_main.py::test_wants_vm - Failed: fixture 'vm' is a host fixture*",
            "FAILED test_main.py::test_fail_introspection - assert 4 == 5",
            "FAILED test_main.py::test_xpass_strict - [[]XPASS(strict)[]] strict-reason-in-guest",
            "FAILED test_main.py::test_output_on_failure - AssertionError: assert 'gondolin' *",
            "*= 3 failed, 18 passed, 1 skipped, 1 xfailed, 1 xpassed, 3 errors in *",
        ],
        consecutive=True,
    )


def test_strict_markers_clean(shared: SharedRun) -> None:
    # --strict-markers turns an unregistered mark into a collection error on
    # the host and in the guest worker; neither happened.
    assert "not found in `markers` configuration option" not in shared.text
    assert "PytestUnknownMarkWarning" not in shared.text
    assert "error during collection" not in shared.text
    assert "errors during collection" not in shared.text


def _junit_cases(root: ET.Element) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    cases: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for case in root.iter("testcase"):
        name = case.get("name", "")
        assert name not in cases, f"duplicate testcase {name}"
        children = [
            (child.tag, child.get("message", ""))
            for child in case
            if child.tag in {"failure", "error", "skipped"}
        ]
        cases[name] = (case.get("classname", ""), children)
    return cases


def test_junitxml(shared: SharedRun) -> None:
    suite = shared.junit.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("26", "3", "3")
    assert suite.get("skipped") == "2"  # the skip and the xfail
    vm_message = (
        "failed on setup with \"Failed: fixture 'vm' is a host fixture (it drives VMs from the "
        "host) and is not available inside a @pytest.mark.sandboxed test, which already runs in "
        'a VM"'
    )
    passed: list[tuple[str, str]] = []
    expected = {
        "test_pass": ("test_main", passed),
        "test_fail_introspection": ("test_main", [("failure", "assert 4 == 5")]),
        "test_setup_error": (
            "test_main",
            [("error", 'failed on setup with "RuntimeError: setup-boom"')],
        ),
        "test_teardown_error": (
            "test_main",
            [("error", 'failed on teardown with "RuntimeError: teardown-boom"')],
        ),
        "test_skip": ("test_main", [("skipped", "skip-reason-in-guest")]),
        "test_xfail": ("test_main", [("skipped", "xfail-reason-in-guest")]),
        "test_xpass": ("test_main", passed),
        "test_xpass_strict": (
            "test_main",
            [("failure", "[XPASS(strict)] strict-reason-in-guest")],
        ),
        "test_param[2-4]": ("test_main", passed),
        "test_param[3-9]": ("test_main", passed),
        "test_one": ("test_main.TestGroup", passed),
        "test_two": ("test_main.TestGroup", passed),
        "test_conftest_fixture": ("test_main", passed),
        "test_capsys": ("test_main", passed),
        "test_output_on_failure": (
            "test_main",
            [
                (
                    "failure",
                    "AssertionError: assert 'gondolin' == 'not-gondolin'\n  \n"
                    "  - not-gondolin\n  ? ----\n  + gondolin",
                )
            ],
        ),
        "test_caplog": ("test_main", passed),
        "test_tmp_path": ("test_main", passed),
        "test_isolation[0]": ("test_main", passed),
        "test_isolation[1]": ("test_main", passed),
        "test_isolation[2]": ("test_main", passed),
        "test_isolation[3]": ("test_main", passed),
        "test_wants_vm": ("test_main", [("error", vm_message)]),
        "test_project_package": ("test_main", passed),
        "test_on_host": ("test_main", passed),
        "test_module_marked_a": ("test_module_mark", passed),
        "test_module_marked_b": ("test_module_mark", passed),
    }
    assert _junit_cases(shared.junit) == expected


def test_junitxml_failure_body_has_the_guest_traceback(shared: SharedRun) -> None:
    (case,) = [
        c for c in shared.junit.iter("testcase") if c.get("name") == "test_fail_introspection"
    ]
    failure = case.find("failure")
    assert failure is not None and failure.text is not None
    assert ">       assert x == 5\nE       assert 4 == 5" in failure.text
    assert failure.text.rstrip().endswith(
        f"test_main.py:{_main_line('assert x == 5')}: AssertionError"
    )


# --------------------------------------------------------------------------
# sessions of their own
# --------------------------------------------------------------------------

GUEST_CHECK = 'assert os.uname().nodename == "gondolin"'


def test_exitfirst_stops_after_first_failure(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_x=f"""
        import os
        import pytest

        @pytest.mark.sandboxed
        def test_a():
            {GUEST_CHECK}

        @pytest.mark.sandboxed
        def test_b():
            assert os.uname().nodename == "elsewhere"

        @pytest.mark.sandboxed
        def test_c():
            {GUEST_CHECK}

        def test_d_host():
            pass
        """
    )
    result = run_gondolin(inner, "-x", "-v")
    result.assert_outcomes(passed=1, failed=1)
    assert verbose_statuses(result) == {
        "test_x.py::test_a": ["PASSED"],
        "test_x.py::test_b": ["FAILED"],
    }
    result.stdout.fnmatch_lines(["*! stopping after 1 failures !*", "*= 1 failed, 1 passed in *"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_keyword_selection(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_k=f"""
        import os
        import pytest

        @pytest.mark.sandboxed
        def test_alpha():
            {GUEST_CHECK}

        @pytest.mark.sandboxed
        def test_beta():
            raise AssertionError("deselected test ran")

        @pytest.mark.sandboxed
        def test_gamma():
            {GUEST_CHECK}
        """
    )
    result = run_gondolin(inner, "-k", "alpha or gamma", "-v")
    result.assert_outcomes(passed=2, deselected=1)
    assert verbose_statuses(result) == {
        "test_k.py::test_alpha": ["PASSED"],
        "test_k.py::test_gamma": ["PASSED"],
    }
    assert "deselected test ran" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.OK


def test_last_failed_reruns_only_the_failure(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_lf=f"""
        import os
        import pytest

        @pytest.mark.sandboxed
        def test_ok():
            {GUEST_CHECK}

        @pytest.mark.sandboxed
        def test_bad():
            assert os.uname().nodename == "elsewhere"
        """
    )
    first = run_gondolin(inner, "-v")
    first.assert_outcomes(passed=1, failed=1)
    second = run_gondolin(inner, "--lf", "-v")
    # The last-failed plugin drops the passed item at collection (no "deselected").
    second.assert_outcomes(failed=1)
    assert verbose_statuses(second) == {"test_lf.py::test_bad": ["FAILED"]}
    second.stdout.fnmatch_lines(
        ["collecting ... collected 1 item", "run-last-failure: rerun previous 1 failure"]
    )


def test_timeout_and_worker_crash_fail_only_their_test(inner: pytest.Pytester) -> None:
    source = f"""
        import os
        import time
        import pytest

        @pytest.mark.sandboxed(timeout=2)
        def test_sleeps_too_long():
            time.sleep(60)

        @pytest.mark.sandboxed
        def test_crashes_worker():
            os._exit(3)

        @pytest.mark.sandboxed
        def test_after_crash():
            {GUEST_CHECK}
        """
    inner.makepyfile(test_t=source)
    result = run_gondolin(inner, "-v")
    result.assert_outcomes(passed=1, failed=2)
    assert verbose_statuses(result) == {
        "test_t.py::test_sleeps_too_long": ["FAILED"],
        "test_t.py::test_crashes_worker": ["FAILED"],
        "test_t.py::test_after_crash": ["PASSED"],
    }
    sleep_line = line_of(source, "time.sleep(60)")
    result.stdout.fnmatch_lines(
        [
            "*_ test_sleeps_too_long _*",
            "Timeout > 2s",
            "*stack dump of the worker*",
            f'*File "*test_t.py", line {sleep_line} in test_sleeps_too_long*',
            "*_ test_crashes_worker _*",
            "worker crashed (exit code 3)*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "FAILED test_t.py::test_sleeps_too_long - Timeout > 2s",
            "FAILED test_t.py::test_crashes_worker - worker crashed (exit code 3)*",
        ]
    )


def test_xdist_workers_each_run_their_own_vm(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_n=f"""
        import os
        import pytest

        @pytest.mark.sandboxed
        def test_one():
            {GUEST_CHECK}

        @pytest.mark.sandboxed
        def test_two():
            {GUEST_CHECK}
        """
    )
    result = run_gondolin(inner, "-n", "2", "-v")
    result.assert_outcomes(passed=2)
    workers = {
        match[1]
        for line in result.outlines
        if (
            match := re.match(
                r"^\[(gw\d+)\] \[ *\d+%\] PASSED (?:\(in guest\) )?test_n\.py::test_", line
            )
        )
    }
    # xdist's load scheduling hands one of the two items to each worker, so
    # both worker processes booted a VM of their own.
    assert workers == {"gw0", "gw1"}, result.stdout.str()
    assert result.ret == pytest.ExitCode.OK
