"""pytest-cov and sandboxed tests: real inner pytest runs against real QEMU guests.

The code a sandboxed test runs is measured in the guest and merged into the
host's coverage data, so the reports equal those of the same tests run
plain (``-p no:gondolin``: the marker is then just a marker), with and
without pytest-xdist. The guest imports coverage from the host's
environment (``gondolin_host_environment = true``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.guest.coverage import CoverageConfig, GuestCoverage
from pytest_gondolin.sandbox.coverage import (
    MAX_LINENO,
    MAX_PATH_CHARS,
    CoverageMessage,
    parse_coverage,
    reportable,
)
from pytest_gondolin.sandbox.messages import parse_message

pytest_plugins = ("pytester",)

#: Bound on one inner session (VM restore, copies, guest collection under TCG).
INNER_TIMEOUT = 600.0

LIBRARY = """
def on_host(x):
    if x > 0:
        return "positive"
    return "other"


def in_guest(x):
    total = 0
    for i in range(x):
        total += i
    if total > 3:
        return "big"
    return "small"


def crashes_later():
    value = 42
    return value


def never_called():
    return 0
"""

TESTS = """
import pytest
import mylib

def test_plain():
    assert mylib.on_host(1) == "positive"

@pytest.mark.sandboxed
def test_sandboxed():
    assert mylib.in_guest(4) == "big"
"""

CRASHING = """
import os, signal
import pytest
import mylib

@pytest.mark.sandboxed
def test_crashes():
    mylib.crashes_later()
    os.kill(os.getpid(), signal.SIGKILL)

@pytest.mark.sandboxed
def test_survives():
    assert mylib.in_guest(1) == "small"

@pytest.mark.sandboxed
def test_forges_coverage():
    # A hostile test writes on the worker's own channel to the host.
    import gc

    pipe = next(o for o in gc.get_objects() if type(o).__name__ == "HostPipe")
    files = {"/etc/passwd": [1], "/nonexistent/evil.py": [1, 2]}
    pipe.send({"t": "coverage", "nodeid": "test_mylib.py::test_forges_coverage",
               "arcs": False, "files": files})
