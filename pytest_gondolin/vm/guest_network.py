"""Where a VM meets the network stack: its driver started, a policy applied, its state reset.

The stack (:mod:`pytest_gondolin.netpolicy`) is imported inside these
functions, when a guest first needs it, so the plugin's start-up and VMs
without a network never load it. Its errors are mapped at this boundary:
NetworkPolicyError becomes VMLaunchError at start and SnapshotError on a
restore.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from pytest_gondolin.errors import NetworkPolicyError, SnapshotError, VMLaunchError
from pytest_gondolin.vm.guest_ca import guest_ca

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.driver import NetworkDriver
    from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.recorder import Recorder
    from pytest_gondolin.netpolicy.http.secrets import SecretStore

__all__ = ["CassetteOpener", "apply_policy", "reset_network", "secret_env", "start_network"]

#: Opens a cassette that redacts with the given secret store (the one whose
#: placeholders the guest is about to see).
CassetteOpener: TypeAlias = "Callable[[SecretStore | None], CassettePlayer]"


def start_network(socket_path: Path, *, mtu: int, name: str) -> NetworkDriver:
    """A driver listening on ``socket_path`` with the deny-all policy; VMLaunchError if it cannot.

    Its TLS interception uses :func:`~pytest_gondolin.vm.guest_ca.guest_ca`,
    the CA in the guest's boot payload (CacheDirError if the cache has none).
    """
    from pytest_gondolin.netpolicy.driver import NetworkDriver

    try:
        return NetworkDriver(socket_path, ca=guest_ca(), mtu=mtu, name=name)
    except NetworkPolicyError as exc:
        raise VMLaunchError(f"cannot start the guest network: {exc}") from exc


def apply_policy(
    driver: NetworkDriver, policy: NetworkPolicy | None, open_cassette: CassetteOpener | None
) -> Recorder:
    """Mediate by ``policy`` (None: deny all) from now on; return the fresh recorder.

    The recorder redacts the policy's secrets; the driver keeps their store,
    so :func:`secret_env` gives their placeholders. ``open_cassette`` is
    given that same store; the driver is configured once, with all of it.
    """
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.recorder import Recorder
    from pytest_gondolin.netpolicy.http.secrets import SecretStore

    policy = policy if policy is not None else NetworkPolicy()
    store = SecretStore(policy.secrets) if policy.secrets else None
    recorder = Recorder(redactor=store)
    cassette = open_cassette(store) if open_cassette is not None else None
    driver.configure(policy, store, recorder, cassette)
    return recorder


def reset_network(driver: NetworkDriver, context: str) -> Recorder:
    """Forget every flow and recording (a snapshot was restored); return the driver's recorder.

    SnapshotError (prefixed with ``context``) if the driver cannot reset.
    """
    try:
        driver.reset()
    except NetworkPolicyError as exc:
        raise SnapshotError(f"{context}: {exc}") from exc
    return driver.recorder


def secret_env(driver: NetworkDriver | None) -> dict[str, str]:
    """``{NAME: placeholder}`` for the secrets of ``driver``'s policy (empty without secrets)."""
    store = driver.secrets if driver is not None else None
    return store.env() if store is not None else {}
