"""Diagnostics: report header, ``(in guest)`` status, failure artifacts, ``--gondolin-keep-vm``.

Cheap checks run without a VM (an empty cache, a conftest that marks reports
as if they came from a guest). The rest share one real inner session
(module scope: it pays for a VM restore and a sandbox, ~30-60 s under TCG),
run with ``-v --gondolin-keep-vm --gondolin-artifacts --junitxml`` and a
private runtime folder (``$XDG_RUNTIME_DIR``), so no other pytest run on
the machine reaps the VMs it keeps; each behaviour is then asserted by its
own test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import INNER_ADDOPTS
from pytest_gondolin import paths
from pytest_gondolin.image.info import image_status

pytest_plugins = ("pytester",)

#: Bound on the shared inner session: a VM restore, a second one after a VM
#: is kept, a sandbox (project copy + guest collection) under TCG on a busy
#: 2-core host; 600 s also covers a cold snapshot rebuild.
INNER_TIMEOUT = 600.0
#: ``gondolin`` CLI calls: attach/kill/ps answer in well under a second.
CLI_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    return paths.cache_dir()


# --------------------------------------------------------------------------
# without a VM
# --------------------------------------------------------------------------


def test_header_before_the_image_is_built(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = pytester.mkdir("empty-cache")
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(empty))
    monkeypatch.setenv("GONDOLIN_ACCEL", "tcg")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "gondolin", "--co")
    result.stdout.fnmatch_lines(
        [
            f"gondolin: image bookworm-* not built yet (built on first use); cache {empty}",
            "gondolin: accel tcg (requested)",
        ]
    )
    assert not (empty / "images" / "bookworm").exists()  # the header never builds


def test_header_with_the_real_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gondolin_cache: Path
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(gondolin_cache))
    status = image_status("bookworm")
    if not status.built:
        pytest.skip("the guest image is not built (gondolin image build)")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "gondolin", "--co")
    result.stdout.fnmatch_lines(
        [
            f"gondolin: image {status.key}, warm snapshot: *; cache {gondolin_cache}",
            "gondolin: accel [kt][vc][mg] (*)",
        ]
    )
    result = pytester.runpytest_subprocess("-p", "gondolin", "--co", "-q")
    result.stdout.no_fnmatch_line("gondolin: *")  # -q: no header at all


MARK_AS_GUEST = """
    import pytest
    from pytest_gondolin.sandbox.replay import GUEST_REPORT_ATTR

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        report = yield
        if "guest" in item.name:
            setattr(report, GUEST_REPORT_ATTR, True)
        return report
