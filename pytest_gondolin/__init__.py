"""pytest-gondolin: run tests inside disposable QEMU micro-VMs.

The public API is re-exported here lazily so that importing the package
(as the pytest plugin does at start-up) stays cheap.

The guest imports this package too, with only its guest half present (the
boot payload ships this file and ``guest/``): a module holding sandboxed
tests is collected there, and may import any public name for its host-side
tests. There the names come from :mod:`pytest_gondolin.guest.public` (the
real ``Secret`` and errors, stand-ins for the host-only classes) and
``pytest_gondolin.errors`` is :mod:`pytest_gondolin.guest.errors`.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gondolin.errors import GondolinError
    from pytest_gondolin.netpolicy.http.secrets import Secret
    from pytest_gondolin.vm.commands import ExecResult
    from pytest_gondolin.vm.identity import Snapshot
    from pytest_gondolin.vm.machine import VM, Checkpoint

__version__ = "0.1.0"

__all__ = ["VM", "Checkpoint", "ExecResult", "GondolinError", "Secret", "Snapshot", "__version__"]

#: Where each public name lives on the host.
_LAZY = {
    "GondolinError": "pytest_gondolin.errors",
    "Secret": "pytest_gondolin.netpolicy.http.secrets",
    "VM": "pytest_gondolin.vm.machine",
    "Checkpoint": "pytest_gondolin.vm.machine",
    "ExecResult": "pytest_gondolin.vm.commands",
    "Snapshot": "pytest_gondolin.vm.identity",
}
#: Where every public name lives in the guest.
_GUEST_API = "pytest_gondolin.guest.public"

#: Whether this copy of the package has only its guest half (the guest's).
GUEST_HALF_ONLY = PathFinder.find_spec(f"{__name__}.plugin", __path__) is None

if GUEST_HALF_ONLY:
    from pytest_gondolin.guest import errors

    # ``import pytest_gondolin.errors`` finds it here before looking for a file.
    sys.modules[f"{__name__}.errors"] = errors


def __getattr__(name: str) -> Any:
    # Lazy: the host's modules are imported when a name is first used.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_gondolin' has no attribute {name!r}")
    return getattr(importlib.import_module(_GUEST_API if GUEST_HALF_ONLY else module), name)
