"""A sandboxed test runs under the host's own Python (issue 12, item 1), in a real guest.

The inner session's test compares what it sees in the guest with what the
outer pytest (the host) has: version, ``sys.executable``, ``sys.prefix``,
``sys.base_prefix``. Its negative control is the image's own ``python3``,
run from the same test: a different patch release here (3.11.2 against the
host's), so a worker still running under it would fail the comparison.
"""

from __future__ import annotations

import platform
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.sandbox.guest_facts import image_facts
from tests.plugin.test_sandboxed import INNER_TIMEOUT

pytestmark = pytest.mark.integration

_TEST = """
import os
import platform
import subprocess
import sys

import pytest

HOST = {host!r}


@pytest.mark.sandboxed
def test_same_python_as_the_host():
    assert os.environ.get("GONDOLIN_GUEST") == "1"
    assert os.uname().nodename != HOST["nodename"]
    assert list(sys.version_info) == HOST["version_info"]
    assert platform.python_version() == HOST["version"]
    assert sys.executable == HOST["executable"]
    assert sys.prefix == HOST["prefix"]
    assert sys.base_prefix == HOST["base_prefix"]
    assert sys.implementation.cache_tag == HOST["cache_tag"]
    import ssl, sqlite3, ctypes, lzma, bz2, zlib, decimal  # extension modules load
    ctypes.CDLL(None)


@pytest.mark.sandboxed
def test_the_image_python_differs():
    # What the worker ran under before: the image's own python3.
    image = subprocess.run(
        ["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if image == HOST["version"]:
        pytest.skip("the image's Python is the host's release: no negative control here")
    assert image != platform.python_version()
"""


def test_a_sandboxed_test_runs_under_the_hosts_python(inner: pytest.Pytester) -> None:
    host = {
        "version_info": list(sys.version_info),
        "version": platform.python_version(),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "cache_tag": sys.implementation.cache_tag,
        "nodename": platform.node(),
    }
    inner.makepyfile(test_python=textwrap.dedent(_TEST).format(host=host))
    result = inner.runpytest_subprocess("-p", "gondolin", "-v", "-rs", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=2)


def test_an_image_is_asked_once_what_it_offers(vm_factory: VMFactory, tmp_path: Path) -> None:
    """The probe boots (restores) the real image once; its answer is then read from the cache."""
    config = vm_factory.vm_config(vm_factory.guest_key())
    lines: list[str] = []
    facts = image_facts(config, tmp_path, progress=lines.append)
    assert any("what it offers the host's Python" in line for line in lines)
    assert facts.machine == platform.machine()
    assert facts.glibc >= (2, 36)  # bookworm's
    assert facts.python.startswith("3.11.")
    assert {"libc.so.6", "libz.so.1", "libssl.so.3", "libffi.so.8"} <= facts.libraries
    assert (tmp_path / f"guest-{config.image.build_id}.txt").is_file()
    again: list[str] = []
    assert image_facts(config, tmp_path, progress=again.append) == facts
    assert again == []  # no VM this time
