"""The guest's only network peer: a userspace network on the host.

Two sans-IO layers, and the two modules that join them into a running peer:

* :mod:`.stack` -- the packet stack (Ethernet to TCP, and DNS); it
  imports nothing from the HTTP layer (``tests/unit/test_layout.py``);
* :mod:`.http` -- the HTTP layer (sniffing, TLS interception, policy,
  secrets, upstream, recorder, cassettes), sans-IO apart from the
  upstream client it calls;
* :mod:`.relay` -- joins the stack's flows to the HTTP layer's proxies;
* :mod:`.streams` -- raw TCP streams: ``tcp=`` services, ``VM.forward``
  ingress and WebSocket sessions after their 101;
* :mod:`.driver` -- :class:`NetworkDriver`, the owner of the loop thread
  and its timeouts, bounded by :class:`~.limits.DriverLimits`; it drives
  :mod:`.qemu_socket` (the socket QEMU connects to) and
  :mod:`.upstream_pool` (the upstream fetches' worker threads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.driver import NetworkDriver
    from pytest_gondolin.netpolicy.http.ca import CertificateAuthority, default_ca
    from pytest_gondolin.netpolicy.http.cassette import CassettePlayer, open_cassette
    from pytest_gondolin.netpolicy.http.cassette_paths import resolve_cassette_option
    from pytest_gondolin.netpolicy.http.cassette_values import CassetteError, CassetteMismatch
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.recorder import Exchange, Recorder
    from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
    from pytest_gondolin.netpolicy.limits import DriverLimits

__all__ = [
    "CassetteError",
    "CassetteMismatch",
    "CassettePlayer",
    "CertificateAuthority",
    "DriverLimits",
    "Exchange",
    "NetworkDriver",
    "NetworkPolicy",
    "Recorder",
    "Secret",
    "SecretStore",
    "default_ca",
    "open_cassette",
    "resolve_cassette_option",
]

# Lazy: importing one module of the package (as the plugin does at start-up)
# must load neither the stack nor TLS.
_LAZY = {
    "NetworkDriver": "pytest_gondolin.netpolicy.driver",
    "DriverLimits": "pytest_gondolin.netpolicy.limits",
    "CertificateAuthority": "pytest_gondolin.netpolicy.http.ca",
    "default_ca": "pytest_gondolin.netpolicy.http.ca",
    "CassettePlayer": "pytest_gondolin.netpolicy.http.cassette",
    "open_cassette": "pytest_gondolin.netpolicy.http.cassette",
    "resolve_cassette_option": "pytest_gondolin.netpolicy.http.cassette_paths",
    "CassetteError": "pytest_gondolin.netpolicy.http.cassette_values",
    "CassetteMismatch": "pytest_gondolin.netpolicy.http.cassette_values",
    "NetworkPolicy": "pytest_gondolin.netpolicy.http.policy",
    "Exchange": "pytest_gondolin.netpolicy.http.recorder",
    "Recorder": "pytest_gondolin.netpolicy.http.recorder",
    "Secret": "pytest_gondolin.netpolicy.http.secrets",
    "SecretStore": "pytest_gondolin.netpolicy.http.secrets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
