"""Per-test isolation by full VM snapshots, and disk checkpoints, on a real guest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.vm.machine import VM, Checkpoint
from pytest_gondolin.vm.pool import RestorePool

# What earlier rounds saw. Host-side module state, so it survives across tests
# while the guest does not.
_rounds: list[tuple[str, str]] = []  # (VM name, RNG sample)

ROUNDS = 5

DIRTY_EVERYTHING = """
set -e
echo disk > /etc/gondolin-marker
echo tmpfs > /tmp/marker
echo shm > /dev/shm/marker
sysctl -qw kernel.domainname=dirty.example
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
echo started
"""


def _rng_sample(vm: VM) -> str:
    return vm.exec("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_isolation_each_test_starts_clean(vm: VM, round_: int) -> None:
    """Every round finds no trace of earlier rounds (disk, tmpfs, shm, sysctl, process), then
    leaves all of them behind. The ``vm`` VMs take turns, so the rounds also check that a VM
    served more than one round: its restore, not a different VM, is what cleaned it."""
    r = vm.exec(
        "ls /etc/gondolin-marker /tmp/marker /dev/shm/marker 2>&1; sysctl -n kernel.domainname; pgrep -x sleep || echo no-sleep"
    )
    assert r.stdout.count("No such file") == 3, r.stdout
    assert "dirty.example" not in r.stdout
    assert r.stdout.strip().endswith("no-sleep"), r.stdout
    # Restores of one snapshot must never replay the same random bytes.
    sample = _rng_sample(vm)
    assert len(sample) == 32 and sample not in [seen for _, seen in _rounds]
    _rounds.append((vm.name, sample))
    assert vm.exec(DIRTY_EVERYTHING, check=True).stdout == "started\n"
    assert vm.exec("pgrep -x sleep").returncode == 0
    if round_ == ROUNDS - 1:
        names = [name for name, _ in _rounds]
        assert len(names) == ROUNDS and max(names.count(n) for n in names) >= 2, names


def test_long_lived_process_memory_goes_back_with_restore(vm: VM) -> None:
    """A process running when the snapshot was taken: its memory is the snapshot's again."""
    vm.write_file(
        "/root/counter.py",
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        "    with open('/tmp/counter.tmp', 'w') as fh:\n"
        "        fh.write(str(n))\n"
        "    os.rename('/tmp/counter.tmp', '/tmp/counter')\n"
        "    time.sleep(0.2)\n",
    )
    vm.exec("setsid python3 /root/counter.py </dev/null >/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 30
    while vm.exec("test -e /tmp/counter").returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    snap = vm.snapshot()
    at_snapshot = int(vm.read_file("/tmp/counter"))
    time.sleep(2)  # the counter runs on ...
    later = int(vm.read_file("/tmp/counter"))
    assert later > at_snapshot + 3
    vm.restore(snap)  # ... and is back near its snapshot value: RAM, not just the disk
    after = int(vm.read_file("/tmp/counter"))
    assert at_snapshot <= after < later, (at_snapshot, after, later)


def test_clock_is_right_after_restore(vm: VM) -> None:
    guest = float(vm.exec("date +%s.%N").stdout)
    assert abs(guest - time.time()) < 2


# A guest whose clock runs 10% fast, as a TCG guest's can when its kernel
# calibrated the TSC against emulated timers on a loaded host: the kernel's
# tick length (adjtimex ADJ_TICK, in microseconds per USER_HZ tick) set to
# 11000 instead of 10000.
_FAST_CLOCK = """
import ctypes
class Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint)] + [(n, ctypes.c_long) for n in
        ("offset", "freq", "maxerror", "esterror")] + [("status", ctypes.c_int)] + [
        (n, ctypes.c_long) for n in ("constant", "precision", "tolerance", "sec", "usec",
        "tick", "ppsfreq", "jitter")] + [("shift", ctypes.c_int)] + [(n, ctypes.c_long) for n in
        ("stabil", "jitcnt", "calcnt", "errcnt", "stbcnt")] + [("tai", ctypes.c_int),
        ("pad", ctypes.c_int * 11)]
tx = Timex(modes=0x4000, tick=11000)
assert ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx)) >= 0, ctypes.get_errno()
print(tx.tick)
"""
#: How long a restored VM waits in the pool: 1.5 s of drift at 10%.
_IDLE = 15.0


def _guest_offset(vm: VM) -> float:
    """How far the guest's wall clock is from the host's (0 when within the exec's own span)."""
    before = time.time()
    guest = float(vm.exec("date +%s.%N", check=True).stdout)
    after = time.time()
    return guest - after if guest > after else min(0.0, guest - before)


def test_clock_is_right_when_a_vm_waited_in_the_pool(vm_factory) -> None:  # type: ignore[no-untyped-def]
    """A VM restored in the background runs (its clock at its own pace) until it is handed out;
    the ``vm`` fixture's pool sets the guest clock again at hand-out (``VM.refresh_clock``).
    The control (a pool without it) shows the fast guest clock drifting meanwhile."""
    machine: VM = vm_factory()
    assert machine.exec(f"python3 -c '{_FAST_CLOCK}'", check=True).stdout == "11000\n"
    snap = machine.snapshot()
    for on_take, drift in ((None, True), (VM.refresh_clock, False)):
        pool = RestorePool[VM](None, lambda vm: vm.restore(snap), size=2, on_take=on_take)
        pool.add(machine)
        assert pool.take() is machine
        pool.give_back(machine)  # restored in the background (size 2), then left running
        time.sleep(_IDLE)
        assert pool.take() is machine
        offset = _guest_offset(machine)
        if drift:
            assert offset > 0.5, f"the fast guest clock did not drift: {offset:+.2f} s"
        else:
            assert abs(offset) < 0.5, f"guest clock {offset:+.2f} s off the host's at hand-out"
        pool.discard(machine)


def test_snapshot_restore_many_times(vm_factory) -> None:  # type: ignore[no-untyped-def]
    machine: VM = vm_factory()
    machine.exec("echo one > /etc/state", check=True)
    snap = machine.snapshot()
    for i in range(3):
        machine.exec(f"echo changed-{i} > /etc/state; echo x > /tmp/extra", check=True)
        machine.restore(snap)
        assert machine.exec("cat /etc/state; ls /tmp/extra 2>&1 || true").stdout.startswith("one\n")
    other: VM = vm_factory()
    with pytest.raises(SnapshotError, match="not taken of"):
        other.restore(snap)
    other.close()
    machine.close()


def test_checkpoint_resume_isolated_and_movable(vm_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    machine: VM = vm_factory()
    machine.exec(
        "mkdir -p /srv/app && echo v1 > /srv/app/version && echo gone > /tmp/tmpfs-file", check=True
    )
    ckpt = machine.checkpoint(tmp_path / "app.qcow2")
    assert machine.state.value == "closed"
    assert ckpt.build_id == machine.config.image.build_id

    first = ckpt.resume()
    second = ckpt.resume()
    try:
        assert first.exec("cat /srv/app/version").stdout == "v1\n"
        assert first.exec("ls /tmp/tmpfs-file").returncode != 0  # tmpfs is not part of a checkpoint
        first.exec("echo v2 > /srv/app/version", check=True)
        assert second.exec("cat /srv/app/version").stdout == "v1\n"  # resumes never see each other
    finally:
        first.close()
        second.close()

    moved = tmp_path / "elsewhere" / "moved.qcow2"
    moved.parent.mkdir()
    (tmp_path / "app.qcow2").rename(moved)
    again = Checkpoint.load(moved).resume()
    try:
        assert again.exec("cat /srv/app/version").stdout == "v1\n"
    finally:
        again.close()


def test_checkpoint_errors(tmp_path: Path) -> None:
    not_ckpt = tmp_path / "plain.qcow2"
    not_ckpt.write_bytes(b"\0" * 1024)
    with pytest.raises(SnapshotError, match="not a gondolin checkpoint"):
        Checkpoint.load(not_ckpt)


def test_checkpoint_from_other_image_names_both_build_ids(vm_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pytest_gondolin.vm import checkpoint as ckpt_mod

    machine: VM = vm_factory()
    ckpt = machine.checkpoint(tmp_path / "c.qcow2")
    forged = tmp_path / "forged.qcow2"
    data = (tmp_path / "c.qcow2").read_bytes()
    meta = ckpt_mod.read_trailer(tmp_path / "c.qcow2")
    trailer_len = (
        len(ckpt_mod.TRAILER_MAGIC)
        + 4
        + len(__import__("json").dumps(meta, sort_keys=True).encode())
    )
    forged.write_bytes(data[:-trailer_len])
    ckpt_mod.write_trailer(forged, {**meta, "image_build_id": "feedfacecafebeef"})
    with pytest.raises(SnapshotError, match="feedfacecafebeef") as info:
        Checkpoint.load(forged, config=machine.config).resume()
    assert ckpt.build_id in str(info.value)
