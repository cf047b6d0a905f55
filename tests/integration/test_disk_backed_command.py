"""The guest command that puts tmpfs folders on the guest's disk (``vm/disk_backed.backing_command``).

Run in a real guest: the agent binds in one request (``guest/binds.py``);
the shell reads ``/proc/self/mountinfo`` itself (no process per check);
both bind each folder once however often they run, and never hide what a
folder held before it was bound.
"""

from __future__ import annotations

import errno

import pytest

from pytest_gondolin.errors import AgentRequestError
from pytest_gondolin.vm.disk_backed import backing_command, bind_folders, disk_folder
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


def test_the_agent_binds_in_one_request_and_the_shell_takes_a_folder_that_holds_files(
    vm: VM,
) -> None:
    vm.exec("mkdir -p /tmp/held && echo kept > /tmp/held/file", check=True)
    folders = ["/tmp/fresh", "/root/x y"]
    vm.bind_folders([(disk_folder(f), f) for f in folders])
    vm.bind_folders([(disk_folder(f), f) for f in folders])  # bound already: left as it is
    with pytest.raises(AgentRequestError, match="/tmp/held") as info:
        vm.bind_folders([(disk_folder("/tmp/held"), "/tmp/held")])
    assert info.value.errno == errno.ENOTEMPTY
    bind_folders(vm, ["/tmp/held", "/tmp/fresh"])  # the shell copies what it holds, then binds
    for folder, escaped in [("/tmp/fresh", "/tmp/fresh"), ("/root/x y", "/root/x\\040y")]:
        assert _mounts_at(vm, escaped) == 1, folder
    assert _mounts_at(vm, "/tmp/held") == 1
    assert vm.read_file("/tmp/held/file") == b"kept\n"
