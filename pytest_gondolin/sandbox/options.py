"""``@pytest.mark.sandboxed(...)`` as a value: validated once, at collection.

:class:`SandboxOptions` is everything a sandboxed item's run needs from its
markers and the session's settings (ini < env < CLI, resolved by
:mod:`pytest_gondolin.config`; the marker wins): the guest it runs in, its
timeout (the smaller of ``sandboxed(timeout=...)`` and pytest-timeout's), its network policy (built here, once per item) and its cassette
file. A bad argument is a :class:`~pytest_gondolin.errors.ConfigError`
naming the test, the argument and the value, raised before anything boots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

import pytest_gondolin.config as cfg
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import GuestKey
from pytest_gondolin.netpolicy.http.cassette_paths import resolve_cassette_option
from pytest_gondolin.sandbox.timeout_plugin import plugin_timeout

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy

__all__ = ["GUEST_KEYWORDS", "HOST_KEYWORDS", "KEYWORDS", "SandboxOptions", "sandbox_options"]

#: Marker keywords that change the guest itself (a separate prepared worker each).
GUEST_KEYWORDS: Final = ("memory", "cpus", "image", "system_packages")
#: Marker keywords the host applies around each run (no guest change).
HOST_KEYWORDS: Final = (
    "allow_hosts",
    "resolve",
    "secrets",
    "block_internal",
    "upstream_ca",
    "cassette",
    "timeout",
    "tcp",
    "isolation",
)
KEYWORDS: Final = GUEST_KEYWORDS + HOST_KEYWORDS
#: The keywords that make up the network policy (``NetworkPolicy.from_options``).
POLICY_KEYWORDS: Final = (
    "allow_hosts",
    "resolve",
    "secrets",
    "block_internal",
    "upstream_ca",
    "tcp",
)
#: Longest per-test timeout a marker may ask for (a week).
MAX_TIMEOUT: Final = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SandboxOptions:
    """One sandboxed item's validated options.

    ``guest`` picks the prepared worker; ``timeout`` bounds the run (``None``:
    the runner's default); ``policy`` is what the guest may reach during the
    run (``None``: deny all egress); ``cassette`` is the resolved file that
    replays and records its allowed requests.
    """

    guest: GuestKey
    timeout: float | None = None
    policy: NetworkPolicy | None = None
    cassette: Path | None = None
    #: How the test is kept apart from the others: "vm" or "process" (docs/isolation.md).
    isolation: str = "vm"


def sandbox_options(item: pytest.Item, settings: cfg.Settings) -> SandboxOptions:
    """The options of ``item`` from its ``sandboxed`` markers (the closest wins) and ``settings``.

    pytest-timeout's timeout for the item (:func:`~.timeout_plugin.plugin_timeout`)
    bounds the run too: the smaller of it and the sandboxed timeout wins.
    Raises ConfigError naming the test, the argument and the bad value.
    """
    options = options_from_marks(
        list(item.iter_markers("sandboxed")), settings, nodeid=item.nodeid, item=item
    )
    extra = plugin_timeout(item)
    if extra is None:
        return options
    return replace(options, timeout=min(extra, options.timeout or MAX_TIMEOUT))


def options_from_marks(
    marks: Sequence[pytest.Mark],
    settings: cfg.Settings,
    *,
    nodeid: str,
    item: pytest.Item | None = None,
) -> SandboxOptions:
    """Merge ``marks`` (closest first, as ``Item.iter_markers`` gives them) and validate them.

    ``item`` places a relative or default (``cassette=True``) cassette next
    to its test file. Raises ConfigError naming ``nodeid``, the argument and
    the bad value.
    """
    merged: dict[str, Any] = {}
    for mark in reversed(marks):
        if mark.args:
            raise ConfigError(
                f"{nodeid}: @pytest.mark.sandboxed takes keyword arguments only, got {mark.args!r}"
            )
        unknown = sorted(set(mark.kwargs) - set(KEYWORDS))
        if unknown:
            raise ConfigError(
                f"{nodeid}: @pytest.mark.sandboxed got unknown argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(KEYWORDS)}"
            )
        merged.update(mark.kwargs)
    where = f"{nodeid}: sandboxed"
    guest = GuestKey.from_options(
        settings,
        memory=merged.get("memory"),
        cpus=merged.get("cpus"),
        image=merged.get("image"),
        system_packages=merged.get("system_packages"),
        source=where,
    )
    timeout = settings.timeout
    if merged.get("timeout") is not None:
        timeout = cfg.parse_number(
            merged["timeout"],
            f"{where}(timeout=...)",
            kind=float,
            low=0.001,
            high=MAX_TIMEOUT,
            what="timeout",
        )
    return SandboxOptions(
        guest=guest,
        timeout=timeout,
        policy=_policy(
            {k: merged[k] for k in POLICY_KEYWORDS if k in merged}, where, tcp=settings.tcp
        ),
        cassette=resolve_cassette_option(merged.get("cassette"), where=where, item=item),
        isolation=cfg.parse_choice(
            settings.isolation if merged.get("isolation") is None else merged["isolation"],
            f"{where}(isolation=...)",
            cfg.ISOLATION_MODES,
            "isolation",
        ),
    )


def _policy(
    options: dict[str, Any], where: str, *, tcp: tuple[tuple[str, str], ...] = ()
) -> NetworkPolicy | None:
    """The policy ``options`` ask for; ``None`` (deny all) when they ask for nothing.

    ``tcp`` are the session's services (``gondolin_tcp``), under the marker's own.
    """
    if not options and not tcp:
        return None
    # Imported here: a session without network options never loads the policy code.
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.tcp_services import merge_tcp_services

    if tcp:
        options = {**options, "tcp": merge_tcp_services(dict(tcp), options.get("tcp"))}

    try:
        return NetworkPolicy.from_options(**options)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # e.g. resolve="a:1" (not a mapping)
        names = ", ".join(sorted(options))
        raise ConfigError(f"{where}: bad network option ({names}): {exc}") from exc
