"""``system_packages`` per test: ``@pytest.mark.sandboxed(system_packages=...)`` and
``vm_factory(system_packages=...)`` add Debian packages to the session's
``gondolin_system_packages`` for that guest only (issue 12, item 3).

The keys and validation are checked as values; then one real inner session
(real QEMU, Debian's archive through the host) shows a marked sandboxed test
and a factory VM with ``less``, next to a plain sandboxed test and a plain
factory VM without it (the negative controls). The ``less`` layer is cached
in the shared cache like any other, so only the first run builds it.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from pytest_gondolin.config import Settings
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import GuestKey
from pytest_gondolin.sandbox.options import options_from_marks
from tests.plugin.test_sandboxed import INNER_TIMEOUT

pytest_plugins = ("pytester",)

SETTINGS = Settings(
    accel="tcg",
    image="debian",
    memory_mib=256,
    cpus=1,
    boot_timeout=60.0,
    timeout=30.0,
    keep_vm=False,
    record_mode="none",
    artifacts=None,
    system_packages=("git",),
)


def guest(**kwargs: object) -> GuestKey:
    marks = [pytest.mark.sandboxed(**kwargs).mark]
    return options_from_marks(marks, SETTINGS, nodeid="test_m.py::test_f").guest


def test_a_markers_packages_add_to_the_sessions_as_a_guest_of_their_own() -> None:
    assert guest().system_packages == ("git",)
    assert guest(system_packages=["less", "git"]).system_packages == ("git", "less")
    assert guest(system_packages="less,curl").system_packages == ("curl", "git", "less")
    # Another package set is another guest (its own layer, worker and snapshot).
    assert guest(system_packages="less") != guest()
    assert guest(system_packages="git") == guest()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("less,-oAPT::x=1", "'-oAPT::x=1' is not a Debian package name"),
        (["less", 5], "expected Debian package names"),
        ({"less": 1}, "expected Debian package names"),
    ],
)
def test_a_bad_package_is_named_with_where_it_came_from(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as info:
        guest(system_packages=value)
    assert "test_m.py::test_f: sandboxed(system_packages=...)" in str(info.value)
    with pytest.raises(ConfigError, match=re.escape("vm_factory(system_packages=...)")):
        GuestKey.from_options(SETTINGS, system_packages=value)


TESTS = """
import shutil
import subprocess

import pytest


@pytest.mark.sandboxed(system_packages=["less"])
def test_marked_has_less():
    out = subprocess.run(["less", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("less ")


@pytest.mark.sandboxed
def test_plain_has_no_less():
    assert shutil.which("less") is None


def test_factory_vm_with_less(vm_factory):
    assert vm_factory(system_packages="less").exec("command -v less").stdout.strip() == (
        "/usr/bin/less"
    )


def test_factory_vm_without_less(vm_factory):
    assert vm_factory().exec("command -v less || echo missing").stdout.strip() == "missing"
"""


@pytest.mark.integration
def test_only_the_guests_that_ask_get_the_packages(inner: pytest.Pytester) -> None:
    inner.makeini("[pytest]\ngondolin_host_environment = off\n")
    inner.makepyfile(test_tools=textwrap.dedent(TESTS))
    result = inner.runpytest_subprocess(
        "-p", "gondolin", "-p", "no:cacheprovider", "-v", timeout=INNER_TIMEOUT
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_marked_has_less PASSED (in guest)*"])
    result.stdout.fnmatch_lines(["*test_plain_has_no_less PASSED (in guest)*"])
