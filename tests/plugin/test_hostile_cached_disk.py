"""What a test writes to its guest's disk must not stay in the host's worker cache.

A one-test session keeps its VM's disk as the cached collected worker
(``sandbox/worker_disk.py``): the first run's own disk when it closes, a
taken file given back after a re-run, a previous tree's file after an edit.
The test ran on that very file, so what it wrote sits in the file's current
state: the next run's ``loadvm`` drops it from the guest's view, but the
clusters stayed allocated in the cached file (measured: a test writing 1 GiB
left a 1.35 GB file where 0.3 GB is normal, after every re-run), with the
test's bytes on the host's disk until the file is evicted -- up to the
guest's 4 GiB disk per cached file (red team round 3). Now the file is put
back to its worker snapshot (what the next run loads anyway) before it is
kept, so the cache holds none of it.

The test writes a marker the host can search for (made in the guest from a
seed, so the project's sources never hold it), in all three ways a file is
kept; the control is the guest reading its own file back before the end.
"""

from __future__ import annotations

import hashlib

import pytest

from pytest_gondolin.sandbox import collected_files, guest_worker, worker_disk
from tests.plugin.test_rerun_cache import RESTORED, worker_cache_of_our_own
from tests.plugin.test_sandboxed import run_gondolin

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

__all__ = ["worker_cache_of_our_own"]  # the fixture: a worker cache of this test's own

SEED = b"red team round 3: the cached disk"
MARKER = hashlib.sha256(SEED).digest()
#: What the test writes to its guest's disk.
FILL_MIB = 64

WRITER = f"""
    import hashlib
    import os

    import pytest

    VERSION = {{version}}


    @pytest.mark.sandboxed(timeout=300)
    def test_writes_to_its_disk():
        chunk = hashlib.sha256({SEED!r}).digest() * (1 << 15)  # 1 MiB
        path = "/var/lib/written-by-the-test"  # on the guest's disk (ext4)
        with open(path, "wb") as fh:
            for _ in range({FILL_MIB}):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "rb") as fh:  # control: it is there
            assert fh.read(len(chunk)) == chunk
"""


def _holding_the_marker() -> list[str]:
    """The cached files (taken ones too) whose bytes hold the test's marker."""
    found = []
    for path in sorted(collected_files.collected_dir().glob("*.qcow2*")):
        tail = b""
        with path.open("rb") as fh:
            while chunk := fh.read(4 << 20):
                if MARKER in tail + chunk:
                    found.append(f"{path.name} ({path.stat().st_blocks * 512 >> 20} MiB)")
                    break
                tail = chunk[-len(MARKER) :]
    return found


def test_a_test_s_disk_writes_stay_out_of_the_worker_cache(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_x=WRITER.format(version=1))
    # The first run: its VM's own disk is kept when it closes.
    run_gondolin(inner).assert_outcomes(passed=1)
    assert len(list(collected_files.collected_dir().glob("*.qcow2"))) == 1
    assert _holding_the_marker() == []
    # A re-run: the cached file, taken and run in place, is given back.
    again = run_gondolin(inner)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])
    assert _holding_the_marker() == []
    # An edit: the previous tree's file, run in place, is given back under the new key.
    inner.makepyfile(test_x=WRITER.format(version=2))
    edited = run_gondolin(inner)
    edited.assert_outcomes(passed=1)
    assert "in place from a previous tree" in edited.stdout.str() + edited.stderr.str()
    assert _holding_the_marker() == []


def test_the_kept_tag_is_the_worker_s() -> None:
    assert worker_disk.KEPT_TAG == guest_worker.WORKER_TAG
