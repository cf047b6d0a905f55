"""pytest-gondolin: run tests inside disposable QEMU micro-VMs.

The public API is re-exported here lazily so that importing the package
(as the pytest plugin does at start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gondolin.errors import GondolinError
    from pytest_gondolin.netpolicy.http.secrets import Secret
    from pytest_gondolin.vm.commands import ExecResult
    from pytest_gondolin.vm.identity import Snapshot
    from pytest_gondolin.vm.machine import VM, Checkpoint

__version__ = "0.1.0"

__all__ = ["VM", "Checkpoint", "ExecResult", "GondolinError", "Secret", "Snapshot", "__version__"]

_LAZY = {
    "GondolinError": "pytest_gondolin.errors",
    "Secret": "pytest_gondolin.netpolicy.http.secrets",
    "VM": "pytest_gondolin.vm.machine",
    "Checkpoint": "pytest_gondolin.vm.machine",
    "ExecResult": "pytest_gondolin.vm.commands",
    "Snapshot": "pytest_gondolin.vm.identity",
}


def __getattr__(name: str) -> Any:
    # Lazy: the guest imports this package with only its stdlib-only half present.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_gondolin' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
