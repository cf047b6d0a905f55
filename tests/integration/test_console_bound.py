"""A guest that floods its serial console cannot grow the host's console log without bound."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pytest_gondolin.logtail import read_tail
from pytest_gondolin.vm import console_bound
from pytest_gondolin.vm.machine import VM

#: A small cap, so the guest writes many times it in a few seconds.
KEEP = 64 * 1024
#: Numbered lines the guest writes: ~1.2 MB, ~18 times the cap.
LINES = 60_000
#: Writing ~1.2 MB through the emulated UART takes ~3 s idle; a loaded host is far slower.
FLOOD_TIMEOUT = 240.0


def test_console_log_keeps_only_the_newest_output(
    vm_factory, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(console_bound, "CONSOLE_KEEP_BYTES", KEEP)
    machine: VM = vm_factory()  # its QEMU watches its console with the cap above
    assert machine.rundir is not None
    log_path = machine.rundir / "console.log"
    machine.exec(
        f"seq 1 {LINES} | sed 's/^/flood-line-/' > /dev/ttyS0; echo flood-done > /dev/ttyS0",
        check=True,
        timeout=FLOOD_TIMEOUT,
    )
    deadline = time.monotonic() + FLOOD_TIMEOUT
    while b"flood-done" not in read_tail(log_path, 4096):
        assert time.monotonic() < deadline, "the guest's last console line never arrived"
        time.sleep(0.2)
    time.sleep(2 * console_bound.CONSOLE_CHECK_INTERVAL)  # one more check after the last write
    st = os.stat(log_path)
    written = len(b"flood-line-\r\n") * LINES
    assert st.st_size > written, (st.st_size, written)  # every byte went through the log...
    stored = st.st_blocks * 512
    # ... but it stores at most twice the cap plus one interval's output (generous: loaded host).
    assert stored < 8 * KEEP, f"console log stores {stored} bytes of {st.st_size} (cap {KEEP})"

    # The tail is the newest output, in order, and stays readable once QEMU is gone.
    assert machine.pid is not None
    os.kill(machine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the channel notices the dead QEMU a moment later
    while not machine.exited(grace=0.5):
        assert time.monotonic() < deadline, "QEMU did not exit after SIGKILL"
        time.sleep(0.1)
    tail = machine.console_log().replace("\r", "").splitlines()
    assert tail[-1] == "flood-done", tail[-3:]
    numbers = [int(line.removeprefix("flood-line-")) for line in tail[1:-1]]
    assert numbers == list(range(LINES - len(numbers) + 1, LINES + 1)), numbers[-3:]
    # The front of the file is a hole (zeros), the kept part is whole.
    kept = read_tail(log_path, KEEP)
    assert b"\0" not in kept[-KEEP // 2 :] and kept.count(b"flood-line-") > KEEP // 40
    with open(log_path, "rb") as fh:
        assert fh.read(4096) == b"\0" * 4096
    machine.close()
