"""A cache folder that cannot be written fails only the tests that need a VM, each with one message.

Real inner pytest runs whose cache cannot be written: a home folder that
cannot hold one (``HOME=/nonexistent``), an empty read-only
``GONDOLIN_CACHE_DIR``, and a complete read-only cache, which still runs
VMs. Root writes through any mode bits, so as root the folder is
bind-mounted read-only in a private mount namespace (``unshare``), what a
read-only volume is; as another user its write bits are cleared for the
run. The failing runs need no QEMU: they stop before any boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.image.info import image_status

pytest_plugins = ("pytester",)

#: The failing runs stop before any boot (Python start-up and collection);
#: the complete-cache run restores a VM, and its warm-up may boot one cold.
INNER_TIMEOUT = 300.0

PROJECT = {
    "test_plain": """
        def test_plain():
            assert 1 + 1 == 2
    """,
    "test_vms": """
        import pytest

        def test_vm(vm):
            pass

        def test_factory(vm_factory):
            vm_factory()

        @pytest.mark.sandboxed
        def test_sandboxed():
            pass
    """,
}
VM_TESTS = ("test_vm", "test_factory", "test_sandboxed")


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    return paths.cache_dir()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def run_read_only(pytester: pytest.Pytester, folder: Path, *args: str) -> pytest.RunResult:
    """Run the inner pytest (the gondolin plugin, ``args``) with ``folder`` read-only for it."""
    inner = [sys.executable, "-m", "pytest", "-p", "gondolin", "-p", "no:cacheprovider", *args]
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            return pytester.run(*inner, timeout=INNER_TIMEOUT)
        finally:
            folder.chmod(mode)
    if not _can_unshare():
        pytest.skip("root writes through mode bits, and no mount namespace for a read-only mount")
    mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return pytester.run(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(folder), *inner,
        timeout=INNER_TIMEOUT,
    )  # fmt: skip


def _assert_only_vm_tests_fail(result: pytest.RunResult, message: str) -> None:
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output, output
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1, output  # the plain test ran
    assert outcomes.get("errors", 0) + outcomes.get("failed", 0) == len(VM_TESTS), output
    # Each VM test: its heading, then the message alone (no traceback, no chain).
    lines = result.outlines
    for test in VM_TESTS:
        heading = next(i for i, line in enumerate(lines) if line.strip("_ ").endswith(test))
        assert message in lines[heading + 1], lines[heading : heading + 3]
        assert "GONDOLIN_CACHE_DIR" in lines[heading + 1]
        assert lines[heading + 2].startswith(("___", "===")), lines[heading : heading + 4]
    assert "Traceback" not in output and "During handling" not in output, output


def test_a_home_that_cannot_hold_the_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HOME=/nonexistent``: the header names the folder, plain tests pass, VM tests fail."""
    locked = pytester.mkdir("locked")
    home = locked / "nonexistent"
    monkeypatch.delenv("GONDOLIN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GONDOLIN_ACCEL", "tcg")
    monkeypatch.setenv("COLUMNS", "300")
    pytester.makepyfile(**PROJECT)
    result = run_read_only(pytester, locked, "-rfE")
    cache = home / ".cache" / "pytest-gondolin"
    result.stdout.fnmatch_lines(
        [f"gondolin: image *; cache {cache} cannot be created (*): tests that need a VM will fail*"]
    )
    _assert_only_vm_tests_fail(
        result, f"the pytest-gondolin cache folder {cache} cannot be created"
    )
    assert not home.exists()


def test_a_read_only_cache_folder_without_an_image(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty read-only ``GONDOLIN_CACHE_DIR``: the image cannot be built there."""
    cache = pytester.mkdir("cache")
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(cache))
    monkeypatch.setenv("GONDOLIN_ACCEL", "tcg")
    monkeypatch.setenv("COLUMNS", "300")
    pytester.makepyfile(**PROJECT)
    result = run_read_only(pytester, cache, "-rfE")
    result.stdout.fnmatch_lines([f"gondolin: image *; cache {cache} (is read-only: *)"])
    _assert_only_vm_tests_fail(
        result, f"the pytest-gondolin cache folder {cache} cannot be written"
    )
    result.stdout.fnmatch_lines(
        ["*, and image bookworm-* must be built there; set GONDOLIN_CACHE_DIR*"]
    )
    assert list(cache.iterdir()) == []


@pytest.mark.integration
def test_a_read_only_complete_cache_still_runs_vms(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    gondolin_cache: Path,
) -> None:
    """Image, boot files, CA and warm snapshot in a read-only cache: VMs start, nothing is written."""
    if os.geteuid() != 0:
        pytest.skip("making the shared cache read-only needs a mount namespace (root)")
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(gondolin_cache))
    if not image_status("bookworm").built:
        pytest.skip("the guest image is not built (gondolin image build)")
    # A runtime folder of its own (short: socket paths) to find the lock in.
    runtime = Path(tempfile.mkdtemp(prefix="gro-"))
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    pytester.makepyfile(
        test_net="""
            def test_vm(vm):
                assert vm.exec("echo ok").stdout == "ok\\n"
        """
    )
    # With the cache writable first: the boot files and snapshot of this exact code.
    warm = pytester.runpytest_subprocess("-p", "gondolin", timeout=INNER_TIMEOUT)
    warm.assert_outcomes(passed=1)
    result = run_read_only(pytester, gondolin_cache, "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"gondolin: image *, warm snapshot: yes; cache {gondolin_cache} (is read-only: *)",
            "gondolin: vm1 restored from the cached ready snapshot*",
        ]
    )
    # Its warm-snapshot lock was held in the runtime folder instead.
    assert list(runtime.glob("gondolin-*/cache-locks/*.lock"))
