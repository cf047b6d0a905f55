"""pytest-gondolin: run tests inside disposable QEMU micro-VMs.

The public API is re-exported here lazily so that importing the package
(as the pytest plugin does at start-up) stays cheap.
"""

from __future__ import annotations

from pytest_gondolin.errors import GondolinError

__version__ = "0.1.0"

__all__ = ["GondolinError", "__version__"]
