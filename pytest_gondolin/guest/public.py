"""The package's public names as the guest has them.

The guest's copy of ``pytest_gondolin`` is this folder and the package's
``__init__`` only, yet a test module (or conftest) holding both sandboxed
tests and host-side VM tests is imported there too, and may name any public
name at its top level: ``from pytest_gondolin import VM, Secret``,
``SECRETS = {"T": Secret(value=..., hosts=[...])}``, ``def test(vm: VM)``.
So ``pytest_gondolin`` resolves its public names here when its host half is
absent:

* the values are the real classes: :class:`~.secret.Secret` and the error
  tree (:mod:`.errors`, which the guest also has as ``pytest_gondolin.errors``);
* ``VM``, ``Checkpoint``, ``ExecResult`` and ``Snapshot`` drive or describe
  VMs from the host. Here they are stand-ins that can be imported, named
  and used in annotations or ``isinstance``; making one (``VM(...)``,
  ``VM.launch(...)``, ``Checkpoint.load(...)``) raises
  :class:`~.errors.HostOnlyError`, which says to use it from a test that is
  not sandboxed.
"""

from __future__ import annotations

from typing import Any, NoReturn

from pytest_gondolin.guest.errors import GondolinError, HostOnlyError
from pytest_gondolin.guest.secret import Secret

__all__ = ["VM", "Checkpoint", "ExecResult", "GondolinError", "Secret", "Snapshot"]


class _HostOnly:
    """A host-side class as the guest has it: a name, never an object."""

    #: What the class does on the host, for the error message.
    role = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise HostOnlyError(f"pytest_gondolin.{cls.__name__}", cls.role)


class VM(_HostOnly):
    """Host-side: a QEMU guest driven from the host (``vm``, ``vm_factory``, ``VM.launch``)."""

    role = "boots and drives a VM from the host"

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise HostOnlyError("pytest_gondolin.VM.launch", cls.role)


class Checkpoint(_HostOnly):
    """Host-side: a disk-only checkpoint file that boots new VMs."""

    role = "boots VMs from a checkpoint file on the host"

    @classmethod
    def load(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise HostOnlyError("pytest_gondolin.Checkpoint.load", cls.role)


class ExecResult(_HostOnly):
    """Host-side: what a command run with ``VM.exec`` did."""

    role = "is what VM.exec returns on the host"


class Snapshot(_HostOnly):
    """Host-side: a full-VM snapshot held by a VM on the host."""

    role = "is a snapshot a VM holds on the host"
