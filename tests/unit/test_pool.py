"""RestorePool: which VM a test gets, and that it is always a clean one.

The pool only calls ``launch``/``restore`` and reads ``vm.alive``; these
tests drive it with stand-ins to cover orderings a real run hits by chance
(the real pool behind the ``vm`` fixture runs in tests/integration).
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest

from pytest_gondolin.errors import SnapshotError, VMError, VMLaunchError
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.pool import RestorePool


class FakeVM:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.closed = False
        self.dirty = False  # used since its last restore
        self.restores = 0

    def close(self) -> None:
        self.closed = True
        self.alive = False


class Harness:
    def __init__(self, size: int = 2, restore_delay: float = 0.0) -> None:
        self.launched: list[FakeVM] = []
        self.dropped: list[FakeVM] = []
        self.fail_launch = False
        self.fail_restore: set[str] = set()
        self.restore_delay = restore_delay
        self.launch_gate = threading.Event()
        self.launch_gate.set()
        self.warmed: list[str] = []
        self.pool = RestorePool(
            self._launch,
            self._restore,
            size=size,
            name="test",
            on_drop=lambda vm: self.dropped.append(cast(Any, vm)),
            warm=lambda vm: self.warmed.append(vm.name),
            warm_after=0.2,
        )

    def _launch(self) -> VM:
        self.launch_gate.wait(5)
        if self.fail_launch:
            raise VMLaunchError("no QEMU for you")
        vm = FakeVM(f"vm{len(self.launched) + 1}")
        self.launched.append(vm)
        return cast(VM, vm)

    def _restore(self, vm: VM) -> None:
        fake = cast(FakeVM, vm)
        time.sleep(self.restore_delay)
        if fake.name in self.fail_restore:
            raise SnapshotError(f"{fake.name}: loadvm failed")
        fake.dirty = False
        fake.restores += 1

    def take(self) -> FakeVM:
        vm = cast(FakeVM, self.pool.take())
        assert not vm.dirty, f"{vm.name} handed out without a restore"
        assert vm.alive
        vm.dirty = True
        return vm

    def give_back(self, vm: FakeVM) -> None:
        self.pool.give_back(cast(VM, vm))


@pytest.fixture
def harness() -> Any:
    h = Harness()
    yield h
    h.pool.close()


def test_first_take_launches_then_a_second_vm_starts_in_the_background(harness: Harness) -> None:
    first = harness.take()
    assert first.name == "vm1"
    harness.give_back(first)
    second = harness.take()  # the background launch, or vm1 once restored: never dirty
    harness.give_back(second)
    deadline = time.monotonic() + 5
    while len(harness.pool.vms) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(harness.launched) == 2


@pytest.mark.parametrize("size", [1, 2, 3])
def test_many_tests_never_get_a_used_vm(size: int) -> None:
    h = Harness(size=size, restore_delay=0.002)
    try:
        for _ in range(30):
            vm = h.take()
            h.give_back(vm)
        assert len(h.launched) <= size
        # Every hand-out but each VM's first came after a restore.
        assert sum(vm.restores for vm in h.launched) >= 30 - len(h.launched) - size
    finally:
        h.pool.close()


def test_the_used_vm_is_restored_while_the_other_serves() -> None:
    h = Harness(restore_delay=0.5)
    try:
        a = h.take()
        deadline = time.monotonic() + 5
        while len(h.launched) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        h.give_back(a)  # its restore takes 0.5 s ...
        started = time.monotonic()
        b = h.take()  # ... which the next test does not wait for
        assert b.name == "vm2" and time.monotonic() - started < 0.3
        time.sleep(0.1)
        h.give_back(b)  # restored 0.1 s after vm1
        c = h.take()  # vm1's restore finishes first
        assert c is a and a.restores == 1
    finally:
        h.pool.close()


def test_a_dead_vm_is_closed_and_replaced(harness: Harness) -> None:
    a = harness.take()
    a.alive = False  # QEMU killed mid-test
    b = harness.take()
    assert b is not a and b.alive
    assert a.closed and a in harness.dropped


def test_a_failed_background_restore_costs_that_vm_only(harness: Harness) -> None:
    a = harness.take()
    harness.fail_restore.add(a.name)
    harness.give_back(a)
    for _ in range(3):
        vm = harness.take()
        assert vm is not a
        harness.give_back(vm)
    assert a.closed and a in harness.dropped


def test_a_failed_first_launch_is_the_tests_error(harness: Harness) -> None:
    harness.fail_launch = True
    with pytest.raises(VMLaunchError, match="no QEMU"):
        harness.take()
    harness.fail_launch = False
    assert harness.take().name == "vm1"


def test_single_vm_pool_restores_in_the_foreground() -> None:
    h = Harness(size=1)
    try:
        a = h.take()
        h.give_back(a)
        assert a.restores == 0  # nothing in the background
        again = h.take()
        assert again is a and a.restores == 1
    finally:
        h.pool.close()


def test_all_in_use_restores_the_one_handed_out_first() -> None:
    h = Harness(size=1)
    try:
        a = h.take()
        again = h.take()  # the test asks twice, without giving back
        assert again is a and a.restores == 1
    finally:
        h.pool.close()


def test_a_discarded_vm_stays_up_and_is_never_handed_out(harness: Harness) -> None:
    a = harness.take()
    assert harness.pool.discard(cast(VM, a))
    harness.give_back(a)  # the fixture's teardown: no effect any more
    for _ in range(4):
        vm = harness.take()
        assert vm is not a
        harness.give_back(vm)
    assert not a.closed and a not in harness.dropped


def test_close_closes_every_vm_including_one_still_starting(harness: Harness) -> None:
    a = harness.take()
    harness.launch_gate.clear()  # the background launch of vm2 hangs ...
    harness.give_back(a)
    harness.take()
    threading.Timer(0.1, harness.launch_gate.set).start()  # ... and finishes during close
    harness.pool.close()
    assert all(vm.closed for vm in harness.launched)
    with pytest.raises(Exception, match="closed"):
        harness.pool.take()


def test_only_a_vm_whose_test_took_a_while_is_warmed_up(harness: Harness) -> None:
    a = harness.take()
    harness.give_back(a)  # a short test: restored, not warmed
    b = harness.take()
    time.sleep(0.25)
    harness.give_back(b)  # a long one: restored, then warmed, before it serves again
    for _ in range(2):
        vm = harness.take()
        harness.give_back(vm)
    deadline = time.monotonic() + 5
    while not harness.warmed and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert harness.warmed == [b.name]


def test_a_pool_without_launch_serves_only_added_members() -> None:
    restored: list[str] = []
    pool = RestorePool[FakeVM](None, lambda vm: restored.append(vm.name), size=2, name="box")
    a, b = FakeVM("a"), FakeVM("b")
    pool.add(a)
    pool.add(b)
    try:
        first = pool.take()
        pool.give_back(first)
        second = pool.take()
        assert {first.name, second.name} == {"a", "b"}
        first.alive = second.alive = False  # both VMs died
        with pytest.raises(VMError, match="no box VM is left"):
            pool.take()
        assert a.closed and b.closed
    finally:
        pool.close()


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size=0"):
        RestorePool(lambda: cast(VM, None), lambda vm: None, size=0)


def test_on_take_runs_at_every_hand_out_and_a_failure_costs_that_vm() -> None:
    """``on_take`` (the ``vm`` fixture sets the guest clock there) runs last, each time."""
    taken: list[str] = []
    broken: set[str] = set()

    def on_take(vm: FakeVM) -> None:
        if vm.name in broken:
            raise VMError(f"{vm.name}: setting the guest clock failed")
        taken.append(vm.name)

    pool = RestorePool[FakeVM](None, lambda vm: None, size=2, name="box", on_take=on_take)
    a = FakeVM("a")
    pool.add(a)
    try:
        for _ in range(2):
            pool.give_back(pool.take())  # restored in the background, then handed out again
        assert taken == ["a", "a"]
        broken.add("a")
        with pytest.raises(VMError, match="no box VM is left"):
            pool.take()  # "a" failed its hand-out: closed, and none is left
        assert a.closed and taken == ["a", "a"]
    finally:
        pool.close()
