"""Network policy: which destinations the guest may reach, decided on the host.

A :class:`NetworkPolicy` is built from the public network options (see
DESIGN.md, "Network options") and validated completely at construction, so
a typo fails the test run early with a :class:`~pytest_gondolin.errors.ConfigError`
naming the option and the bad value, never later as a mysterious denial.

Hosts and host patterns are compared as :mod:`.rules` defines them.

Decision order in :meth:`NetworkPolicy.decide` (first match wins):

1. an invalid host name or a scheme other than http/https is denied;
2. a ``resolve`` entry for exactly ``host:port`` allows it (writing an
   explicit upstream is an explicit intent to reach it; it is also the only
   way to reach an internal address while ``block_internal`` is on);
3. with ``block_internal``, IP literals in internal ranges
   (:func:`is_internal`) and ``localhost`` names (RFC 6761 §6.3) are denied;
4. the first matching ``allow_hosts`` entry allows;
5. everything else is denied (default: deny all egress).

Names that resolve to internal addresses are caught at connect time by
:func:`resolve_upstream`, which checks the addresses actually returned by
DNS (a name may be rebound between the decision and the connect). There
``block_internal`` also refuses the host's own addresses, whatever their
range (:mod:`.hostaddrs`, read at connect time): a public address of the
host reaches its services as surely as ``127.0.0.1`` does.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.hostaddrs import HOST_ADDRESSES, HostAddresses
from pytest_gondolin.netpolicy.http.internal_ranges import IPAddress, internal_range, is_internal
from pytest_gondolin.netpolicy.http.rules import (
    HostPattern,
    format_authority,
    is_ip_literal,
    normalize_host,
    parse_host_pattern,
    split_host_port,
)
from pytest_gondolin.netpolicy.http.secrets import Secret, check_secret_name
from pytest_gondolin.netpolicy.http.tcp_services import TcpService, parse_tcp_services

__all__ = [
    "Decision",
    "IPAddress",
    "NetworkPolicy",
    "internal_range",
    "is_internal",
    "resolve_upstream",
]

log = logging.getLogger(__name__)

#: Schemes the host mediates (WebSocket upgrades ride on ``http``; raw TCP
#: reaches only ``tcp=`` services, :mod:`.tcp_services`). Anything else is denied.
MEDIATED_SCHEMES: Final = frozenset({"http", "https"})


# --------------------------------------------------------------------------- names


def _is_localhost_name(host: str) -> bool:
    # RFC 6761 §6.3: "localhost." and names below it are the loopback host.
    return host == "localhost" or host.endswith(".localhost")


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`NetworkPolicy.decide`.

    ``reason`` is a short sentence for logs, records and the guest's 403
    page; ``rule`` names what decided: the ``allow_hosts`` entry as written,
    ``resolve['host:port']``, or one of ``block_internal``,
    ``default-deny``, ``invalid-host``, ``scheme``.
    """

    allowed: bool
    reason: str
    rule: str | None


@dataclass(frozen=True)
class _ResolveEntry:
    key: str
    host: str
    port: int
    target_host: str
    target_port: int


def _parse_resolve(key: object, value: object) -> _ResolveEntry:
    where = f"resolve[{key!r}]"
    if not isinstance(key, str):
        raise ConfigError(f"{where}: the key must be a 'host:port' string")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the value must be an 'addr:port' string, got {value!r}")
    try:
        raw_host, port = split_host_port(key.strip())
    except NetworkPolicyError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if port is None:
        raise ConfigError(f"{where}: {key!r} needs a port, like curl --resolve ('host:443')")
    if "*" in raw_host:
        raise ConfigError(f"{where}: wildcards are not supported in resolve keys")
    try:
        host = normalize_host(raw_host)
    except NetworkPolicyError:
        raise ConfigError(f"{where}: {key!r} is not a valid host name") from None
    try:
        raw_target, target_port = split_host_port(value.strip())
        target_host = normalize_host(raw_target)
    except NetworkPolicyError:
        raise ConfigError(f"{where}: {value!r} is not a valid 'addr:port' upstream") from None
    return _ResolveEntry(
        key=key,
        host=host,
        port=port,
        target_host=target_host,
        target_port=port if target_port is None else target_port,
    )


