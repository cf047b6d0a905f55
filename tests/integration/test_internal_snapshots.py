"""Named internal snapshots of a running VM: saved, loaded, deleted while the guest runs."""

from __future__ import annotations

import pytest

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.vm.machine import VM


def test_a_deleted_snapshot_is_gone_and_its_name_free_again(vm_factory) -> None:  # type: ignore[no-untyped-def]
    machine: VM = vm_factory()
    machine.write_file("/var/tmp/mark", b"one")
    machine.save_internal("named")
    machine.write_file("/var/tmp/mark", b"two")
    machine.delete_internal("named")  # the guest keeps running meanwhile
    assert machine.read_file("/var/tmp/mark") == b"two"
    with pytest.raises(SnapshotError, match="named"):
        machine.load_internal("named")
    machine.delete_internal("named")  # none left: nothing to do
    machine.save_internal("named")
    machine.write_file("/var/tmp/mark", b"three")
    machine.load_internal("named")
    assert machine.read_file("/var/tmp/mark") == b"two"
