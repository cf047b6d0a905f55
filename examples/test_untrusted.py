"""Untrusted code runs in a disposable guest: it can wreck the guest, never the host.

Run with ``make demo`` (or ``pytest -p gondolin examples -v``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("PYTEST_GONDOLIN_WORKER") == "1"
# The destructive examples refuse to run anywhere but inside a guest.
guest_only = pytest.mark.skipif(
    not IN_GUEST, reason="destructive: only ever run inside a gondolin guest"
)

pytestmark = pytest.mark.sandboxed


def test_runs_in_a_linux_guest() -> None:
    assert os.uname().nodename == "gondolin"
    assert Path("/run/gondolin").is_dir()


@guest_only
def test_untrusted_code_wrecks_the_guest() -> None:
    # "Untrusted" code deleting system files: only the guest's copy-on-write disk changes.
    subprocess.run(["rm", "-rf", "/etc/apt", "/usr/share/zoneinfo", "/usr/bin/curl"], check=True)
    assert not Path("/usr/bin/curl").exists()


@guest_only
def test_next_test_gets_a_clean_guest() -> None:
    # Restored from the clean snapshot: the previous test's damage is gone.
    assert Path("/etc/apt").is_dir()
    assert Path("/usr/share/zoneinfo").is_dir()
    assert Path("/usr/bin/curl").exists()


def test_no_network_unless_allowed() -> None:
    # Deny by default: the guest's only peer is the host, which answers nothing here.
    import urllib.error
    import urllib.request

    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen("http://example.org/", timeout=5)
