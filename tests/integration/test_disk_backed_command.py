"""The guest command that puts tmpfs folders on the guest's disk (``vm/disk_backed.backing_command``).

Run in a real guest: the shell reads ``/proc/self/mountinfo`` itself (no
process per check), binds each folder once however often it runs, and never
hides what a folder held before it was bound.
"""

from __future__ import annotations

from pytest_gondolin.vm.disk_backed import backing_command
from pytest_gondolin.vm.machine import VM


def _mounts_at(vm: VM, folder: str) -> int:
    table = vm.read_file("/proc/self/mountinfo").decode()
    return sum(1 for line in table.splitlines() if line.split()[4] == folder)


def test_each_folder_is_bound_once_and_keeps_what_it_held(vm: VM) -> None:
    vm.exec("mkdir -p /tmp/held && echo kept > /tmp/held/file", check=True)
    command = backing_command(["/tmp/new", "/tmp/held", "/root/a b", "/root/back\\slash"])
    for _ in range(2):
        vm.exec(command, check=True)
    for folder in ("/tmp/new", "/tmp/held", "/root/a\\040b", "/root/back\\134slash"):
        assert _mounts_at(vm, folder) == 1, folder
    assert vm.read_file("/tmp/held/file") == b"kept\n"
    vm.write_file("/tmp/new/x", b"on disk")
    # The folder is the root disk's file system now, not the /tmp tmpfs.
    probe = 'stat -c %d /tmp/new / /tmp | tr "\\n" " "'
    new, root, tmp = vm.exec(probe, check=True).stdout.split()
    assert new == root != tmp


def test_a_failed_bind_stops_the_command(vm: VM) -> None:
    vm.exec("touch /tmp/blocker", check=True)  # a file where the folder would be
    result = vm.exec(f"{backing_command(['/tmp/blocker/sub', '/tmp/after'])} && echo went-on")
    assert result.returncode != 0 and "went-on" not in result.stdout