@dataclass(frozen=True)
class NetworkPolicy:
    """What the guest may reach; immutable and validated on construction.

    Fields mirror the public options: ``allow_hosts`` (patterns, default
    none: deny all), ``block_internal``, ``resolve`` (``{"host:port":
    "addr:port"}``; the port of the value defaults to the key's),
    ``upstream_ca`` (an extra PEM CA file trusted for upstreams, besides the
    system store), ``secrets`` (name -> :class:`Secret`) and ``tcp``
    (``{"name:port": "addr:port"}``: named raw-TCP services,
    :mod:`.tcp_services`).

    Raises :class:`ConfigError` naming the option and the bad value.
    """

    allow_hosts: Sequence[str] = ()
    block_internal: bool = True
    resolve: Mapping[str, str] = field(default_factory=dict)
    upstream_ca: str | os.PathLike[str] | None = None
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    tcp: Mapping[str, str] = field(default_factory=dict)

    _tcp: dict[tuple[str, int], TcpService] = field(init=False, repr=False, compare=False)
    _patterns: tuple[HostPattern, ...] = field(init=False, repr=False, compare=False)
    _resolve: dict[tuple[str, int], _ResolveEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow_hosts, str | bytes) or not isinstance(self.allow_hosts, Sequence):
            raise ConfigError(
                f"allow_hosts: expected a list of host names, got {self.allow_hosts!r}"
            )
        patterns = tuple(
            parse_host_pattern(text, where=f"allow_hosts[{i}]")
            for i, text in enumerate(self.allow_hosts)
        )
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        object.__setattr__(self, "_patterns", patterns)

        if not isinstance(self.block_internal, bool):
            raise ConfigError(
                f"block_internal: expected True or False, got {self.block_internal!r}"
            )

        if not isinstance(self.resolve, Mapping):
            raise ConfigError(
                f"resolve: expected a dict of 'host:port' -> 'addr:port', got {self.resolve!r}"
            )
        entries: dict[tuple[str, int], _ResolveEntry] = {}
        for key, value in self.resolve.items():
            entry = _parse_resolve(key, value)
            if (entry.host, entry.port) in entries:
                raise ConfigError(
                    f"resolve[{key!r}]: duplicates resolve[{entries[entry.host, entry.port].key!r}]"
                )
            entries[entry.host, entry.port] = entry
        object.__setattr__(self, "resolve", dict(self.resolve))
        object.__setattr__(self, "_resolve", entries)

        if self.upstream_ca is not None:
            object.__setattr__(self, "upstream_ca", _check_ca_file(self.upstream_ca))

        if not isinstance(self.secrets, Mapping):
            raise ConfigError(f"secrets: expected a dict of NAME -> Secret, got {self.secrets!r}")
        for name, secret in self.secrets.items():
            check_secret_name(name, where=f"secrets[{name!r}]")
            if not isinstance(secret, Secret):
                raise ConfigError(
                    f"secrets[{name!r}]: expected a Secret(value=..., hosts=[...]), "
                    f"got {type(secret).__name__}"
                )
            for i, text in enumerate(secret.hosts):
                parse_host_pattern(text, where=f"secrets[{name!r}].hosts[{i}]")
        object.__setattr__(self, "secrets", dict(self.secrets))
        object.__setattr__(self, "_tcp", parse_tcp_services(self.tcp))
        object.__setattr__(self, "tcp", dict(self.tcp))

    def __hash__(self) -> int:
        # The mappings are private copies, so hashing their items is stable.
        return hash(
            (
                self.allow_hosts,
                self.block_internal,
                tuple(sorted(self.resolve.items())),
                self.upstream_ca,
                tuple(sorted(self.secrets.items(), key=lambda item: item[0])),
                tuple(sorted(self.tcp.items())),
            )
        )

    @classmethod
    def from_options(
        cls,
        *,
        allow_hosts: Sequence[str] = (),
        block_internal: bool = True,
        resolve: Mapping[str, str] | None = None,
        upstream_ca: str | os.PathLike[str] | None = None,
        secrets: Mapping[str, Secret | Sequence[str]] | None = None,
        tcp: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NetworkPolicy:
        """Build a policy from marker / ``vm_factory`` options.

        In ``secrets`` a plain host list stands for a :class:`Secret` whose
        value is the host environment variable of the same name (``environ``,
        default ``os.environ``); a missing variable is a :class:`ConfigError`.
        """
        converted: dict[str, Secret] = {}
        for name, spec in (secrets or {}).items():
            if isinstance(spec, Secret):
                converted[name] = spec
            else:
                converted[name] = Secret.from_env(name, spec, environ=environ)
        return cls(
            allow_hosts=allow_hosts,
            block_internal=block_internal,
            resolve=dict(resolve or {}),
            upstream_ca=upstream_ca,
            secrets=converted,
            tcp={} if tcp is None else tcp,
        )

    @property
    def upstream_ca_path(self) -> Path | None:
        """The validated ``upstream_ca`` as a :class:`Path` (``None`` if unset)."""
        return None if self.upstream_ca is None else Path(self.upstream_ca)

    def resolve_target(self, host: str, port: int) -> tuple[str, int] | None:
        """The explicit upstream ``resolve`` maps normalised ``host:port`` to, if any."""
        entry = self._resolve.get((host, port))
        return None if entry is None else (entry.target_host, entry.target_port)

    def tcp_service(self, name: str | None, port: int) -> TcpService | None:
        """The ``tcp`` entry for the name the guest looked up and the port it dialled."""
        return None if name is None else self._tcp.get((name, port))

    def knows_name(self, name: str) -> bool:
        """Whether some request or stream to ``name`` could be allowed, on any port.

        The synthetic DNS answers only these names (NXDOMAIN otherwise): a
        ``resolve`` or ``tcp`` entry's host, or a name an ``allow_hosts``
        pattern matches (``*``: every name) unless ``block_internal``
        refuses it (``localhost`` names). Never raises.
        """
        try:
            host = normalize_host(name)
        except NetworkPolicyError:
            return False
        if any(h == host for h, _ in self._resolve) or any(n == host for n, _ in self._tcp):
            return True
        if is_ip_literal(host) or (self.block_internal and _is_localhost_name(host)):
            return False
        return any(p.matches(host, p.port) for p in self._patterns)

    def decide(self, host: str, port: int, scheme: str) -> Decision:
        """Decide whether the guest may reach ``scheme://host:port``.

        Pure and total: never raises, whatever the (hostile) input.
        """
        where = f"{scheme}://{format_authority(host, port)}" if isinstance(host, str) else "?"
        if scheme not in MEDIATED_SCHEMES:
            return Decision(
                False, f"{scheme!r} traffic is not mediated (only http/https)", "scheme"
            )
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            return Decision(False, f"{where}: invalid port", "invalid-host")
        try:
            name = normalize_host(host)
        except NetworkPolicyError:
            return Decision(False, f"{host!r} is not a valid host name", "invalid-host")
        authority = format_authority(name, port)
        entry = self._resolve.get((name, port))
        if entry is not None:
            return Decision(
                True, f"{authority} has an explicit resolve entry", f"resolve[{entry.key!r}]"
            )
        if self.block_internal:
            if is_ip_literal(name):
                rng = internal_range(name)
                if rng is not None:
                    return Decision(
                        False,
                        f"{authority} is an internal address ({rng}); "
                        "blocked by block_internal=True (use resolve= to reach it)",
                        "block_internal",
                    )
            elif _is_localhost_name(name):
                return Decision(
                    False,
                    f"{authority} names the loopback host; blocked by block_internal=True "
                    "(use resolve= to reach it)",
                    "block_internal",
                )
        for pattern in self._patterns:
            if pattern.matches(name, port):
                return Decision(
                    True, f"{authority} matches allow_hosts entry {pattern.text!r}", pattern.text
                )
        if not self._patterns:
            return Decision(
                False,
                f"{authority} is not allowed: allow_hosts is empty (all egress is denied by default)",
                "default-deny",
            )
        return Decision(False, f"{authority} is not in allow_hosts", "default-deny")


def _check_ca_file(path: object) -> str:
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(f"upstream_ca: expected a path to a PEM file, got {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ConfigError(f"upstream_ca: expected a text path, got {path!r}")
    if not os.path.isfile(text):
        raise ConfigError(f"upstream_ca: {text!r} is not a file")
    try:
        ssl.create_default_context(cafile=text)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"upstream_ca: {text!r} is not a readable PEM CA file: {exc}") from exc
    return text


# --------------------------------------------------------------------------- connect time

GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


def resolve_upstream(
    host: str,
    port: int,
    policy: NetworkPolicy,
    getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    *,
    host_addresses: HostAddresses = HOST_ADDRESSES,
) -> tuple[str, int]:
    """Return the ``(ip, port)`` to connect to for ``host:port``.

    A ``resolve`` entry wins (its target may be internal, even this host:
    the user asked for it explicitly). Otherwise the name is resolved and,
    with ``block_internal``, refused if *any* returned address is internal
    or one of ``host_addresses`` (this host's own interfaces, read now) --
    checked here, on the addresses actually returned, because DNS may
    answer differently than when the policy decided (DNS rebinding).
    Raises :class:`NetworkPolicyError` with the reason (which names
    ``block_internal`` when that refused it).
    """
    try:
        name = normalize_host(host)
    except NetworkPolicyError as exc:
        raise NetworkPolicyError(f"cannot resolve upstream: {exc}") from None
    target = policy.resolve_target(name, port)
    check_internal = policy.block_internal
    if target is not None:
        name, port = target
        check_internal = False
        if is_ip_literal(name):
            log.debug("resolve entry: %s -> %s", host, format_authority(name, port))
            return name, port
    elif is_ip_literal(name):
        refusal = _refusal(name, host_addresses) if check_internal else None
        if refusal is not None:
            raise NetworkPolicyError(
                f"{format_authority(name, port)}: {refusal}; blocked by block_internal=True"
            )
        return name, port
    try:
        infos = getaddrinfo(name, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise NetworkPolicyError(f"cannot resolve {name!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        try:
            addr = str(info[4][0])
        except (IndexError, TypeError):
            continue
        if not is_ip_literal(addr.split("%", 1)[0]):
            continue
        addresses.append(addr)
    if not addresses:
        raise NetworkPolicyError(f"cannot resolve {name!r}: no addresses")
    if check_internal:
        for addr in addresses:
            refusal = _refusal(addr.split("%", 1)[0], host_addresses)
            if refusal is not None:
                raise NetworkPolicyError(
                    f"{name!r} resolved to {refusal}; "
                    "blocked by block_internal=True (use resolve= to reach it)"
                )
    log.debug("resolved %s -> %s", name, addresses)
    return addresses[0], port


def _refusal(ip: str, host_addresses: HostAddresses) -> str | None:
    """Why ``block_internal`` refuses ``ip`` (an internal range, or this host), or ``None``."""
    rng = internal_range(ip)
    if rng is not None:
        return f"internal address {ip} ({rng})"
    own = host_addresses.match(ipaddress.ip_address(ip))
    if own is not None:
        return f"{ip}, an address of this host ({own})"
    return None