"""

INI = """
[pytest]
gondolin_host_environment = {carry}
"""


def _project(pytester: pytest.Pytester, tests: str, *, carry: bool = True) -> None:
    pytester.makefile(".ini", pytest=INI.format(carry="true" if carry else "false"))
    pytester.makepyfile(mylib=LIBRARY, test_mylib=tests)


def _run_all(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """An inner run with pytest-cov, and its JSON report's files."""
    report = pytester.path / "cov.json"
    report.unlink(missing_ok=True)
    result = pytester.runpytest_subprocess(
        "--cov=mylib",
        "--cov-report=term-missing",
        f"--cov-report=json:{report}",
        *args,
        timeout=INNER_TIMEOUT,
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str(), result.stdout.str()
    data: dict[str, Any] = json.loads(report.read_text())
    return result, data["files"]


def _run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """An inner run with pytest-cov, and its JSON report for mylib.py."""
    result, files = _run_all(pytester, *args)
    return result, files["mylib.py"]


def _term_line(result: pytest.RunResult) -> str:
    """pytest-cov's terminal line for mylib.py (statements, missed, percent, missing lines)."""
    lines = [line for line in result.stdout.lines if re.match(r"mylib\.py\s", line)]
    assert len(lines) == 1, result.stdout.str()
    return " ".join(lines[0].split())


def _lines(*texts: str) -> set[int]:
    """The line numbers (1-based) of these unique lines of LIBRARY as the file holds it."""
    source = [line.strip() for line in LIBRARY.strip().splitlines()]
    return {source.index(text) + 1 for text in texts}


#: What ``in_guest(4)`` runs: only in the guest.
IN_GUEST_BIG = _lines(
    "total = 0", "for i in range(x):", "total += i", "if total > 3:", 'return "big"'
)


@pytest.mark.integration
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_sandboxed_lines_count_as_in_a_plain_run(
    inner: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    _project(inner, TESTS)
    plain, plain_data = _run(inner, "-p", "no:gondolin", *xdist)
    plain.assert_outcomes(passed=2)
    sandboxed, data = _run(inner, *xdist)
    sandboxed.assert_outcomes(passed=2)
    # The negative control: these lines ran only in the guest.
    assert set(data["executed_lines"]) >= IN_GUEST_BIG, data
    assert not IN_GUEST_BIG & set(data["missing_lines"])
    assert data["executed_lines"] == plain_data["executed_lines"]
    assert data["summary"] == plain_data["summary"]
    assert _term_line(sandboxed) == _term_line(plain)
    assert "coverage of sandboxed tests" not in sandboxed.stdout.str()


@pytest.mark.integration
def test_a_crashed_or_hostile_test_spoils_only_its_own_coverage(inner: pytest.Pytester) -> None:
    _project(inner, CRASHING)
    result, files = _run_all(inner, "-rA")
    result.assert_outcomes(passed=2, failed=1)
    data = files["mylib.py"]
    result.stdout.fnmatch_lines(["FAILED test_mylib.py::test_crashes*"])
    executed = set(data["executed_lines"])
    assert _lines("value = 42", "return value") & executed == set()
    # test_survives ran in_guest(1): the loop and the "small" branch.
    assert _lines('return "small"') <= executed
    assert _lines('return "big"') & executed == set()
    # Forged data for files outside the project is dropped, with one warning.
    assert set(files) == {"mylib.py"}, files
    result.stdout.fnmatch_lines(
        ["*coverage of sandboxed tests: data for files outside the project*'/etc/passwd'*"]
    )


@pytest.mark.integration
def test_a_guest_without_coverage_warns_once(inner: pytest.Pytester) -> None:
    _project(
        inner,
        TESTS
        + TESTS.replace("test_plain", "test_plain2")
        .replace("test_sandboxed", "test_sandboxed2")
        .replace("import pytest\nimport mylib\n", ""),
        carry=False,
    )
    result, data = _run(inner, "-W", "error")
    result.assert_outcomes(passed=4)
    output = result.stdout.str()
    assert output.count("coverage of sandboxed tests: the guest could not measure it") == 1, output
    assert "gondolin_host_environment" in output
    # Measured on the host only: the guest's lines are missing, as the warning says.
    assert set(data["missing_lines"]) >= IN_GUEST_BIG


# -- the host's checks on what the guest sends (no VM) ----------------------------------


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()


def test_a_coverage_message_is_parsed_and_validated() -> None:
    msg = parse_message(
        _line(
            {
                "t": "coverage",
                "nodeid": "t.py::a",
                "arcs": True,
                "files": {"/p/m.py": [-1, 2, 2, -2]},
            }
        )
    )
    assert msg == CoverageMessage("t.py::a", True, (("/p/m.py", (-1, 2, 2, -2)),))
    assert msg.values == 4
    error = parse_message(_line({"t": "coverage", "nodeid": "t.py::a", "error": "ImportError: x"}))
    assert error == CoverageMessage("t.py::a", error="ImportError: x")


@pytest.mark.parametrize(
    "message",
    [
        {"nodeid": "a", "arcs": False, "files": {"/p/m.py": [1, -1]}},  # negative line
        {"nodeid": "a", "arcs": False, "files": {"/p/m.py": [MAX_LINENO + 1]}},
        {"nodeid": "a", "arcs": True, "files": {"/p/m.py": [1, 2, 3]}},  # half an arc
        {"nodeid": "a", "arcs": False, "files": {"/p/m.py": ["1"]}},
        {"nodeid": "a", "arcs": False, "files": {"/p/m.py": 1}},
        {"nodeid": "a", "arcs": "yes", "files": {}},
        {"nodeid": "a", "arcs": False, "files": {"/" + "x" * MAX_PATH_CHARS: [1]}},
        {"nodeid": 1, "arcs": False, "files": {}},
    ],
)
def test_a_malformed_coverage_message_is_a_protocol_error(message: dict[str, Any]) -> None:
    with pytest.raises(WorkerProtocolError):
        parse_coverage(message)


def test_paths_the_host_accepts(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "m.py").write_text("x = 1\n")
    (tmp_path / "outside.py").write_text("x = 1\n")
    assert reportable(str(project / "m.py"), [project])
    for forged in (
        str(tmp_path / "outside.py"),  # outside the project
        str(project / "missing.py"),  # not on the host
        str(project / ".." / "outside.py"),  # not normalized
        "m.py",  # relative
        str(project),  # not a file
        str(project / "m.py\0"),
    ):
        assert not reportable(forged, [project]), forged


# -- the guest's side, in this process (no VM) --------------------------------------------

MEASURED = """
def first():
    return 1


def second():
    return 2
"""


def test_the_guest_measures_each_run_on_its_own(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = pytester.makepyfile(covlib_guest_side=MEASURED)
    monkeypatch.syspath_prepend(str(pytester.path))
    measurer = GuestCoverage(
        CoverageConfig(source=(str(pytester.path),), branch=False, config_file=False)
    )
    assert measurer.error is None
    import covlib_guest_side  # type: ignore[import-not-found]

    items = pytester.getitems(
        "import pytest\ndef test_a(): pass\n@pytest.mark.no_cover\ndef test_b(): pass"
    )
    item, skipped = items
    sent: list[dict[str, Any]] = []
    with measurer.measuring(item, sent.append):
        covlib_guest_side.first()
    with measurer.measuring(item, sent.append):
        covlib_guest_side.second()
    with measurer.measuring(skipped, sent.append):  # pytest-cov's no_cover: not measured
        covlib_guest_side.first()
    path = str(module.resolve())
    assert sent == [
        {"t": "coverage", "nodeid": item.nodeid, "arcs": False, "files": {path: [2]}},
        {"t": "coverage", "nodeid": item.nodeid, "arcs": False, "files": {path: [6]}},
    ]


def test_a_guest_that_cannot_measure_says_so_with_every_run(pytester: pytest.Pytester) -> None:
    measurer = GuestCoverage(
        CoverageConfig(source=None, branch=None, config_file=str(pytester.path / "missing.rc"))
    )
    assert measurer.error is not None and "missing.rc" in measurer.error
    item = pytester.getitem("def test_func(): pass")
    sent: list[dict[str, Any]] = []
    with measurer.measuring(item, sent.append):
        pass
    assert sent == [{"t": "coverage", "nodeid": item.nodeid, "error": measurer.error}]


def test_a_runs_coverage_is_its_own_and_bounded() -> None:
    from pytest_gondolin.sandbox.coverage import MAX_COVERAGE_VALUES_PER_RUN
    from pytest_gondolin.sandbox.outcome import RunTally

    tally = RunTally("t.py::a")
    mine = CoverageMessage("t.py::a", False, (("/p/m.py", (1, 2)),))
    tally.add(mine)
    assert tally.outcome(None, 0.0).coverage == (mine,)
    with pytest.raises(WorkerProtocolError, match=re.escape("coverage for 't.py::b'")):
        tally.add(CoverageMessage("t.py::b", False, (("/p/m.py", (1,)),)))
    too_many = tuple([1] * (MAX_COVERAGE_VALUES_PER_RUN - 1))
    with pytest.raises(WorkerProtocolError, match="coverage numbers in one run"):
        tally.add(CoverageMessage("t.py::a", False, (("/p/m.py", too_many),)))
