"""The plugin table of docs/plugins.md, row by row: each plugin active in a real inner
session whose sandboxed tests use it in a real QEMU guest.

One shared session (module scope: a session pays for a VM, the project copy
and the guest worker's start-up) runs with pytest-httpx, pytest-recording,
pytest-benchmark, pytest-mock and hypothesis autoloaded on the host -- as a
user who installed them has them -- and the host's environment carried into
the guest. Each row is then asserted by its own small test. Every sandboxed
test here also fails when its plugin is not loaded in the guest (its
fixture or marker is unknown there, or its interception is missing).

A second session gives the plugins' and a conftest's own options on the
command line and in ``PYTEST_ADDOPTS``; each of its sandboxed tests fails
unless its option reached the guest as given (pytest-asyncio's strict mode
refuses the unmarked coroutine, the others assert the value).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import inner_env_changes
from tests.plugin.test_sandboxed import INNER_TIMEOUT

pytestmark = pytest.mark.integration

TESTS = r"""
import os
import urllib.request

import pytest


def in_guest():
    return os.environ.get("GONDOLIN_GUEST") == "1"


# pytest-httpx ------------------------------------------------------------------

@pytest.mark.sandboxed
def test_httpx_mock_answers_in_the_guest(httpx_mock):
    import httpx

    httpx_mock.add_response(url="https://api.example.invalid/v1", json={"from": "the mock"})
    assert httpx.get("https://api.example.invalid/v1").json() == {"from": "the mock"}
    assert in_guest()


@pytest.mark.sandboxed
@pytest.mark.httpx_mock(assert_all_requests_were_expected=False)
def test_httpx_unmocked_request_is_refused_by_the_mock(httpx_mock):
    import httpx

    # pytest-httpx, not the network (none here), refuses it: its own exception and words.
    with pytest.raises(httpx.TimeoutException, match="No response can be found"):
        httpx.get("https://elsewhere.example.invalid/")
    assert in_guest()


# pytest-recording (VCR.py) -------------------------------------------------------

@pytest.mark.sandboxed
@pytest.mark.vcr
def test_vcr_replays_the_cassette():
    # cassettes/test_table/test_vcr_replays_the_cassette.yaml, copied in with the project.
    with urllib.request.urlopen("http://data.example.invalid/item") as response:
        assert response.read() == b"REPLAYED-FROM-CASSETTE"
    assert in_guest()


@pytest.mark.sandboxed
@pytest.mark.vcr
def test_vcr_refuses_what_the_cassette_lacks():
    from vcr.errors import CannotOverwriteExistingCassetteException

    with pytest.raises(CannotOverwriteExistingCassetteException):
        urllib.request.urlopen("http://data.example.invalid/not-recorded")


# pytest-benchmark ----------------------------------------------------------------

@pytest.mark.sandboxed
def test_benchmark_runs_in_the_guest(benchmark):
    assert benchmark(sum, range(1000)) == 499500
    assert in_guest()
    print("BENCHMARK-ROUNDS", benchmark.stats.stats.rounds)


# pytest-mock ---------------------------------------------------------------------

@pytest.mark.sandboxed
def test_mocker_patches_and_spies_in_the_guest(mocker):
    import platform

    mocker.patch("platform.node", return_value="mocked-node")
    spy = mocker.spy(os.path, "join")
    assert platform.node() == "mocked-node"
    assert os.path.join("a", "b") == "a/b"
    spy.assert_called_once_with("a", "b")
    assert in_guest()


# hypothesis ----------------------------------------------------------------------

from hypothesis import given, settings, strategies as st


@pytest.mark.sandboxed
@settings(max_examples=50, deadline=None, database=None)
@given(st.integers(min_value=0))
def test_hypothesis_given_runs_in_the_guest(n):
    assert n >= 0 and in_guest()


@pytest.mark.sandboxed
@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(min_value=0))
def test_hypothesis_falsifies_and_shrinks_in_the_guest(n):
    assert n < 1000
"""

CASSETTE = """
interactions:
- request:
    body: null
    headers: {}
    method: GET
    uri: http://data.example.invalid/item
  response:
    body:
      string: REPLAYED-FROM-CASSETTE
    headers:
      Content-Type:
      - text/plain
    status:
      code: 200
      message: OK
