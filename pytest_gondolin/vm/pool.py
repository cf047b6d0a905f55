"""VMs that take turns: one is in a test while the others are made clean in the background.

A restore costs ~0.1-0.2 s under TCG (``loadvm`` plus the guest's first,
cold-translated round trip). With two VMs per option set, the VM a test
used is put back to its snapshot while the next test already runs in the
other one, so the per-test cost of the ``vm`` fixture is a hand-over, not a
restore. One CPU: one VM, restored in the foreground (a background restore
would only compete with the test for the same core).

The pool never hands out a VM that was used since its last restore: a VM
given back is restored before it is handed out again, in the background if
possible, otherwise at once. Members are anything with a ``name``, an
``alive`` flag and ``close()``: VMs for the ``vm`` fixture, sandbox lanes (a
VM plus its guest test worker) for sandboxed tests.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from pytest_gondolin.errors import GondolinError, VMError

log = logging.getLogger(__name__)

Future = concurrent.futures.Future


def _succeeded(future: Future[M]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class Restorable(Protocol):
    """What the pool needs of a member."""

    @property
    def name(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    def close(self) -> None: ...


M = TypeVar("M", bound=Restorable)


class _State(enum.Enum):
    LAUNCHING = "launching"
    READY = "ready"
    IN_USE = "in use"
    RESTORING = "restoring"


@dataclasses.dataclass(eq=False)
class _Member(Generic[M]):
    state: _State
    vm: M | None = None
    #: The background launch or restore under way.
    future: Future[M] | None = None
    #: Hand-out order, so "all in use" restores the one handed out longest ago.
    handed_out: int = 0
    #: When it was handed out (monotonic), to tell short tests from long ones.
    taken_at: float = 0.0
    #: Given back to be settled (:meth:`RestorePool.give_back`) rather than restored.
    settle: Callable[[M], bool] | None = None


class RestorePool(Generic[M]):
    """Up to ``size`` interchangeable members (VMs), each restorable to the same clean state.

    ``launch()`` makes a new clean member; with ``launch=None`` the pool has
    only the members given to :meth:`add` and never replaces one.
    ``restore(vm)`` puts a member back. Both may run in a background thread.
    ``warm(vm)``, if given, runs after a background restore of a member whose
    test lasted ``warm_after`` s or more. ``on_take(vm)``, if given, runs
    each time a member is handed out, last (a member made clean in the
    background has been running since: the ``vm`` fixture's sets the guest
    clock again, :meth:`~pytest_gondolin.vm.machine.VM.refresh_clock`); a
    GondolinError from it costs that member, like a failed restore. The pool owns its members:
    :meth:`close` closes them, and one found dead (closed, QEMU killed) is
    closed and replaced. :meth:`take` and :meth:`give_back` are called from
    one thread (pytest runs one test at a time); the pool's own threads only
    launch and restore.
    """

    def __init__(
        self,
        launch: Callable[[], M] | None,
        restore: Callable[[M], None],
        *,
        size: int,
        name: str = "vm",
        on_new: Callable[[M], None] | None = None,
        on_drop: Callable[[M], None] | None = None,
        warm: Callable[[M], None] | None = None,
        warm_after: float = 0.1,
        on_take: Callable[[M], object] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a restore pool needs at least one VM, got size={size}")
        self._launch = launch
        self._restore = restore
        self.size = size
        self.name = name
        self._on_new = on_new or (lambda vm: None)
        self._on_drop = on_drop or (lambda vm: None)
        self._warm = warm
        self.warm_after = warm_after
        self._on_take = on_take or (lambda vm: None)
        self._lock = threading.Lock()
        self._members: list[_Member[M]] = []
        self._counter = 0
        self._closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- handing out ----------------------------------------------------------------

    def take(self) -> M:
        """Return a clean VM, marked in use until :meth:`give_back`.

        Waits for a background launch or restore if no VM is ready; launches
        the first VM in the foreground. With every VM in use (a test that
        asked twice), the one handed out longest ago is restored now.

        Raises:
            GondolinError: no clean VM could be made (the launch's error).
        """
        while True:
            with self._lock:
                if self._closed:
                    raise VMError(f"{self.name} pool is closed")
                dead = self._take_dead()
                member = self._pick()
                pending = [m.future for m in self._members if m.future is not None]
                if member is None and not pending:
                    # Nothing to wait for: restore an in-use VM, or launch one.
                    member = self._oldest_in_use()
                    if member is None:
                        if self._launch is None:
                            raise VMError(f"no {self.name} VM is left (every one failed or died)")
                        member = _Member[M](_State.LAUNCHING)
                        self._members.append(member)
                    else:
                        member.state = _State.RESTORING
            for vm in dead:
                self._close(vm)
            if member is None:
                concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            launching = member.vm is None and member.future is None
            try:
                vm = self._make_clean(member)
                if vm.alive:
                    self._on_take(vm)
            except GondolinError as exc:
                self._fail(member, exc, quiet=launching)
                if launching:
                    raise  # nothing else would do better: the test gets this error
                continue  # a failed restore costs that VM, not the test
            if not vm.alive:  # died after (or during) its restore
                self._fail(member, VMError(f"{vm.name} is not running"), quiet=False)
                continue
            with self._lock:
                member.state = _State.IN_USE
                self._counter += 1
                member.handed_out = self._counter
                member.taken_at = time.monotonic()
            self._fill()
            return vm

    def add(self, vm: M) -> None:
        """Take ``vm`` (clean, not in use) into the pool."""
        with self._lock:
            if self._closed:
                raise VMError(f"{self.name} pool is closed")
            self._members.append(_Member[M](_State.READY, vm))

    def give_back(
        self, vm: M, *, clean: bool = False, settle: Callable[[M], bool] | None = None
    ) -> None:
        """``vm``'s test is over: restore it (in the background when another VM can serve).

        ``clean=True``: the test left ``vm`` as clean as a restore would (a
        process-isolated test, ``sandbox/isolation.py``); it is ready again
        at once, without a restore. ``settle``: whether ``vm`` is clean is
        known only later; ``settle(vm)`` (in the background when another VM
        can serve, else before ``vm`` is handed out again) returns True when
        it is, False (or raises GondolinError) when it must be restored.
        """
        with self._lock:
            member = self._find(vm)
            if member is None or member.state is not _State.IN_USE:
                return
            if self._closed or not vm.alive:
                return  # dropped by the next take()
            if clean:
                member.state = _State.READY
                return
            if settle is not None:
                member.state = _State.RESTORING
                if self.size > 1:
                    member.future = self._submit(self._settled, vm, settle)
                else:
                    member.settle = settle  # settled by the next take()
                return
            if self.size > 1:
                member.state = _State.RESTORING
                # A test that kept its VM a while is likely followed by tests that
                # run guest commands too: warm the guest up after the restore
                # (background). After short tests the next one would only wait.
                warm = time.monotonic() - member.taken_at >= self.warm_after
                member.future = self._submit(self._restored, vm, warm)
            else:
                member.state = _State.RESTORING  # restored by the next take()

    def discard(self, vm: M) -> bool:
        """Stop owning ``vm`` (not closed, never handed out again); True if it was a member."""
        with self._lock:
            member = self._find(vm)
            if member is None:
                return False
            self._members.remove(member)
        return True

    def close(self) -> None:
        """Close every VM (a background restore then fails fast) and wait for the threads."""
        with self._lock:
            self._closed = True
            members, self._members = self._members, []
            executor, self._executor = self._executor, None
        for member in members:
            if member.vm is not None:
                self._close(member.vm)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        # A launch that was under way finished into a closed pool.
        for member in members:
            future = member.future
            if member.vm is None and future is not None and _succeeded(future):
                self._close(future.result())

    @property
    def vms(self) -> list[M]:
        """The member VMs that exist now (launched, in any state)."""
        with self._lock:
            return [m.vm for m in self._members if m.vm is not None]

    # -- internals ---------------------------------------------------------------------

    def _pick(self) -> _Member[M] | None:
        """A member that is ready, or whose background work finished (lock held)."""
        for member in self._members:
            if member.state is _State.READY:
                return member
        for member in self._members:
            if member.future is not None and member.future.done():
                return member  # _make_clean collects its result
        return None

    def _oldest_in_use(self) -> _Member[M] | None:
        candidates = [
            m
            for m in self._members
            if m.state in (_State.IN_USE, _State.RESTORING)
            and m.future is None
            and m.vm is not None
        ]
        return min(candidates, key=lambda m: m.handed_out, default=None)

    def _make_clean(self, member: _Member[M]) -> M:
        """Finish ``member``'s background work or do it now; returns its clean VM."""
        future, member.future = member.future, None
        if future is not None:
            vm = future.result()  # raises the background launch's or restore's error
            member.vm = vm
            return vm
        if member.state is _State.LAUNCHING:
            vm = self._launched()
            member.vm = vm
            return vm
        assert member.vm is not None
        if member.state is _State.RESTORING:
            settle, member.settle = member.settle, None
            if settle is not None:
                return self._settled(member.vm, settle)
            self._restore(member.vm)
        return member.vm

    def _launched(self) -> M:
        assert self._launch is not None
        vm = self._launch()
        self._on_new(vm)
        return vm

    def _restored(self, vm: M, warm: bool = False) -> M:
        self._restore(vm)
        if warm and self._warm is not None:
            self._warm(vm)
        return vm

    def _settled(self, vm: M, settle: Callable[[M], bool]) -> M:
        """``vm`` settled, or restored when it is not clean."""
        try:
            clean = settle(vm)
        except GondolinError as exc:
            log.info("%s pool: %s did not settle, restoring it: %s", self.name, vm.name, exc)
            clean = False
        if not clean:
            self._restore(vm)
        return vm

    def _fill(self) -> None:
        """Start background launches until the pool has ``size`` members."""
        with self._lock:
            while self._launch is not None and not self._closed and len(self._members) < self.size:
                member = _Member[M](_State.LAUNCHING)
                member.future = self._submit(self._launched)
                self._members.append(member)

    def _submit(self, fn: Callable[..., M], *args: object) -> Future[M]:
        """Run ``fn`` in the pool's threads (lock held)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.size, thread_name_prefix=f"gondolin-{self.name}-restore"
            )
        return self._executor.submit(fn, *args)

    def _fail(self, member: _Member[M], exc: BaseException, *, quiet: bool) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)
        if not quiet:
            what = "start" if member.vm is None else f"restore of {member.vm.name}"
            log.warning("%s pool: %s failed; the VM is dropped: %s", self.name, what, exc)
        if member.vm is not None:
            self._close(member.vm)

    def _take_dead(self) -> list[M]:
        """Forget members whose VM died or was closed; the caller closes them (lock held)."""
        dead = []
        for member in list(self._members):
            vm = member.vm
            if vm is not None and member.future is None and not vm.alive:
                self._members.remove(member)
                dead.append(vm)
        return dead

    def _find(self, vm: M) -> _Member[M] | None:
        for member in self._members:
            if member.vm is vm:
                return member
        return None

    def _close(self, vm: M) -> None:
        try:
            vm.close()
        except Exception:
            log.exception("closing %r failed", vm)
        self._on_drop(vm)
