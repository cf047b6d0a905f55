"""Which IP addresses are internal: the ranges ``block_internal`` denies.

This module owns the table of internal ranges (loopback, private,
link-local and cloud metadata, CGNAT, multicast, reserved, ...; each with
the RFC that sets it apart) and :func:`internal_range`, which also judges
IPv6 forms by the IPv4 address they embed. The policy uses it for IP
literals (:meth:`~.policy.NetworkPolicy.decide`) and for the addresses a
name resolves to at connect time (:func:`~.policy.resolve_upstream`); the
host's own addresses, which no fixed table holds, are :mod:`.hostaddrs`'.
Pure functions.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.hostaddrs import embedded_ipv4

__all__ = ["IPAddress", "internal_range", "is_internal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Internal address ranges, with a short name used in denial reasons.
_INTERNAL_V4: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = tuple(
    (ipaddress.IPv4Network(net), name)
    for net, name in (
        ("0.0.0.0/8", "'this network' (RFC 791)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback (RFC 1122)"),
        ("169.254.0.0/16", "link-local, incl. cloud metadata 169.254.169.254 (RFC 3927)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("224.0.0.0/4", "multicast (RFC 5771)"),
        ("240.0.0.0/4", "reserved, incl. broadcast 255.255.255.255 (RFC 1112)"),
    )
)
_INTERNAL_V6: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = tuple(
    (ipaddress.IPv6Network(net), name)
    for net, name in (
        ("::/128", "unspecified (RFC 4291)"),
        ("::1/128", "loopback (RFC 4291)"),
        ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
        ("100::/64", "discard-only (RFC 6666)"),
        ("fc00::/7", "unique local (RFC 4193)"),
        ("fe80::/10", "link-local (RFC 4291)"),
        ("fec0::/10", "site-local, deprecated (RFC 3879)"),
        ("ff00::/8", "multicast (RFC 4291)"),
    )
)


def internal_range(ip: str | IPAddress) -> str | None:
    """Describe the internal range ``ip`` falls in, or ``None`` if it is public.

    IPv6 forms embedding an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
    IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
    ``2002::/16`` and Teredo clients) are judged by the embedded address.
    Raises :class:`NetworkPolicyError` if ``ip`` is not an IP address.
    """
    if isinstance(ip, str):
        try:
            addr: IPAddress = ipaddress.ip_address(ip)
        except ValueError:
            raise NetworkPolicyError(f"{ip!r} is not an IP address") from None
    elif isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        addr = ip
    else:
        raise NetworkPolicyError(f"{ip!r} is not an IP address")
    if isinstance(addr, ipaddress.IPv4Address):
        for net4, name in _INTERNAL_V4:
            if addr in net4:
                return f"{net4} {name}"
        return None
    if addr.scope_id is not None:
        addr = ipaddress.IPv6Address(addr.packed)
    for net6, name in _INTERNAL_V6:
        if addr in net6:
            return f"{net6} {name}"
    embedded = embedded_ipv4(addr)
    if embedded is not None:
        inner = internal_range(embedded)
        if inner is not None:
            return f"{inner} (embedded in {addr})"
    return None


def is_internal(ip: str | IPAddress) -> bool:
    """Whether ``ip`` is loopback, private, link-local, CGNAT, multicast, reserved, ...

    See :func:`internal_range` for the exact table and the IPv6 forms that
    are unwrapped. Raises :class:`NetworkPolicyError` for a non-address.
    """
    return internal_range(ip) is not None
