"""The addresses this host itself answers on, for ``block_internal``.

The private and special ranges of :func:`~.internal_ranges.internal_range` are a
fixed table; the host's own addresses are not in it when they are public
(or TEST-NET, or anything else an operator assigned). A name that resolves
to one of them would let the guest reach services the host listens on, so
:func:`~.policy.resolve_upstream` also refuses every address of
:class:`HostAddresses`, read at connect time (cached for
:data:`HOST_ADDRESS_MAX_AGE` seconds: addresses change rarely, connects
come in bursts).

Sources, all stdlib, each one optional (a source that fails adds nothing):

* ``/proc/net/fib_trie`` (Linux): every ``LOCAL`` route of the kernel, i.e.
  every IPv4 address of every interface, secondary addresses and
  ``ip route add local <prefix>`` ranges included;
* ``/proc/net/if_inet6`` (Linux): every IPv6 address of every interface;
* without ``/proc``: ``SIOCGIFADDR`` on each interface of
  :func:`socket.if_nameindex` (Linux, one IPv4 address per interface);
* always: the source addresses the kernel picks to reach the outside
  (a connected UDP socket; no packet is sent) -- the portable fallback.

No source asks a resolver (``getaddrinfo(gethostname())`` could block on
DNS, and the guest's traffic must never make the host resolve names it
did not have to).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

__all__ = [
    "HOST_ADDRESSES",
    "HOST_ADDRESS_MAX_AGE",
    "HostAddresses",
    "HostNetwork",
    "embedded_ipv4",
    "parse_fib_trie",
    "parse_if_inet6",
    "read_host_addresses",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HostNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: What an address source may yield: addresses or networks, as objects or text.
AddressLike = str | IPAddress | HostNetwork

#: How long a reading of the host's addresses is trusted. Reading costs a
#: few hundred microseconds; a guest opening connections in a loop would
#: otherwise pay it on every one. An address added to the host is refused
#: at most this late.
HOST_ADDRESS_MAX_AGE: Final = 2.0

_FIB_TRIE: Final = Path("/proc/net/fib_trie")
_IF_INET6: Final = Path("/proc/net/if_inet6")
#: linux/sockios.h: get the (first) IPv4 address of an interface.
_SIOCGIFADDR: Final = 0x8915
# Destinations for the "which source address would the kernel use" probe:
# documentation addresses (RFC 5737, RFC 3849), never contacted (UDP
# connect sends nothing).
_PROBE_V4: Final = ("192.0.2.1", 9)
_PROBE_V6: Final = ("2001:db8::1", 9)
_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")  # RFC 4291 §2.5.5.1 (deprecated)
_NAT64_WKP: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 §2.1


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address packets to ``addr`` may end up at, if it embeds one.

    IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16`` and Teredo (the client address).
    """
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _V4_COMPATIBLE or addr in _NAT64_WKP:
        return ipaddress.IPv4Address(addr.packed[-4:])
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


# --------------------------------------------------------------------------- sources


def parse_fib_trie(text: str) -> set[HostNetwork]:
    """The ``LOCAL`` routes in the text of ``/proc/net/fib_trie``.

    A leaf line ``|-- 192.0.2.2`` is followed by its routes, one per line
    (``/32 host LOCAL``, ``/24 link UNICAST``, ...); each ``LOCAL`` one is
    a network this host answers on. Lines that do not parse are skipped.
    """
    found: set[HostNetwork] = set()
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            leaf = stripped[4:].strip()
        elif stripped.startswith("/") and leaf is not None:
            fields = stripped.split()
            if len(fields) >= 3 and fields[-1] == "LOCAL":
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.IPv4Network(f"{leaf}{fields[0]}", strict=False))
        elif not stripped.startswith("/"):
            leaf = None  # a "+--" node line or a table header: no leaf is current
    return found


def parse_if_inet6(text: str) -> set[HostNetwork]:
    """The addresses in the text of ``/proc/net/if_inet6`` (one per line, 32 hex digits first)."""
    found: set[HostNetwork] = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        with contextlib.suppress(ValueError):
            found.add(ipaddress.IPv6Network(int(fields[0], 16)))
    return found


def _ioctl_ipv4() -> set[HostNetwork]:
    found: set[HostNetwork] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                found.add(ipaddress.IPv4Network(socket.inet_ntoa(reply[20:24])))
    return found


def _outgoing_addresses() -> set[HostNetwork]:
    found: set[HostNetwork] = set()
    for family, probe in ((socket.AF_INET, _PROBE_V4), (socket.AF_INET6, _PROBE_V6)):
        with (
            contextlib.suppress(OSError, ValueError),
            socket.socket(family, socket.SOCK_DGRAM) as s,
        ):
            s.connect(probe)
            found.add(ipaddress.ip_network(str(s.getsockname()[0]).split("%", 1)[0]))
    return found


def read_host_addresses() -> set[HostNetwork]:
    """Every address (or local prefix) this host answers on, from the sources above.

    Never raises: a source that is missing or fails contributes nothing.
    """
    found: set[HostNetwork] = set()
    have_v4 = have_v6 = False
    with contextlib.suppress(OSError, UnicodeDecodeError):
        found |= parse_fib_trie(_FIB_TRIE.read_text())
        have_v4 = True
    with contextlib.suppress(OSError, UnicodeDecodeError):
        found |= parse_if_inet6(_IF_INET6.read_text())
        have_v6 = True
    if not have_v4:
        with contextlib.suppress(OSError, AttributeError):  # if_nameindex: Unix only
            found |= _ioctl_ipv4()
    found |= _outgoing_addresses()
    if not (have_v4 and have_v6):
        log.debug("host addresses read without /proc (v4=%s, v6=%s)", have_v4, have_v6)
    return found


# --------------------------------------------------------------------------- the cache


class HostAddresses:
    """The host's own addresses, from ``source``, re-read when ``max_age`` seconds old.

    ``source`` returns addresses or networks (objects or text, e.g.
    ``["198.51.100.7", "2001:db8::/64"]``); tests inject a fake one.
    Thread-safe: upstream fetches run on worker threads.
    """

    def __init__(
        self,
        source: Callable[[], Iterable[AddressLike]] = read_host_addresses,
        *,
        max_age: float = HOST_ADDRESS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._networks: frozenset[HostNetwork] = frozenset()
        self._read_at: float | None = None

    def networks(self) -> frozenset[HostNetwork]:
        """The current set (read now if the last reading is older than ``max_age``)."""
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self.max_age:
                self._networks = frozenset(
                    ipaddress.ip_network(item, strict=False) for item in self.source()
                )
                self._read_at = now
            return self._networks

    def match(self, ip: IPAddress) -> HostNetwork | None:
        """The host network ``ip`` falls in, or ``None``.

        An IPv6 address embedding an IPv4 one (:func:`embedded_ipv4`) also
        matches when the embedded address does; a scope id is ignored.
        """
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            bare = ipaddress.IPv6Address(ip.packed)  # without a scope id
            inner = embedded_ipv4(bare)
            candidates = [bare] if inner is None else [bare, inner]
        for net in self.networks():
            if any(c.version == net.version and c in net for c in candidates):
                return net
        return None


#: The reading every connect consults unless told otherwise.
HOST_ADDRESSES: Final = HostAddresses()
