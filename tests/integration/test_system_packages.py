"""``gondolin_system_packages`` in real guests: installed once into a cached layer (issue 12, item 3).

The inner sessions run in a cache of their own (sharing the real image,
CA and warm snapshot), so the first one really builds the layer: apt in
the guest, through the host's archive-only network policy (~35-60 s
under TCG). The host environment is off to keep the other layer small.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from pytest_gondolin import paths
from tests.plugin.test_sandboxed import INNER_TIMEOUT, _inner_env_changes

_TESTS = """
import subprocess

import pytest


@pytest.mark.sandboxed
def test_less_in_a_sandboxed_test():
    out = subprocess.run(["less", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("less ")


def test_less_in_the_vm_fixture(vm):
    result = vm.exec("less --version")
    assert result.returncode == 0, result.stderr
    assert vm.http.requests == []  # the layer's apt traffic is not this test's


def test_less_in_a_factory_vm(vm_factory):
    assert vm_factory().exec("command -v less").stdout.strip() == "/usr/bin/less"
"""


@pytest.fixture(scope="module")
def real_cache() -> Path:
    return paths.cache_dir()


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory, real_cache: Path) -> Path:
    """A cache shared by this module's runs: the real image, CA and warm snapshots, no layers."""
    cache = tmp_path_factory.mktemp("syspkg") / "cache"
    cache.mkdir()
    (cache / "images").symlink_to(real_cache / "images")
    shutil.copytree(real_cache / "ca", cache / "ca")
    (cache / "snapshots").mkdir()
    for snap in (real_cache / "snapshots").glob("*.qcow2"):
        if "+" not in snap.name:
            (cache / "snapshots" / snap.name).symlink_to(snap)
    return cache


@pytest.fixture
def project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, private_cache: Path
) -> pytest.Pytester:
    for name, value in _inner_env_changes(private_cache).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    pytester.makeini(
        """
        [pytest]
        gondolin_system_packages = less
        gondolin_host_environment = off
        """
    )
    pytester.makepyfile(test_tools=textwrap.dedent(_TESTS))
    return pytester


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=INNER_TIMEOUT)


def _built_seconds(output: str) -> list[float]:
    return [float(s) for s in re.findall(r"layer system-packages built in ([\d.]+) s", output)]


def test_a_package_is_installed_once_and_reused(project: pytest.Pytester) -> None:
    first = _run(project, "-v")
    first.assert_outcomes(passed=3)
    out = first.stdout.str()
    assert len(_built_seconds(out)) == 1, out  # built once, though three kinds of VM use it

    second = _run(project, "-v")
    second.assert_outcomes(passed=3)
    out = second.stdout.str()
    assert _built_seconds(out) == [], out
    assert re.search(r"restored from the cached ready snapshot with \d layer\(s\)", out), out


def test_without_the_option_the_tool_is_missing(project: pytest.Pytester) -> None:
    """Negative control: the image itself has no ``less``."""
    result = _run(project, "-v", "--gondolin-system-packages=", "-k", "sandboxed or vm_fixture")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*No such file or directory*less*"])


def test_an_unknown_package_fails_early_naming_it(
    project: pytest.Pytester, private_cache: Path
) -> None:
    before = sorted((private_cache / "snapshots").glob("*+*.qcow2"))
    result = _run(project, "-v", "--gondolin-system-packages=less,no-such-package-gondolin", "-x")
    outcomes = result.parseoutcomes()
    assert "passed" not in outcomes, outcomes
    result.stdout.fnmatch_lines(
        ["*system package 'no-such-package-gondolin'*Unable to locate package*"]
    )
    # No layered snapshot written, nothing half-written left (a new warm
    # snapshot may appear: the base state is not the failing layer's).
    assert sorted((private_cache / "snapshots").glob("*+*.qcow2")) == before
    assert not list((private_cache / "snapshots").glob(".*.tmp"))


def test_a_bad_package_name_is_a_usage_error(project: pytest.Pytester) -> None:
    result = _run(project, "--gondolin-system-packages=less,-oAPT::x=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'-oAPT::x=1' is not a Debian package name*"])
