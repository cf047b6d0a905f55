"""A VM's network for one test or one ``vm_factory`` VM: policy, secrets and cassette.

:func:`apply_network` is the one place that puts a built
:class:`~pytest_gondolin.netpolicy.http.policy.NetworkPolicy` and an
optional cassette on a VM; the ``vm_factory`` fixture
(:mod:`pytest_gondolin.fixtures`) and sandboxed tests
(:mod:`pytest_gondolin.sandbox.guest_worker`) both call it, so the two
cannot drift. Nothing here touches the guest: no reboot, no restore.

The network stack is imported when a cassette is first opened, so the
plugin's start-up never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.secrets import SecretStore
    from pytest_gondolin.vm.machine import VM

__all__ = ["apply_network"]


def apply_network(
    vm: VM,
    policy: NetworkPolicy | None,
    *,
    cassette: Path | None = None,
    record_mode: str = "none",
) -> CassettePlayer | None:
    """Mediate ``vm``'s traffic by ``policy`` (``None``: deny all) from now on.

    Guarantees afterwards: ``vm.http`` is a fresh recorder that redacts the
    policy's secrets; later ``exec`` environments (and a sandboxed run's)
    get the secrets' placeholders (``vm.secret_env()``); with ``cassette``
    (a resolved path), allowed requests are replayed from it or recorded
    into it per ``record_mode``, redacted with the same secret store. The
    player is returned: the caller decides when it is saved and checked
    (after a test, or when the VM closes).

    Raises VMError if ``vm`` has no network driver, ConfigError for a bad
    record mode and CassetteError for an unreadable cassette file.
    """
    if cassette is None:
        vm.configure_network(policy)
        return None
    from pytest_gondolin.netpolicy.http.cassette import open_cassette

    opened: list[CassettePlayer] = []

    def open_player(store: SecretStore | None) -> CassettePlayer:
        # The cassette redacts with the store whose placeholders the guest sees.
        player = open_cassette(cassette, record_mode, secret_store=store)
        opened.append(player)
        return player

    vm.configure_network(policy, open_cassette=open_player)
    return opened[0]
