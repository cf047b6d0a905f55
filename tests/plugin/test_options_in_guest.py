"""pytest's options for sandboxed tests: real inner pytest runs against real QEMU guests.

One shared inner session (module scope: each session pays for a VM, the
project copy and the guest worker's start-up) runs three sandboxed tests
with ``-s --setup-show --durations=0 --pdb -rA`` and pytest-randomly's
``--randomly-seed=1234``; its output is read line by line as it arrives,
each line stamped with the time it reached us, so "live" is measured, not
assumed. Each behaviour is then asserted by its own small test:

* ``-s``: a sandboxed test's stdout/stderr reach the terminal while it runs,
  with the guest's control characters made visible;
* ``--setup-show``: the guest's SETUP/TEARDOWN lines, session fixtures
  around every sandboxed test;
* ``--durations``: the worker's start-up is in the first sandboxed test's setup;
* ``--pdb``: said up front that it does not enter sandboxed tests; their
  failures are reported as usual and the run ends (no hang, no debugger);
* ``--randomly-seed``: a sandboxed test draws the same ``random`` values as
  the same test run on the host with that seed, and others with another seed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.plugin.test_sandboxed import INNER_TIMEOUT, _inner_env_changes

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration

INI = """
[pytest]
gondolin_host_environment = true
"""

TESTS = r"""
import os
import random
import sys
import time

import pytest

ON_HOST = os.environ.get("OPTS_ON_HOST") == "1"
sandboxed = (lambda f: f) if ON_HOST else pytest.mark.sandboxed


@pytest.fixture
def resource():
    yield "r"


@pytest.fixture(scope="session")
def session_resource():
    yield "s"


@sandboxed
def test_live():
    print("LIVE-BEFORE", flush=True)
    sys.stderr.write("LIVE-ERR \x1b]0;pwned\x07\n")
    sys.stderr.flush()
    time.sleep(6)
    print("LIVE-AFTER", flush=True)


@sandboxed
def test_random(resource, session_resource):
    print(f"RANDOM {random.random()!r} {random.randint(0, 10**9)}")


@sandboxed
def test_fails(session_resource):
    assert 1 + 1 == 3, "SANDBOXED-FAILURE"
