"""Named TCP services: the ``tcp={"name:port": "addr:port"}`` network option.

An entry lets the guest open a raw TCP stream to ``name:port`` and has the
host relay it to ``addr:port`` (a database, a cache, anything the test
runs). It is the only raw TCP the guest gets: every other name and port
stays denied. Like a ``resolve`` entry, it is an explicit intent, so its
target may be internal (``127.0.0.1``) whatever ``block_internal`` says.

The target must be an IP address (or ``localhost``, meaning ``127.0.0.1``):
the host connects to it from its network loop, which must never wait on a
DNS lookup. Validated completely by :func:`parse_tcp_services`, which fails
with a :class:`~pytest_gondolin.errors.ConfigError` naming the entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.rules import (
    format_authority,
    is_ip_literal,
    normalize_host,
    split_host_port,
)

__all__ = ["TcpService", "merge_tcp_services", "parse_tcp_services"]


@dataclass(frozen=True)
class TcpService:
    """One validated ``tcp`` entry: ``name:port`` relayed to ``target_ip:target_port``."""

    key: str
    name: str
    port: int
    target_ip: str
    target_port: int

    @property
    def target(self) -> str:
        """``addr:port`` of the target, IPv6 bracketed."""
        return format_authority(self.target_ip, self.target_port)


def _split(text: str, where: str, what: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(text.strip())
    except NetworkPolicyError as exc:
        raise ConfigError(f"{where}: {exc} (ports are 1..65535)") from None
    if port is None:
        raise ConfigError(f"{where}: {text!r} needs a port, like {what}")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} of {text!r} is outside 1..65535")
    return host, port


def _parse_entry(key: object, value: object) -> TcpService:
    where = f"tcp[{key!r}]"
    if not isinstance(key, str):
        raise ConfigError(
            f"{where}: the key must be a 'name:port' string, got {type(key).__name__}"
        )
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the value must be an 'addr:port' string, got {value!r}")
    raw_name, port = _split(key, where, "'db.test:5432'")
    if "*" in raw_name:
        raise ConfigError(f"{where}: wildcards are not supported in tcp keys")
    try:
        name = normalize_host(raw_name)
    except NetworkPolicyError:
        raise ConfigError(f"{where}: {raw_name!r} is not a valid host name") from None
    if is_ip_literal(name):
        raise ConfigError(
            f"{where}: give a name the guest looks up ('db.test:5432'), not an address"
        )
    raw_target, target_port = _split(value, where, "'127.0.0.1:5432'")
    target = raw_target.strip("[]")
    if target.lower() == "localhost":
        target = "127.0.0.1"
    try:
        target = str(ipaddress.ip_address(target))
    except ValueError:
        raise ConfigError(
            f"{where}: the target {value!r} must be an IP address and port "
            "('127.0.0.1:5432'), not a name: the host never waits on DNS for it"
        ) from None
    return TcpService(key, name, port, target, target_port)


def parse_tcp_services(services: object) -> dict[tuple[str, int], TcpService]:
    """Validate a ``tcp`` option into ``{(name, port): TcpService}``.

    Raises :class:`ConfigError` naming the bad entry: not a dict, a key
    without a port, a port outside 1..65535, a non-string key or value, a
    target that is not an address, a duplicate after normalisation.
    """
    if not isinstance(services, Mapping):
        raise ConfigError(f"tcp: expected a dict of 'name:port' -> 'addr:port', got {services!r}")
    entries: dict[tuple[str, int], TcpService] = {}
    for key, value in services.items():
        entry = _parse_entry(key, value)
        earlier = entries.get((entry.name, entry.port))
        if earlier is not None:
            raise ConfigError(f"tcp[{key!r}]: duplicates tcp[{earlier.key!r}]")
        entries[entry.name, entry.port] = entry
    return entries


def _name_and_port(key: object) -> tuple[str, int] | None:
    """The normalised ``(name, port)`` of a ``tcp`` key, or ``None`` if it does not parse."""
    if not isinstance(key, str):
        return None
    try:
        raw_name, port = split_host_port(key.strip())
        return (normalize_host(raw_name), port) if port is not None else None
    except NetworkPolicyError:
        return None


def merge_tcp_services(base: Mapping[str, str], override: object) -> Any:
    """The session's ``base`` services (ini/env) under a marker's or ``vm_factory``'s ``override``.

    Both apply; for the same name and port (after normalisation) the
    override's entry wins. An ``override`` of ``None`` is ``base`` alone; one
    that is not a mapping is returned as is, and keys that do not parse are
    kept, so :func:`parse_tcp_services` reports them naming the entry
    (hence ``Any``: the result is validated there, not here).
    """
    if override is None:
        return dict(base)
    if not base or not isinstance(override, Mapping):
        return override
    taken = {_name_and_port(key) for key in override}
    merged = {key: value for key, value in base.items() if _name_and_port(key) not in taken}
    merged.update(override)
    return merged
