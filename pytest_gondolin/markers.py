"""Validating ``@pytest.mark.sandboxed(...)`` arguments at collection time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

import pytest_gondolin.config as cfg
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import GuestKey, VMFactory

#: Marker keywords and what they are for (network ones are applied by the host).
GUEST_KEYWORDS = ("memory", "cpus", "image")
HOST_KEYWORDS = (
    "allow_hosts",
    "resolve",
    "secrets",
    "block_internal",
    "upstream_ca",
    "cassette",
    "timeout",
)
KEYWORDS = GUEST_KEYWORDS + HOST_KEYWORDS


@dataclass(frozen=True)
class SandboxOptions:
    guest: GuestKey
    timeout: float | None
    network: dict[str, Any] = field(default_factory=dict)


def sandbox_options(item: pytest.Item, factory: VMFactory) -> SandboxOptions:
    """Merge every ``sandboxed`` marker on ``item`` (closest wins) and validate it.

    Raises ConfigError naming the test, the argument and the bad value.
    """
    merged: dict[str, Any] = {}
    for marker in reversed(list(item.iter_markers("sandboxed"))):
        if marker.args:
            raise ConfigError(
                f"{item.nodeid}: @pytest.mark.sandboxed takes keyword arguments only, got {marker.args!r}"
            )
        unknown = sorted(set(marker.kwargs) - set(KEYWORDS))
        if unknown:
            raise ConfigError(
                f"{item.nodeid}: @pytest.mark.sandboxed got unknown argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(KEYWORDS)}"
            )
        merged.update(marker.kwargs)
    where = f"{item.nodeid}: sandboxed"
    guest = factory.guest_key(
        memory=merged.get("memory"),
        cpus=merged.get("cpus"),
        image=merged.get("image"),
        source=where,
    )
    timeout: float | None = factory.settings.timeout
    if merged.get("timeout") is not None:
        timeout = cfg.parse_number(
            merged["timeout"],
            f"{where}(timeout=...)",
            kind=float,
            low=0.001,
            high=7 * 24 * 3600,
            what="timeout",
        )
    network = {k: merged[k] for k in HOST_KEYWORDS if k in merged and k != "timeout"}
    if network:
        from pytest_gondolin.netpolicy.http.policy import NetworkPolicy

        try:
            NetworkPolicy.from_options(**{k: v for k, v in network.items() if k != "cassette"})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return SandboxOptions(guest=guest, timeout=timeout, network=network)
