"""The lifecycle of a VM as data: its states, the moves between them, and who may call what.

:class:`~pytest_gondolin.vm.machine.VM` keeps one :class:`Runstate` and
changes it only in ``VM._set_state``, against :data:`VM_TRANSITIONS`
(with :func:`pytest_gondolin.statemachine.transition`)::

    CREATED --launch()--> BOOTING --the agent answered--> RUNNING
    CREATED --close()--> CLOSED
    BOOTING --launch failed (VMLaunchError): close()--> CLOSED
    RUNNING --close() / checkpoint() / detach()--> CLOSED

CLOSED is final. Staying put is always allowed, which makes ``close()``
idempotent.

Who may call what: guest operations and snapshots need :data:`LAUNCHED`.
Before that (a VM that was never launched) a call is a bug in the caller
and raises StateError; once the VM is CLOSED -- perhaps by another
thread: the restore pool, the factory at session end, a kept VM's
detach -- they raise VMError naming it, and a call under which QEMU died
raises VMCrashed. ``detach()`` needs RUNNING and raises VMError otherwise.
"""

from __future__ import annotations

import enum

from pytest_gondolin.statemachine import Transitions

__all__ = ["LAUNCHED", "VM_TRANSITIONS", "Runstate"]


class Runstate(enum.Enum):
    """Where a VM is in its lifecycle (see the module docstring)."""

    CREATED = "created"  # constructed; launch() has not begun
    BOOTING = "booting"  # QEMU is starting, the agent has not answered yet
    RUNNING = "running"  # the agent answered (QEMU may have died since: see ``VM.alive``)
    CLOSED = "closed"  # closed, checkpointed or detached: nothing of it is managed any more


VM_TRANSITIONS: Transitions[Runstate] = {
    Runstate.CREATED: {Runstate.BOOTING, Runstate.CLOSED},
    Runstate.BOOTING: {Runstate.RUNNING, Runstate.CLOSED},
    Runstate.RUNNING: {Runstate.CLOSED},
    Runstate.CLOSED: set(),
}

#: Where guest operations are defined: once launch() returned, so RUNNING,
#: or CLOSED since (they then raise VMError: another thread may have closed it).
LAUNCHED = (Runstate.RUNNING, Runstate.CLOSED)