"""

#: The seed every run below uses (and one more for the negative control).
SEED = 1234
OTHER_SEED = 99


@dataclass(frozen=True)
class TimedRun:
    result: pytest.RunResult
    #: (seconds since the start, line) for every line of stdout and stderr, merged.
    lines: tuple[tuple[float, str], ...]

    def first(self, needle: str) -> float:
        """When the first line containing ``needle`` arrived."""
        for stamp, line in self.lines:
            if needle in line:
                return stamp
        raise AssertionError(f"{needle!r} not in the output:\n{self.result.stdout.str()}")


def run_timed(root: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> TimedRun:
    """Run pytest in ``root`` as pytester would, stamping each output line as it arrives."""
    environ = dict(os.environ)
    for name, value in _inner_env_changes(cache).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    environ.update(env or {}, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-mpytest", f"--basetemp={root / 'basetemp'}", "-p", "gondolin", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=root,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    lines: list[tuple[float, str]] = []
    try:
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
            if time.monotonic() - started > INNER_TIMEOUT:
                raise AssertionError(f"inner run took over {INNER_TIMEOUT} s")
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    text = [line for _, line in lines]
    return TimedRun(pytest.RunResult(code, text, [], time.monotonic() - started), tuple(lines))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("options")
    (root / "pytest.ini").write_text(textwrap.dedent(INI).lstrip())
    (root / "test_opts.py").write_text(TESTS)
    return root


@pytest.fixture(scope="module")
def shared(project: Path, gondolin_cache: Path) -> TimedRun:
    return run_timed(
        project,
        gondolin_cache,
        "-p",
        "randomly",
        f"--randomly-seed={SEED}",
        "-s",
        "-v",
        "-rA",
        "--setup-show",
        "--durations=0",
        "--pdb",
    )


@pytest.fixture(scope="module")
def gondolin_cache() -> Path:
    from pytest_gondolin import paths

    return paths.cache_dir()


def test_the_shared_session_ran_every_test(shared: TimedRun) -> None:
    shared.result.assert_outcomes(passed=2, failed=1)
    out = shared.result.stdout.str()
    assert "INTERNALERROR" not in out
    for name, status in (("live", "PASSED"), ("random", "PASSED"), ("fails", "FAILED")):
        assert re.search(rf"test_opts\.py::test_{name} .*{status} \(in guest\)", out), out


def test_s_streams_output_while_the_test_runs(shared: TimedRun) -> None:
    before, after = shared.first("LIVE-BEFORE"), shared.first("LIVE-AFTER")
    # The test sleeps 6 s between the two prints: the first was shown during the run.
    assert after - before >= 4.0, shared.lines
    assert shared.first("test_opts.py::test_live PASSED") >= after


def test_s_shows_the_guests_control_characters_harmlessly(shared: TimedRun) -> None:
    out = shared.result.stdout.str()
    assert "LIVE-ERR ^[]0;pwned^G" in out
    assert "\x1b]0;pwned" not in out


def test_setup_show_shows_the_guests_fixture_lines(shared: TimedRun) -> None:
    shared.result.stdout.fnmatch_lines(
        [
            "*SETUP    F resource*",
            "*test_opts.py::test_random (fixtures used: *resource*)*",
            "*TEARDOWN F resource*",
        ]
    )


def test_session_fixtures_are_set_up_around_every_sandboxed_test(shared: TimedRun) -> None:
    # Each sandboxed test starts from the snapshot taken after collection: a
    # session-scoped fixture is set up and torn down in each test that uses it.
    out = shared.result.stdout.str()
    assert out.count("SETUP    S session_resource") == 2, out
    assert out.count("TEARDOWN S session_resource") == 2, out


def test_durations_count_the_worker_start_up_in_the_first_setup(shared: TimedRun) -> None:
    out = shared.result.stdout.str()
    setups = [
        float(m[1]) for m in re.finditer(r"^(\d+\.\d+)s setup\s+test_opts\.py::test_\w+", out, re.M)
    ]
    assert len(setups) == 3, out
    # The first sandboxed test paid for the VM, the copy and the guest's collection.
    assert max(setups) >= 3.0, out
    assert sorted(setups)[1] < 3.0, out
    assert "gondolin: start-up" in out
    shared.result.stdout.fnmatch_lines(["*s of this setup were the guest worker's start-up*"])


def test_pdb_says_up_front_that_it_does_not_enter_sandboxed_tests(shared: TimedRun) -> None:
    notice = shared.first("--pdb does not enter sandboxed tests (3 here)")
    assert notice < shared.first("test_opts.py::test_"), "the notice comes before any test"
    out = shared.result.stdout.str()
    assert "SANDBOXED-FAILURE" in out
    assert "(Pdb)" not in out and "PDB post_mortem" not in out


def random_line(run: TimedRun) -> str:
    """The ``RANDOM <float> <int>`` that ``test_random`` printed."""
    found = re.findall(r"RANDOM \S+ \d+", run.result.stdout.str())
    assert len(found) == 1, run.result.stdout.str()
    return str(found[0])


def test_randomly_seed_reproduces_in_the_guest_as_on_the_host(
    shared: TimedRun, project: Path, gondolin_cache: Path
) -> None:
    on_host = {"OPTS_ON_HOST": "1"}
    args = ("-p", "randomly", "-s", "-k", "test_random")
    host = run_timed(project, gondolin_cache, *args, f"--randomly-seed={SEED}", env=on_host)
    other = run_timed(project, gondolin_cache, *args, f"--randomly-seed={OTHER_SEED}", env=on_host)
    host.result.assert_outcomes(passed=1)
    assert random_line(shared) == random_line(host)
    assert random_line(other) != random_line(host)  # negative control: the seed matters
