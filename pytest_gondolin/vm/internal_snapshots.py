"""A running VM's internal snapshots: named states kept inside its own overlay disk.

:class:`InternalSnapshots` is a base of :class:`~pytest_gondolin.vm.machine.VM`
(over :class:`~pytest_gondolin.vm.guest_operations.GuestOperations`) and holds
what QEMU's monitor does to the whole guest in place: ``save_internal``,
``load_internal``, ``delete_internal`` (HMP ``savevm``, ``loadvm``,
``delvm``: RAM, devices and disk, in the qcow2 the VM runs on), ``pause`` and
``resume`` (QMP ``stop``/``cont``), and the public ``snapshot()`` /
``restore()`` over them, with their :class:`~pytest_gondolin.vm.identity.Snapshot`
handles. No ``qemu-img`` here: disk-only checkpoints, copies and exports stay
in :mod:`~pytest_gondolin.vm.machine` and :mod:`~pytest_gondolin.vm.checkpoint`.

A restore also resets the VM's network (nothing a test did on it survives)
and resynchronizes the agent, which brings the guest fresh entropy and the
host's clock. Every method needs :data:`~pytest_gondolin.vm.runstate.LAUNCHED`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_gondolin.errors import SnapshotError, VMError
from pytest_gondolin.statemachine import require
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.guest_network import reset_network
from pytest_gondolin.vm.guest_operations import GuestOperations
from pytest_gondolin.vm.identity import Snapshot
from pytest_gondolin.vm.qemu_process import QemuProcess
from pytest_gondolin.vm.runstate import LAUNCHED

if TYPE_CHECKING:  # annotations only: guest_network loads the stack when a guest needs it
    from pytest_gondolin.netpolicy.http.recorder import Recorder

__all__ = ["RESTORE_SYNC_TIMEOUT", "InternalSnapshots"]

#: The agent of a restored guest answers within a second; 30 s covers a loaded TCG host.
RESTORE_SYNC_TIMEOUT = 30.0


class InternalSnapshots(GuestOperations):
    """The snapshots of a :class:`~pytest_gondolin.vm.machine.VM` (see the module docstring)."""

    # Set by VM: the recorder a restore replaces, the token its Snapshot
    # handles carry, and how many snapshot() has taken.
    http: Recorder | None
    token: str
    _snapshots: int

    def _monitor(self) -> QemuProcess:
        if self._qemu is None:
            raise VMError(f"{self.name} is not running")
        return self._qemu

    @require(*LAUNCHED)
    def save_internal(self, tag: str) -> None:
        """Save RAM, devices and disk as internal snapshot ``tag`` of the overlay."""
        self._require_channel()
        self._monitor().hmp(f"savevm {tag}")

    @require(*LAUNCHED)
    def delete_internal(self, tag: str) -> None:
        """Delete internal snapshot ``tag`` of the overlay, if there is one.

        The guest runs on meanwhile: ``savevm`` of a name in use deletes the
        old one first, in the guest's time (~0.1 s for a worker's snapshot
        under TCG); done earlier, from another thread, it overlaps guest work.
        """
        self._require_channel()
        self._monitor().hmp(f"delvm {tag}")

    @require(*LAUNCHED)
    def load_internal(self, tag: str, *, preserve: Sequence[AgentProcess] = ()) -> None:
        """Put the VM back to internal snapshot ``tag`` and resynchronize the agent.

        ``preserve``: processes that were running when ``tag`` was saved; they stay attached.
        """
        channel = self._require_channel()
        # Paused across loadvm and the network reset (loadvm keeps the run
        # state it found), so no frame of the old or the restored guest
        # crosses the reset: nothing a test did on the network survives it.
        self.pause()
        try:
            self._monitor().hmp(f"loadvm {tag}")
        except SnapshotError:
            self.resume()  # not left paused: every later call would time out instead
            raise
        if self.network is not None:
            self.http = reset_network(self.network, f"{self.name}: restoring {tag!r}")
        self.resume()
        try:
            channel.sync(
                timeout=RESTORE_SYNC_TIMEOUT,
                preserve=preserve,
                entropy=os.urandom(64),
                clock_ns=time.time_ns(),
            )
        except (TimeoutError, VMError) as exc:
            self._crash_check(exc)
            raise SnapshotError(f"the agent did not answer after restoring {tag!r}: {exc}") from exc
        self._clock_set_at = time.monotonic()

    @require(*LAUNCHED)
    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``)."""
        self._monitor().cmd("stop")

    @require(*LAUNCHED)
    def resume(self) -> None:
        """Let the guest's vCPUs run again (QMP ``cont``)."""
        self._monitor().cmd("cont")

    @require(*LAUNCHED)
    def snapshot(self) -> Snapshot:
        """Save the whole VM (RAM, devices, disk); restore it with :meth:`restore`, any number of times."""
        self._snapshots += 1
        tag = f"snap-{self._snapshots}"
        self.save_internal(tag)
        return Snapshot(self.token, tag, time.time())

    @require(*LAUNCHED)
    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM back exactly to ``snapshot``; the guest then gets fresh entropy and the host's clock."""
        if not isinstance(snapshot, Snapshot) or snapshot.vm_token != self.token:
            raise SnapshotError(
                f"{snapshot!r} was not taken of {self.name}; snapshots restore only into their own VM"
            )
        self.load_internal(snapshot.tag)