"""

STATUS_TESTS = """
    import pytest

    def test_guest_pass(): pass
    def test_guest_fail(): assert 0
    @pytest.mark.xfail(reason="known")
    def test_guest_xfail(): assert 0
    def test_host_pass(): pass
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["inline", "xdist"])
def test_guest_reports_say_so_in_verbose_output_only(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    pytester.makeconftest(MARK_AS_GUEST)
    pytester.makepyfile(STATUS_TESTS)
    args = ["-p", "gondolin", "-v", "--junitxml=junit.xml", "-rA"]
    if xdist:
        args += ["-n", "2"]  # the attribute must survive xdist's report serialization
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2, failed=1, xfailed=1)
    progress, summary = "\n".join(result.outlines).split("short test summary info", 1)
    # Progress lines ("path::test STATUS", xdist: "[gw0] [ 50%] STATUS path::test") say it ...
    statuses: dict[str, set[str]] = {}
    for line in progress.splitlines():
        test = re.search(r"::(test_\w+)", line)
        status = re.search(r"\b(PASSED|FAILED|XFAIL)( \(in guest\))?", line)
        if test and status:
            statuses.setdefault(test[1], set()).add(status[0])
    assert statuses == {
        "test_guest_pass": {"PASSED (in guest)"},
        "test_guest_fail": {"FAILED (in guest)"},
        "test_guest_xfail": {"XFAIL (in guest)"},
        "test_host_pass": {"PASSED"},
    }
    # ... the -rA short summary, whose lines tools parse, does not.
    module = "test_guest_reports_say_so_in_verbose_output_only.py"
    pytest.LineMatcher(summary.splitlines()).fnmatch_lines(
        [
            f"PASSED {module}::test_guest_pass",
            f"PASSED {module}::test_host_pass",
            f"XFAIL {module}::test_guest_xfail - known",
            f"FAILED {module}::test_guest_fail - assert 0",
        ]
    )
    assert "(in guest)" not in summary
    # Non-verbose progress keeps its one-letter statuses.
    quiet = pytester.runpytest_subprocess("-p", "gondolin")
    quiet.stdout.fnmatch_lines(["test_*.py .Fx. *"])
    # junitxml sees ordinary reports: names unchanged, one failure.
    suite = ET.parse(pytester.path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "1"
    names = sorted(str(case.get("name")) for case in suite.iter("testcase"))
    assert names == ["test_guest_fail", "test_guest_pass", "test_guest_xfail", "test_host_pass"]
    # --lf finds the failure by its unchanged node id.
    lf = pytester.runpytest_subprocess("-p", "gondolin", "--lf", "--co", "-q")
    lf.stdout.fnmatch_lines(
        ["test_guest_reports_say_so_in_verbose_output_only.py::test_guest_fail"]
    )


# --------------------------------------------------------------------------
# one shared session with real VMs
# --------------------------------------------------------------------------

SHARED_TESTS = """
    import pytest

    def test_vm_fails_first(vm):
        vm.exec("echo kept-state > /root/marker", check=True)
        assert False, "first-failure"

    def test_vm_fails_second(vm):
        assert vm.exec("test -e /root/marker").returncode != 0, "the kept VM was reused"
        assert False, "second-failure"

    def test_vm_passes(vm):
        assert vm.exec("test -e /root/marker").returncode != 0

    @pytest.mark.sandboxed
    def test_guest_passes():
        pass

    @pytest.mark.sandboxed
    def test_guest_fails():
        assert False, "guest-failure"
"""

FAILING = ("test_vm_fails_first", "test_vm_fails_second", "test_guest_fails")
KEPT = ("test_vm_fails_first", "test_vm_fails_second")


@dataclass
class Shared:
    root: Path
    env: dict[str, str]
    output: str
    returncode: int

    @property
    def lines(self) -> pytest.LineMatcher:
        return pytest.LineMatcher(self.output.splitlines())

    def sections(self, title: str) -> dict[str, str]:
        """Test name -> first line of its report section ``title``."""
        found: dict[str, str] = {}
        current = None
        lines = self.output.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^_+ (test_\w+) _+$", line)
            if m:
                current = m[1]
            elif current and re.match(rf"^-+ {re.escape(title)} -+$", line):
                found[current] = lines[i + 1]
        return found

    def gondolin(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest_gondolin.cli", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )

    def pytest(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "gondolin", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=INNER_TIMEOUT,
        )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("diag")
    (root / "test_shared.py").write_text(textwrap.dedent(SHARED_TESTS).lstrip())
    (root / "pytest.ini").write_text("[pytest]\n")
    runtime = tmp_path_factory.mktemp("rt")  # short: socket paths are limited to 107 bytes
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_XDIST_WORKER")
    }
    env["PYTEST_ADDOPTS"] = INNER_ADDOPTS
    env.update(
        GONDOLIN_CACHE_DIR=str(gondolin_cache),
        XDG_RUNTIME_DIR=str(runtime),
        COLUMNS="200",
        PY_COLORS="0",
    )
    state = Shared(root, env, "", -1)
    try:
        res = state.pytest(
            "-v",
            "--gondolin-keep-vm",
            "--gondolin-artifacts=arts",
            "--junitxml=junit.xml",
            f"--basetemp={root / 'basetemp'}",
        )
        state.output = res.stdout + res.stderr
        state.returncode = res.returncode
        yield state
    finally:
        # Never leave kept VMs behind, whatever the tests did.
        state.gondolin("kill", "--all")


@pytest.mark.integration
def test_shared_session_ran(shared: Shared) -> None:
    assert shared.returncode == 1, shared.output
    shared.lines.fnmatch_lines(["*3 failed, 2 passed*"])
    # After its VM was kept, the next test got a fresh one.
    shared.lines.fnmatch_lines(["E * AssertionError: second-failure"])
    shared.lines.no_fnmatch_line("E * AssertionError: the kept VM was reused")


@pytest.mark.integration
def test_header_in_a_real_session(shared: Shared) -> None:
    shared.lines.fnmatch_lines(
        [
            "gondolin: image bookworm-*, warm snapshot: *; cache *",
            "gondolin: accel * (*)",
        ]
    )


@pytest.mark.integration
def test_verbose_output_names_guest_tests(shared: Shared) -> None:
    shared.lines.fnmatch_lines(
        [
            "test_shared.py::test_vm_passes PASSED *",
            "test_shared.py::test_guest_passes PASSED (in guest)*",
            "test_shared.py::test_guest_fails FAILED (in guest)*",
        ]
    )
    shared.lines.no_fnmatch_line("*test_vm_passes PASSED (in guest)*")


@pytest.mark.integration
def test_junitxml_is_unchanged(shared: Shared) -> None:
    suite = ET.parse(shared.root / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("5", "3")
    failed = sorted(
        str(c.get("name")) for c in suite.iter("testcase") if c.find("failure") is not None
    )
    assert failed == sorted(FAILING)


@pytest.mark.integration
def test_artifacts_written_and_named_in_the_report(shared: Shared) -> None:
    named = shared.sections("gondolin: artifacts")
    assert sorted(named) == sorted(FAILING)
    arts = shared.root / "arts"
    assert sorted(p.name.rsplit("-", 1)[0] for p in arts.iterdir()) == sorted(
        f"test_shared.py_{t}" for t in FAILING
    )
    for test, line in named.items():
        folder = Path(line.split("  (", 1)[0])
        assert folder.parent == arts, line
        files = {p.name for p in folder.iterdir()}
        assert {"console.log", "qemu.log", "vm.json"} <= files, (test, files)
        info = json.loads((folder / "vm.json").read_text())
        assert info["test"] == f"test_shared.py::{test}"
        assert info["image"].startswith("bookworm-")
        if "traffic.json" in files:
            assert "exchanges" in json.loads((folder / "traffic.json").read_text())


@pytest.mark.integration
def test_keep_vm_then_ps_attach_kill_and_next_run_reaps(shared: Shared) -> None:
    kept = shared.sections("gondolin: kept VM")
    assert sorted(kept) == sorted(KEPT), shared.output
    ids: dict[str, str] = {}
    for test, line in kept.items():
        m = re.search(r"gondolin attach ([0-9a-f]{8})", line)
        assert m, line
        ids[test] = m[1]
    shared.lines.fnmatch_lines(  # the terminal summary repeats how to reach them
        [f"kept VM {ids[test]} of test_shared.py::{test}: `gondolin attach *" for test in KEPT]
    )

    ps = shared.gondolin("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    listed = {entry["id"]: entry for entry in json.loads(ps.stdout)}
    assert set(listed) == set(ids.values())
    for test, ident in ids.items():
        assert listed[ident]["running"] is True
        assert listed[ident]["kept"]["nodeid"] == f"test_shared.py::{test}"
    table = shared.gondolin("ps")
    assert ids[KEPT[0]] in table.stdout and "running" in table.stdout

    # The VM is as the failing test left it, pytest long gone.
    first = ids[KEPT[0]]
    one = shared.gondolin("attach", first[:5], "--", "cat", "/root/marker")
    assert (one.returncode, one.stdout) == (0, "kept-state\n"), one.stderr
    code = shared.gondolin("attach", first, "--", "sh", "-c", "exit 7")
    assert code.returncode == 7
    shell = shared.gondolin("attach", first, stdin="cat /root/marker\nfalse\n")
    assert shell.returncode == 0, shell.stderr
    assert "kept-state" in shell.stdout and "[exit 1]" in shell.stderr

    # kill stops exactly that VM.
    pid = listed[first]["qemu_pid"]
    killed = shared.gondolin("kill", first)
    assert killed.returncode == 0 and f"{first}: killed" in killed.stdout
    assert not Path(listed[first]["rundir"]).exists()
    assert not _process_runs(pid, listed[first]["rundir"])
    left = json.loads(shared.gondolin("ps", "--json").stdout)
    assert [e["id"] for e in left] == [ids[KEPT[1]]]
    gone = shared.gondolin("attach", first, "--", "true")
    assert gone.returncode == 2 and "gondolin: error: no kept VM" in gone.stderr

    # The next pytest run removes the rest (here: --lf, which must still find the failures).
    second = listed[ids[KEPT[1]]]
    lf = shared.pytest("--lf", "--co", "-q")
    assert sorted(line for line in lf.stdout.splitlines() if "::" in line) == sorted(
        f"test_shared.py::{t}" for t in FAILING
    )
    assert json.loads(shared.gondolin("ps", "--json").stdout) == []
    assert not _process_runs(second["qemu_pid"], second["rundir"])


def _process_runs(pid: int, rundir: str, wait: float = 5.0) -> bool:
    """True if ``pid`` still runs QEMU for ``rundir`` after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if rundir.encode() not in cmdline:
            return False
        time.sleep(0.05)
    return True
