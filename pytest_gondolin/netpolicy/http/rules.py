"""Host names, ports and host patterns: how the network layer compares hosts.

One place for the text forms every other module of the HTTP layer reads
or writes: a host's canonical form (:func:`normalize_host`), ``host:port``
splitting and joining, the schemes' default ports, and the host-pattern
grammar shared by ``allow_hosts`` and ``Secret.hosts``
(:func:`parse_host_pattern`):

``example.com``
    exactly that name, any port.
``example.com:8443``
    exactly that name and port.
``*.example.com``
    any name *below* ``example.com`` at any depth (``a.example.com``,
    ``a.b.example.com``) but not ``example.com`` itself.
``*``
    every host name, but no IP literal (still subject to ``block_internal``).
``192.0.2.7``, ``[2001:db8::7]:443``, ``2001:db8::7``
    an IP literal (IPv6 needs brackets when a port follows).

Names compare case-insensitively, a single trailing dot is ignored and
internationalised names are converted to their IDNA A-label form
(``bücher.example`` == ``xn--bcher-kva.example``). The conversion uses
Python's built-in ``idna`` codec (IDNA 2003, RFC 3490). The canonical form
itself is :func:`pytest_gondolin.guest.recording.canonical_host`, the one
copy of those rules: the guest compares recorded hosts with it and cannot
import host code.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.guest.recording import canonical_host

__all__ = [
    "DEFAULT_PORTS",
    "HostPattern",
    "format_authority",
    "is_ip_literal",
    "normalize_host",
    "parse_host_pattern",
    "split_host_port",
]

#: The port a URL or Host header means when it names none.
DEFAULT_PORTS: Final = {"http": 80, "https": 443}

_PORT_RE: Final = re.compile(r"[0-9]{1,5}")


def normalize_host(host: str) -> str:
    """Return the canonical form of a host name or IP literal.

    Guarantees: the result is either a canonical IP literal (IPv6 without
    brackets, compressed) or a lower-case ASCII name of valid labels. Raises
    :class:`NetworkPolicyError` for anything else (empty, spaces, bad
    labels, all-numeric top-level label, scope ids, over-long names).
    """
    canonical = canonical_host(host) if isinstance(host, str) else None
    if canonical is not None:
        return canonical
    if isinstance(host, str) and _has_scope_id(host):
        raise NetworkPolicyError(f"{host!r}: IPv6 scope ids are not allowed")
    raise NetworkPolicyError(f"{host!r} is not a valid host name")


def _has_scope_id(host: str) -> bool:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.IPv6Address(text).scope_id is not None
    except ValueError:
        return False


def _parse_port(text: str, original: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise NetworkPolicyError(f"{original!r} has an invalid port {text!r} (1-65535)")
    return int(text)


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (host not normalised).

    A bare IPv6 literal without brackets is returned whole with no port.
    Raises :class:`NetworkPolicyError` for a malformed port or bracket.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise NetworkPolicyError(f"{text!r} has an unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise NetworkPolicyError(f"{text!r} has junk after ']'")
        return host, _parse_port(rest[1:], text)
    if text.count(":") > 1:  # a bare IPv6 literal: no port possible
        return text, None
    host, sep, port = text.partition(":")
    if not sep:
        return host, None
    return host, _parse_port(port, text)


def format_authority(host: str, port: int | None) -> str:
    """``host[:port]`` with IPv6 literals bracketed (RFC 3986 §3.2.2)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address literal (no brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPattern:
    """One parsed host pattern (see the module docstring for the grammar).

    ``host`` is the normalised name (for a wildcard, the suffix after
    ``*.``; empty for ``*``), ``port`` is ``None`` for "any port" and
    ``text`` is the pattern as the user wrote it.
    """

    text: str
    host: str
    wildcard: bool
    port: int | None

    def matches(self, host: str, port: int | None) -> bool:
        """Whether the *normalised* ``host`` and ``port`` fall under this pattern.

        A pattern with a port never matches an unknown (``None``) port.
        """
        if self.port is not None and port != self.port:
            return False
        if not self.wildcard:
            return host == self.host
        if not self.host:  # "*"
            return not is_ip_literal(host)
        return host.endswith("." + self.host)


def parse_host_pattern(text: object, *, where: str) -> HostPattern:
    """Parse one host pattern; ``where`` names its origin for error messages.

    Raises :class:`ConfigError` such as
    ``allow_hosts[2]: 'exa mple.com' is not a valid host name``.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a host name string, got {text!r}")
    try:
        raw_host, port = split_host_port(text.strip())
    except NetworkPolicyError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if raw_host == "*":
        return HostPattern(text=text, host="", wildcard=True, port=port)
    wildcard = raw_host.startswith("*.")
    name = raw_host[2:] if wildcard else raw_host
    if "*" in name:
        raise ConfigError(
            f"{where}: {text!r} is not a valid host pattern "
            "(only a leading '*.' wildcard or a lone '*' is supported)"
        )
    try:
        host = normalize_host(name)
    except NetworkPolicyError:
        raise ConfigError(f"{where}: {text!r} is not a valid host name") from None
    if wildcard and is_ip_literal(host):
        raise ConfigError(f"{where}: {text!r}: a wildcard cannot cover an IP address")
    return HostPattern(text=text, host=host, wildcard=wildcard, port=port)
