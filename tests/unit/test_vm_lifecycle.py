"""A VM's lifecycle, driven through a real ``VM`` object without QEMU.

Every move goes through ``VM._set_state`` against ``VM_TRANSITIONS``; the
allowed ones succeed, the forbidden ones raise StateError with the data to
act on. Guarded methods on a VM that was never launched raise StateError
(a caller bug); on a closed VM they keep raising VMError, as a VM closed
by another thread always did.
"""

from __future__ import annotations

import ast
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from pytest_gondolin.errors import SnapshotError, StateError, VMError
from pytest_gondolin.image.store import Image
from pytest_gondolin.statemachine import sources
from pytest_gondolin.vm import guest_operations, machine
from pytest_gondolin.vm.identity import Snapshot, VMConfig
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.runstate import LAUNCHED, VM_TRANSITIONS, Runstate


@pytest.fixture
def fresh(tmp_path: Path) -> VM:
    """A VM that was constructed but never launched: nothing runs, nothing is created."""
    image = Image(tmp_path / "image", {"build_id": "0", "name": "fake"})
    return VM(VMConfig(image=image, network=False), name="unit")


def _drive(vm: VM, path: list[Runstate]) -> None:
    for state in path:
        vm._set_state(state)


#: How to reach each state from CREATED.
PATHS = {
    Runstate.CREATED: [],
    Runstate.BOOTING: [Runstate.BOOTING],
    Runstate.RUNNING: [Runstate.BOOTING, Runstate.RUNNING],
    Runstate.CLOSED: [Runstate.CLOSED],
}


@pytest.mark.parametrize(
    ("current", "new"),
    list(itertools.product(Runstate, Runstate)),
    ids=lambda s: s.value,
)
def test_set_state_follows_the_table(fresh: VM, current: Runstate, new: Runstate) -> None:
    _drive(fresh, PATHS[current])
    assert fresh.state is current
    if new is current or new in VM_TRANSITIONS[current]:
        assert fresh._set_state(new) is current  # returns the state it left
        assert fresh.state is new
        return
    with pytest.raises(StateError) as info:
        fresh._set_state(new)
    assert info.value.state is current
    assert info.value.required == sources(VM_TRANSITIONS, new)
    assert fresh.state is current, "a refused move changes nothing"


def test_only_from_is_checked_in_the_same_step(fresh: VM) -> None:
    with pytest.raises(StateError) as info:
        fresh._set_state(Runstate.CLOSED, only_from=(Runstate.RUNNING,))
    assert (info.value.state, info.value.required) == (Runstate.CREATED, (Runstate.RUNNING,))
    assert fresh.state is Runstate.CREATED


