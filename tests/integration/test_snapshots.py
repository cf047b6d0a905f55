"""Per-test isolation by full VM snapshots, and disk checkpoints, on a real guest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.vm.machine import VM, Checkpoint

# Values seen by the first test of each pair, compared by the second. Host-side
# module state, so it survives across tests while the guest does not.
_seen: dict[str, str] = {}


def _rng_sample(vm: VM) -> str:
    return vm.exec("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout


def test_isolation_1_dirty_everything(vm: VM) -> None:
    script = """
    set -e
    echo disk > /etc/gondolin-marker
    echo tmpfs > /tmp/marker
    echo shm > /dev/shm/marker
    sysctl -qw kernel.domainname=dirty.example
    setsid sleep 1000 </dev/null >/dev/null 2>&1 &
    echo started
    """
    assert vm.exec(script, check=True).stdout == "started\n"
    assert vm.exec("pgrep -x sleep").returncode == 0
    _seen["rng"] = _rng_sample(vm)


def test_isolation_2_clean_again(vm: VM) -> None:
    r = vm.exec(
        "ls /etc/gondolin-marker /tmp/marker /dev/shm/marker 2>&1; sysctl -n kernel.domainname; pgrep -x sleep || echo no-sleep"
    )
    assert "No such file" in r.stdout and r.stdout.count("No such file") == 3, r.stdout
    assert "dirty.example" not in r.stdout
    assert r.stdout.strip().endswith("no-sleep")
    # The same snapshot restored twice must not replay the same random bytes.
    assert _seen["rng"] and _rng_sample(vm) != _seen["rng"]


def test_clock_is_right_after_restore(vm: VM) -> None:
    guest = float(vm.exec("date +%s.%N").stdout)
    assert abs(guest - time.time()) < 2


def test_python_random_reseeded_in_long_lived_agent(vm: VM) -> None:
    # Python processes started after restore read fresh kernel entropy.
    sample = vm.exec(["python3", "-c", "import random; print(random.getrandbits(64))"]).stdout
    _seen.setdefault("py", sample)
    if _seen["py"] is not sample:
        assert sample != _seen["py"]


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