version: 1
"""

INI = """
[pytest]
gondolin_host_environment = true
"""

#: The plugins of the table, autoloaded on the host (the suite turns them off by default).
PLUGINS = {
    "pytest-httpx": "pytest_httpx",
    "pytest-recording": "recording",
    "pytest-benchmark": "benchmark",
    "pytest-mock": "pytest_mock",
    "hypothesis": "hypothesispytest",
}


@dataclass(frozen=True)
class Session:
    out: str
    returncode: int

    def status(self, name: str) -> str:
        found = re.findall(
            rf"test_table\.py::{name} (PASSED|FAILED|ERROR)( \(in guest\))?", self.out
        )
        assert len(found) == 1, self.out
        status, where = found[0]
        return f"{status}{where}"


def _run_inner(root: Path, cache: Path, addopts: str, *args: str) -> Session:
    """A real inner session in ``root``, the plugins autoloaded, as for a user who installed them."""
    env = dict(os.environ)
    for name, value in inner_env_changes(cache).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["PYTEST_ADDOPTS"] = addopts
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "gondolin",
            "-v",
            "-rA",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )
    return Session(done.stdout + done.stderr, done.returncode)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> Session:
    root = tmp_path_factory.mktemp("plugin_table")
    (root / "pytest.ini").write_text(INI)
    (root / "test_table.py").write_text(textwrap.dedent(TESTS))
    cassettes = root / "cassettes" / "test_table"
    cassettes.mkdir(parents=True)
    (cassettes / "test_vcr_replays_the_cassette.yaml").write_text(CASSETTE.lstrip())
    (cassettes / "test_vcr_refuses_what_the_cassette_lacks.yaml").write_text(CASSETTE.lstrip())
    return _run_inner(root, gondolin_cache, "-p no:randomly -p no:asyncio")


def test_the_plugins_were_active_on_the_host(session: Session) -> None:
    header = re.search(r"^plugins: (.*)$", session.out, re.MULTILINE)
    assert header is not None, session.out
    for distribution in ("httpx", "recording", "benchmark", "mock", "hypothesis"):
        assert distribution in header.group(1), header.group(1)
    assert "INTERNALERROR" not in session.out
    assert "not importable in the guest" not in session.out, session.out


def test_pytest_httpx_mocks_in_the_guest(session: Session) -> None:
    assert session.status("test_httpx_mock_answers_in_the_guest") == "PASSED (in guest)"
    assert session.status("test_httpx_unmocked_request_is_refused_by_the_mock") == (
        "PASSED (in guest)"
    )


def test_pytest_recording_replays_a_cassette_of_the_project_in_the_guest(session: Session) -> None:
    assert session.status("test_vcr_replays_the_cassette") == "PASSED (in guest)"
    assert session.status("test_vcr_refuses_what_the_cassette_lacks") == "PASSED (in guest)"


def test_pytest_benchmark_runs_in_the_guest_and_its_table_stays_there(session: Session) -> None:
    assert session.status("test_benchmark_runs_in_the_guest") == "PASSED (in guest)"
    rounds = re.search(r"BENCHMARK-ROUNDS (\d+)", session.out)
    assert rounds is not None and int(rounds.group(1)) >= 1, session.out
    # The host's pytest-benchmark measured nothing: no table of its own.
    assert not re.search(r"benchmark: \d+ tests?", session.out), session.out


def test_pytest_mock_patches_in_the_guest(session: Session) -> None:
    assert session.status("test_mocker_patches_and_spies_in_the_guest") == "PASSED (in guest)"


def test_hypothesis_runs_falsifies_and_shrinks_in_the_guest(session: Session) -> None:
    assert session.status("test_hypothesis_given_runs_in_the_guest") == "PASSED (in guest)"
    name = "test_hypothesis_falsifies_and_shrinks_in_the_guest"
    assert session.status(name) == "FAILED (in guest)"
    # Shrunk in the guest to the smallest failing example, reported on the host.
    # (each line of the report starts with pytest's "E")
    shrunk = rf"(Falsifying example|Failing test case): {name}\((\s|E)*n=1000,(\s|E)*\)"
    assert re.search(shrunk, session.out), session.out
    assert session.returncode == pytest.ExitCode.TESTS_FAILED


# -- the plugins' command-line options reach the guest, as given ------------------------

OPTIONS_CONFTEST = """
import pytest
from hypothesis import settings

settings.register_profile("tiny", max_examples=3)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="a conftest's own flag")
    parser.addoption("--target", default="dev", help="a conftest's own option with a value")


@pytest.fixture
def target(request):
    return request.config.getoption("--target")
"""

OPTIONS_TESTS = r"""
import os
import socket

import pytest


def in_guest():
    return os.environ.get("GONDOLIN_GUEST") == "1"


@pytest.mark.sandboxed
async def test_asyncio_mode_auto_runs_an_unmarked_coroutine():
    # Only --asyncio-mode=auto (given on the command line) runs an unmarked async test.
    assert in_guest()


@pytest.mark.sandboxed
def test_recording_options(record_mode):
    assert record_mode == "new_episodes" and in_guest()
    # --block-network: pytest-recording's socket guard, not the guest's network, refuses.
    with pytest.raises(RuntimeError, match="Network is disabled"):
        socket.create_connection(("192.0.2.1", 80), timeout=5)


@pytest.mark.sandboxed
def test_benchmark_disable(benchmark):
    assert benchmark(sum, range(10)) == 45
    assert benchmark.disabled and in_guest()


@pytest.mark.sandboxed
def test_hypothesis_profile():
    from hypothesis import settings

    assert settings().max_examples == 3 and in_guest()


@pytest.mark.sandboxed
def test_conftest_options(request, target):
    assert request.config.getoption("--runslow") is True
    assert target == "prod" and in_guest()
"""

#: What the session above is given: on the command line and in PYTEST_ADDOPTS.
GIVEN_ARGS = (
    "--asyncio-mode=auto",
    "--record-mode",
    "new_episodes",
    "--block-network",
    "--hypothesis-profile=tiny",
    "--runslow",
    "--target",
    "prod",
)


@pytest.fixture(scope="module")
def given_options(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> Session:
    root = tmp_path_factory.mktemp("plugin_options")
    (root / "pytest.ini").write_text(INI + "asyncio_default_fixture_loop_scope = function\n")
    (root / "conftest.py").write_text(textwrap.dedent(OPTIONS_CONFTEST))
    (root / "test_table.py").write_text(textwrap.dedent(OPTIONS_TESTS))
    return _run_inner(root, gondolin_cache, "-p no:randomly --benchmark-disable", *GIVEN_ARGS)


@pytest.mark.parametrize(
    "name",
    [
        "test_asyncio_mode_auto_runs_an_unmarked_coroutine",
        "test_recording_options",
        "test_benchmark_disable",
        "test_hypothesis_profile",
        "test_conftest_options",
    ],
)
def test_plugin_options_reach_the_guest_as_given(given_options: Session, name: str) -> None:
    assert "not importable in the guest" not in given_options.out, given_options.out
    assert given_options.status(name) == "PASSED (in guest)"
