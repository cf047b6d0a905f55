"""One module for host-side VM tests and sandboxed tests; guest errors say so (issue 12, item 4).

One inner session against real QEMU (a VM for the host-side test, a guest
worker for the sandboxed ones: ~40 s under TCG). The guest imports the same
test module and conftest as the host, so every public name of
``pytest_gondolin`` must import there, at the top level: the values are
real, the host-only classes refuse to be used with an error that says so.
A module that fails to import only in the guest reports a collection error
headed ``in the guest:``. ``tests/unit/test_guest_boundary.py`` checks the
same names in the unpacked payload, without a VM.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.plugin.test_sandboxed import run_gondolin

pytestmark = pytest.mark.integration

CONFTEST = """
from pytest_gondolin import VM, Checkpoint, ExecResult, GondolinError, Secret, Snapshot
from pytest_gondolin.errors import ConfigError, ExecError

CONFTEST_SECRETS = {"C": Secret(value="from-conftest", hosts=["conf.test"])}
"""

TEST_MIXED = """
import os

import pytest

from pytest_gondolin import VM, Checkpoint, GondolinError, Secret
from pytest_gondolin.errors import ExecError, HostOnlyError

SECRETS = {"API_TOKEN": Secret(value="s3cret", hosts=["api.test"])}


def test_host_side_vm_with_a_secret(vm_factory):
    vm = vm_factory(secrets=SECRETS)
    assert isinstance(vm, VM)
    assert vm.exec("echo -n $API_TOKEN").stdout.startswith("GONDOLIN_SECRET_API_TOKEN_")


@pytest.mark.sandboxed
def test_names_import_in_the_guest():
    from conftest import CONFTEST_SECRETS

    assert os.uname().nodename == "gondolin"
    assert issubclass(ExecError, GondolinError)
    assert SECRETS["API_TOKEN"].hosts == ("api.test",)
    assert "s3cret" not in repr(SECRETS["API_TOKEN"])
    assert CONFTEST_SECRETS["C"].value == "from-conftest"


@pytest.mark.sandboxed
def test_checkpoint_load_is_host_side():
    with pytest.raises(HostOnlyError, match="Checkpoint.load is host-side"):
        Checkpoint.load("/tmp/x.ckpt")


@pytest.mark.sandboxed
def test_making_a_vm_in_the_guest():
    VM()
"""

TEST_GUEST_ONLY_IMPORT_ERROR = """
import os

import pytest

if os.uname().nodename == "gondolin":
    raise ImportError("guestonlydep is not installed here")


@pytest.mark.sandboxed
def test_never_runs():
    pass
"""


def test_public_names_in_the_guest_and_guest_collection_errors(inner: pytest.Pytester) -> None:
    inner.makeconftest(CONFTEST)
    inner.makepyfile(test_mixed=TEST_MIXED, test_guestonly=TEST_GUEST_ONLY_IMPORT_ERROR)
    result = run_gondolin(inner, "-rfE", "--junitxml=junit.xml")
    # The collection error, and the item the guest could not collect because of it.
    result.assert_outcomes(passed=3, failed=1, errors=2)

    # Making a host-only object in the guest: a clear error, not an ImportError.
    result.stdout.fnmatch_lines(
        [
            "*_ test_making_a_vm_in_the_guest _*",
            "*HostOnlyError: pytest_gondolin.VM is host-side (it boots and drives a VM from the "
            "host) and cannot be used inside the guest*use it from a test that is not sandboxed",
        ]
    )

    # A module that imports on the host but not in the guest says where it failed.
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR collecting test_guestonly.py _*",
            "in the guest: ImportError while importing test module *test_guestonly.py*",
            "*ImportError: guestonlydep is not installed here",
        ]
    )
    result.stdout.fnmatch_lines(
        ["ERROR test_guestonly.py - in the guest: ImportError while importing test module*"]
    )
    suite = ET.parse(inner.path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    errors = [
        error.text or ""
        for case in suite.iter("testcase")
        if case.get("classname") == "" and case.get("name") == "test_guestonly"
        for error in case.iter("error")
    ]
    assert len(errors) == 1 and errors[0].startswith("in the guest: ImportError"), errors
