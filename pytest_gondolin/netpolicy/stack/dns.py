"""Synthetic DNS for the guest: a made-up address per name, mapped back on connect.

The guest's resolver points at the gateway; every query it sends arrives
here as a UDP payload, parsed strictly by :mod:`.dns_wire` (which also
writes the answers). :class:`SyntheticResolver` answers ``A`` queries
with a made-up address that stands for the *name*, so a later TCP flow to
that address can be mapped back to the name the guest asked for. Which
names get an answer is the caller's ``admit`` predicate (the driver asks
the policy whether it knows the name at all: ``NetworkPolicy.knows_name``
and the stubs); the others get NXDOMAIN, and each refused ``A`` query is
reported to ``on_refused`` (the driver records it). Whether the guest may
reach an answered name on a given port and scheme is still decided when
it connects, with the name the address stands for.

Responses never exceed 512 bytes (one question, at most one A record).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.dns_wire import (
    DEFAULT_TTL,
    QCLASS_IN,
    QTYPE_A,
    DnsError,
    Rcode,
    build_response,
    error_response,
    is_hostname,
    looks_like_ipv4,
    parse_query,
)

__all__ = ["DEFAULT_MAX_NAMES", "DEFAULT_POOL", "DEFAULT_TTL", "SyntheticResolver"]

logger = logging.getLogger(__name__)

#: RFC 2544 / RFC 6890: 198.18.0.0/15 is reserved for benchmarking and is
#: never routed on the Internet, so a synthetic address can neither shadow
#: a real destination the guest might dial by IP nor collide with the
#: private ranges (10/8, 172.16/12, 192.168/16) that internal-network
#: policies reason about. Other fake-IP DNS tools use it for the same
#: reason. 2**17 - 2 usable addresses is far more than DEFAULT_MAX_NAMES.
DEFAULT_POOL = IPv4Network("198.18.0.0/15")
#: Distinct names a guest may have mapped. Each costs a few hundred bytes
#: of host memory and one pool address; the cap keeps a guest that
#: resolves random names in a loop from exhausting either. Past it, new
#: names are REFUSED; known names keep resolving. The cap is per test:
#: every snapshot restore gives the guest a new, empty resolver
#: (``NetworkDriver.reset``).
DEFAULT_MAX_NAMES = 4096


class SyntheticResolver:
    """Answers guest queries with stable per-name synthetic IPv4 addresses.

    Guarantees: a name (compared case-insensitively, RFC 4343) always gets
    the same address from one resolver; an address is never given to two
    names; ``name_for`` maps every handed-out address back to its name; at
    most ``max_names`` names are ever mapped. ``AAAA`` and every other
    type get NOERROR with no answers (IPv6 is not offered to the guest);
    names that are not plain host names get NXDOMAIN, and so do names
    ``admit`` refuses (lower-case, without the final dot; default: every
    name), whatever the type, with ``on_refused(name)`` called for each
    such ``A`` query. Neither callback may raise; if one does, the query
    is answered SERVFAIL.
    """

    def __init__(
        self,
        pool: IPv4Network | str = DEFAULT_POOL,
        *,
        max_names: int = DEFAULT_MAX_NAMES,
        ttl: int = DEFAULT_TTL,
        admit: Callable[[str], bool] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        try:
            network = IPv4Network(pool)
        except ValueError as exc:
            raise ConfigError(f"synthetic DNS pool {pool!r} is not an IPv4 network") from exc
        # Skip the network and broadcast addresses where the pool has them.
        first, last = int(network.network_address), int(network.broadcast_address)
        if network.prefixlen < 31:
            first, last = first + 1, last - 1
        if last < first:
            raise ConfigError(f"synthetic DNS pool {network} has no usable addresses")
        if max_names < 1:
            raise ConfigError(f"max_names must be positive, got {max_names}")
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ConfigError(f"DNS TTL {ttl} out of range")
        self.pool = network
        self.max_names = min(max_names, last - first + 1)
        self.ttl = ttl
        self._admit = admit
        self._on_refused = on_refused
        self._next = first
        self._by_name: dict[str, IPv4Address] = {}
        self._by_address: dict[IPv4Address, str] = {}
        self._counters: Counter[str] = Counter()

    # -- the mapping ----------------------------------------------------------

    def address_for(self, name: str) -> IPv4Address | None:
        """The address already assigned to ``name``, if any (no assignment)."""
        return self._by_name.get(name.lower().rstrip("."))

    def name_for(self, address: IPv4Address) -> str | None:
        """The name a synthetic ``address`` stands for, or ``None``."""
        return self._by_address.get(address)

    def assign(self, name: str) -> IPv4Address | None:
        """Return ``name``'s address, assigning the next free one if new.

        Returns ``None`` once ``max_names`` distinct names are mapped.
        The caller is responsible for ``name`` being a valid host name.
        """
        key = name.lower().rstrip(".")
        address = self._by_name.get(key)
        if address is not None:
            return address
        if len(self._by_name) >= self.max_names:
            return None
        address = IPv4Address(self._next)
        self._next += 1
        self._by_name[key] = address
        self._by_address[address] = key
        return address

    @property
    def names(self) -> dict[str, IPv4Address]:
        """A copy of the name -> address mapping."""
        return dict(self._by_name)

    @property
    def counters(self) -> dict[str, int]:
        """Queries seen, by outcome (``"answered"``, ``"nodata"``, ``"formerr"``...)."""
        return dict(self._counters)

    # -- the wire -------------------------------------------------------------

    def handle_query(self, message: bytes) -> bytes | None:
        """Answer one query message; ``None`` means send nothing.

        Never raises. Malformed queries whose header is readable get
        FORMERR (or NOTIMP / BADVERS); messages without a readable header,
        and responses, are ignored.
        """
        try:
            query = parse_query(message)
        except DnsError as exc:
            self._counters[exc.reason] += 1
            logger.debug("DNS query refused: %s", exc)
            return error_response(exc)
        if query.edns is not None and query.edns.version != 0:
            self._counters["badvers"] += 1
            return build_response(query, Rcode.BADVERS, ttl=self.ttl)
        name = query.name
        if query.qclass != QCLASS_IN:
            self._counters["refused-class"] += 1
            return build_response(query, Rcode.REFUSED, ttl=self.ttl)
        if not is_hostname(query.labels) or looks_like_ipv4(name):
            self._counters["nxdomain"] += 1
            logger.debug("DNS %s type %d: NXDOMAIN (not a host name)", name, query.qtype)
            return build_response(query, Rcode.NXDOMAIN, ttl=self.ttl)
        key = name.lower().rstrip(".")
        try:
            admitted = self._admit is None or self._admit(key)
            if not admitted and query.qtype == QTYPE_A and self._on_refused is not None:
                self._on_refused(key)
        except Exception:
            logger.exception("DNS %s: the name policy failed; answering SERVFAIL", name)
            self._counters["servfail"] += 1
            return build_response(query, Rcode.SERVFAIL, ttl=self.ttl)
        if not admitted:
            self._counters["nxdomain-policy"] += 1
            logger.debug(
                "DNS %s type %d: NXDOMAIN (a name the policy does not know)", name, query.qtype
            )
            return build_response(query, Rcode.NXDOMAIN, ttl=self.ttl)
        if query.qtype != QTYPE_A:
            # NODATA: the name exists, but only with an A record.
            self._counters["nodata"] += 1
            logger.debug("DNS %s type %d: NODATA", name, query.qtype)
            return build_response(query, Rcode.NOERROR, ttl=self.ttl)
        address = self.assign(name)
        if address is None:
            self._counters["refused-full"] += 1
            logger.warning("DNS %s refused: %d names already mapped", name, self.max_names)
            return build_response(query, Rcode.REFUSED, ttl=self.ttl)
        self._counters["answered"] += 1
        logger.debug("DNS %s A -> %s", name, address)
        return build_response(query, Rcode.NOERROR, address=address, ttl=self.ttl)