def test_close_is_idempotent_and_runs_hooks_once_across_threads(fresh: VM) -> None:
    calls: list[int] = []
    fresh.add_close_hook(lambda: calls.append(1))
    start = threading.Barrier(8)

    def close() -> None:
        start.wait()
        fresh.close()

    threads = [threading.Thread(target=close) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert fresh.state is Runstate.CLOSED
    fresh.close()
    assert calls == [1]


def test_a_boot_that_lost_the_race_with_close_cannot_revive_the_vm(fresh: VM) -> None:
    """close() from another thread (atexit, say) while booting: the boot's last move is refused."""
    fresh._set_state(Runstate.BOOTING)
    fresh.close()
    with pytest.raises(StateError) as info:
        fresh._set_state(Runstate.RUNNING)
    assert (info.value.state, info.value.required) == (Runstate.CLOSED, (Runstate.BOOTING,))
    assert not fresh.alive


#: Every guarded guest operation, called with plausible arguments.
GUEST_OPERATIONS: dict[str, Callable[[VM], object]] = {
    "exec": lambda vm: vm.exec("true"),
    "write_file": lambda vm: vm.write_file("/tmp/x", b"x"),
    "read_file": lambda vm: vm.read_file("/etc/hostname"),
    "spawn": lambda vm: vm.spawn(["true"]),
    "save_internal": lambda vm: vm.save_internal("t"),
    "load_internal": lambda vm: vm.load_internal("t"),
    "pause": lambda vm: vm.pause(),
    "resume": lambda vm: vm.resume(),
    "snapshot": lambda vm: vm.snapshot(),
    "restore": lambda vm: vm.restore(Snapshot(vm.token, "snap-1", 0.0)),
    "checkpoint": lambda vm: vm.checkpoint("/nonexistent/c.qcow2"),
}


@pytest.mark.parametrize("operation", sorted(GUEST_OPERATIONS))
@pytest.mark.parametrize("state", [Runstate.CREATED, Runstate.BOOTING], ids=lambda s: s.value)
def test_guest_operations_before_launch_are_a_state_error(
    fresh: VM, operation: str, state: Runstate
) -> None:
    _drive(fresh, PATHS[state])
    with pytest.raises(StateError, match=rf"VM\.{operation}\(\) needs state 'running' or 'closed'"):
        GUEST_OPERATIONS[operation](fresh)
    assert fresh.state is state


@pytest.mark.parametrize("operation", sorted(GUEST_OPERATIONS))
def test_guest_operations_on_a_closed_vm_stay_vm_errors(fresh: VM, operation: str) -> None:
    """Not StateError: another thread (the pool, the factory at session end) may have closed it."""
    _drive(fresh, PATHS[Runstate.RUNNING])
    fresh.close()
    with pytest.raises(VMError, match=r"unit is (closed|not running)") as info:
        GUEST_OPERATIONS[operation](fresh)
    assert not isinstance(info.value, StateError)


def test_restore_of_a_foreign_snapshot_names_it_in_any_launched_state(fresh: VM) -> None:
    _drive(fresh, PATHS[Runstate.RUNNING])
    with pytest.raises(SnapshotError, match="was not taken of unit"):
        fresh.restore(Snapshot("another-vm", "snap-1", 0.0))


def test_configure_network_needs_a_running_vm(fresh: VM) -> None:
    with pytest.raises(StateError, match=r"VM\.configure_network\(\) needs state 'running'"):
        fresh.configure_network()
    _drive(fresh, PATHS[Runstate.RUNNING])
    with pytest.raises(VMError, match="has no network driver"):  # running: past the guard
        fresh.configure_network()


def test_a_close_hook_on_a_closed_vm_is_refused(fresh: VM) -> None:
    """It would never run: say so instead of dropping it."""
    fresh.close()
    with pytest.raises(StateError) as info:
        fresh.add_close_hook(lambda: None)
    assert info.value.state is Runstate.CLOSED
    assert Runstate.CLOSED not in info.value.required


@pytest.mark.parametrize("state", [Runstate.CREATED, Runstate.BOOTING, Runstate.CLOSED])
def test_detach_needs_a_running_vm_and_says_so_as_vm_error(fresh: VM, state: Runstate) -> None:
    _drive(fresh, PATHS[state])
    with pytest.raises(VMError, match="only a running VM can be detached") as info:
        fresh.detach()
    assert isinstance(info.value.__cause__, StateError)
    assert fresh.state is state


def test_detach_leaves_the_folder_and_a_later_close_does_not_remove_it(
    fresh: VM, tmp_path: Path
) -> None:
    hooks: list[str] = []
    fresh.add_close_hook(lambda: hooks.append("ran"))
    _drive(fresh, PATHS[Runstate.RUNNING])
    fresh.rundir = rundir = tmp_path / "rundir"
    rundir.mkdir()
    assert fresh.detach() == rundir
    assert fresh.state is Runstate.CLOSED
    fresh.close()
    assert rundir.is_dir() and hooks == []


def test_not_alive_without_qemu_in_any_state(fresh: VM) -> None:
    for state in (Runstate.BOOTING, Runstate.RUNNING, Runstate.CLOSED):
        fresh._set_state(state)
        assert not fresh.alive and fresh.exited()
    assert repr(fresh) == "<VM unit closed pid=None>"


def test_guards_name_the_launched_states() -> None:
    assert LAUNCHED == (Runstate.RUNNING, Runstate.CLOSED)
    assert VM.exec.__name__ == "exec"  # the guard keeps the method's identity


@pytest.mark.parametrize(
    ("module", "expected"),
    [(machine, {"__init__", "_set_state"}), (guest_operations, set())],
    ids=["machine", "guest_operations"],
)
def test_state_changes_only_in_set_state(module: ModuleType, expected: set[str]) -> None:
    """Lifecycles as code: ``_state`` is written in ``__init__`` and ``_set_state``, nowhere else
    (the guest API, a base of VM in its own module, never writes it)."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    writers: set[str] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and sub.attr in ("_state", "state"):
                        writers.add(func.name)
    assert writers == expected
