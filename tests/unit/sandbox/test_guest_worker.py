"""The host's verdicts a guest worker adds to a run (``sandbox/guest_worker.py``), no VM.

A cassette miss becomes the outcome's ``host_failure`` (replay turns it
into the failed call report, ``test_replay.py``); a run whose VM died says
so in its ``failure``, with the console's tail.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

from pytest_gondolin.netpolicy.http.cassette import open_cassette
from pytest_gondolin.netpolicy.http.messages import HttpRequest
from pytest_gondolin.sandbox.guest_worker import GuestWorker, _cassette_verdict
from pytest_gondolin.sandbox.outcome import Failure, HostFailure
from pytest_gondolin.vm.machine import VM


def _request(path: str) -> HttpRequest:
    return HttpRequest(
        method="GET",
        target=path,
        scheme="http",
        host="api.test",
        port=80,
        path=path,
        query="",
        headers=(("Host", "api.test"),),
        body=b"",
    )


def test_a_cassette_miss_is_a_host_failure(tmp_path: Path) -> None:
    player = open_cassette(tmp_path / "c.yaml", "none")
    player.unmatched(_request("/not-recorded"))
    verdict = _cassette_verdict(player)
    assert isinstance(verdict, HostFailure)
    assert verdict.section == "gondolin: cassette"
    assert verdict.message.startswith("cassette: ")
    assert "GET http://api.test/not-recorded" in verdict.message
    assert _cassette_verdict(player) is None  # a miss is reported to one test only


def test_no_miss_no_verdict(tmp_path: Path) -> None:
    """Negative control: the same player without a miss."""
    assert _cassette_verdict(open_cassette(tmp_path / "c.yaml", "none")) is None


def test_a_run_whose_vm_died_says_so_with_the_console() -> None:
    vm = cast(VM, SimpleNamespace(console_log=lambda: "Kernel panic - not syncing\n"))
    crash = Failure("crash", "worker connection lost", "stderr tail", 1.5)
    died = GuestWorker._vm_died(vm, crash)
    assert died.kind == "crash" and died.duration == 1.5
    assert died.headline == "worker connection lost (the VM died)"
    assert died.detail.startswith("stderr tail\n--- guest console (tail) ---\n")
    assert "Kernel panic" in died.detail
