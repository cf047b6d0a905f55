"""block_internal and the host's own addresses (hostaddrs.py, resolve_upstream, run_upstream).

Every test injects a FAKE address source: the host "owns" 198.51.100.7
(TEST-NET-2, in no internal range) and 2001:db8:7::/64; its neighbour
198.51.100.8 is the negative control everywhere.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.hostaddrs import (
    HostAddresses,
    parse_fib_trie,
    parse_if_inet6,
    read_host_addresses,
)
from pytest_gondolin.netpolicy.http.mediation import (
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy, is_internal, resolve_upstream
from pytest_gondolin.netpolicy.http.recorder import Recorder

HOST = "198.51.100.7"
NEIGHBOUR = "198.51.100.8"


def fake_host() -> HostAddresses:
    return HostAddresses(lambda: [HOST, "2001:db8:7::/64"])


def fake_dns(*answers: str) -> Any:
    def getaddrinfo(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers
        ]

    return getaddrinfo


def test_the_fake_host_address_is_in_no_internal_range() -> None:
    # What makes this a test of the new check rather than of the range table.
    assert not is_internal(HOST) and not is_internal(NEIGHBOUR)
    assert not is_internal("2001:db8:7::1")


# ------------------------------------------------------------------ resolve_upstream

REFUSED = [
    (HOST,),
    ("93.184.215.14", HOST),  # any answer being the host is enough
    ("2001:db8:7::99",),  # an IPv6 prefix of the host
    ("::ffff:198.51.100.7",),  # IPv4-mapped
    ("64:ff9b::c633:6407",),  # NAT64 of 198.51.100.7
]


@pytest.mark.parametrize("answers", REFUSED)
def test_a_name_resolving_to_the_host_is_refused(answers: tuple[str, ...]) -> None:
    policy = NetworkPolicy(allow_hosts=["*"])
    assert policy.decide("myself.example", 80, "http").allowed  # only the connect refuses
    with pytest.raises(NetworkPolicyError, match="an address of this host") as info:
        resolve_upstream(
            "myself.example", 80, policy, getaddrinfo=fake_dns(*answers), host_addresses=fake_host()
        )
    assert "block_internal" in str(info.value)


@pytest.mark.parametrize("answer", [NEIGHBOUR, "2001:db8:8::1", "::ffff:198.51.100.8"])
def test_negative_control_a_neighbour_of_the_host_is_allowed(answer: str) -> None:
    policy = NetworkPolicy(allow_hosts=["*"])
    got = resolve_upstream(
        "neighbour.example", 80, policy, getaddrinfo=fake_dns(answer), host_addresses=fake_host()
    )
    assert got == (answer, 80)


def test_an_ip_literal_of_the_host_is_refused_even_when_listed() -> None:
    policy = NetworkPolicy(allow_hosts=[HOST, NEIGHBOUR])
    assert policy.decide(HOST, 80, "http").allowed
    with pytest.raises(NetworkPolicyError, match=r"address of this host.*block_internal"):
        resolve_upstream(HOST, 80, policy, getaddrinfo=fake_dns(), host_addresses=fake_host())
    assert resolve_upstream(
        NEIGHBOUR, 80, policy, getaddrinfo=fake_dns(), host_addresses=fake_host()
    ) == (NEIGHBOUR, 80)


def test_resolve_entry_naming_the_host_stays_allowed() -> None:
    policy = NetworkPolicy(
        resolve={"svc.test:80": f"{HOST}:8080", "name.test:80": "host.internal:8081"}
    )
    dns = fake_dns(HOST)
    hosts = fake_host()
    assert resolve_upstream("svc.test", 80, policy, getaddrinfo=dns, host_addresses=hosts) == (
        HOST,
        8080,
    )
    assert resolve_upstream("name.test", 80, policy, getaddrinfo=dns, host_addresses=hosts) == (
        HOST,
        8081,
    )


def test_block_internal_off_allows_the_host() -> None:
    policy = NetworkPolicy(allow_hosts=["*"], block_internal=False)
    assert resolve_upstream(
        "myself.example", 80, policy, getaddrinfo=fake_dns(HOST), host_addresses=fake_host()
    ) == (HOST, 80)


def test_run_upstream_denies_with_rule_block_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole mediation path: 403 with [rule: block_internal], nothing fetched."""
    monkeypatch.setitem(resolve_upstream.__kwdefaults__, "host_addresses", fake_host())
    monkeypatch.setattr(resolve_upstream, "__defaults__", (fake_dns(HOST),))
    policy = NetworkPolicy(allow_hosts=["*"])
    request = HttpRequest(
        method="GET",
        target="/",
        scheme="http",
        host="myself.example",
        port=80,
        path="/",
        query="",
        headers=(("Host", "myself.example"),),
        body=b"",
    )
    job = plan_request(request, 0.0, MediationContext(policy, None, Recorder()))
    assert isinstance(job, UpstreamJob)
    outcome = run_upstream(job, timeout=2.0)
    assert outcome.response.status == 403
    assert outcome.exchange.decision == "denied"
    assert "[rule: block_internal]" in outcome.exchange.reason
    assert "an address of this host" in outcome.exchange.reason


# ------------------------------------------------------------------ the cache


def test_addresses_are_reread_after_max_age_only() -> None:
    now = [0.0]
    current = [[HOST]]
    reads = []

    def source() -> list[str]:
        reads.append(now[0])
        return current[0]

    hosts = HostAddresses(source, max_age=2.0, clock=lambda: now[0])
    assert hosts.match(ipaddress.ip_address(HOST)) is not None
    current[0] = [NEIGHBOUR]  # the host's address changed
    now[0] = 1.9
    assert hosts.match(ipaddress.ip_address(HOST)) is not None  # still the cached reading
    now[0] = 2.0
    assert hosts.match(ipaddress.ip_address(HOST)) is None
    assert hosts.match(ipaddress.ip_address(NEIGHBOUR)) is not None
    assert reads == [0.0, 2.0]


def test_scope_ids_are_ignored() -> None:
    hosts = HostAddresses(lambda: ["fe80::7"])
    assert hosts.match(ipaddress.IPv6Address("fe80::7%eth0")) is not None
    assert hosts.match(ipaddress.IPv6Address("fe80::8%eth0")) is None


# ------------------------------------------------------------------ the sources

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.51.100.0/24 2 0 2
        |-- 198.51.100.0
           /24 link UNICAST
        |-- 198.51.100.7
           /32 host LOCAL
        |-- 198.51.100.9
           /32 host LOCAL
        |-- 198.51.100.255
           /32 link BROADCAST
     |-- 203.0.113.0
        /28 host LOCAL
        /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 198.51.100.7
        /32 host LOCAL
"""


def test_parse_fib_trie_keeps_local_routes_only() -> None:
    assert parse_fib_trie(FIB_TRIE) == {
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv4Network("198.51.100.7/32"),  # a secondary address too
        ipaddress.IPv4Network("198.51.100.9/32"),
        ipaddress.IPv4Network("203.0.113.0/28"),  # `ip route add local 203.0.113.0/28`
    }


@pytest.mark.parametrize(
    "junk", ["", "garbage\n  /32 host LOCAL\n", "|-- not-an-ip\n /32 host LOCAL"]
)
def test_parse_fib_trie_skips_what_does_not_parse(junk: str) -> None:
    assert parse_fib_trie(junk) == set()


def test_parse_if_inet6() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "20010db8000700000000000000000007 02 40 00 80     eth0\n"
        "short 02 40 00 80 eth1\n"
        "zz010db8000700000000000000000007 02 40 00 80     eth2\n"
    )
    assert parse_if_inet6(text) == {
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv6Network("2001:db8:7::7/128"),
    }


def test_the_real_host_addresses_include_the_outgoing_address() -> None:
    found = read_host_addresses()
    if Path("/proc/net/fib_trie").exists():  # Linux: every interface, loopback too
        assert any(ipaddress.ip_address("127.0.0.1") in net for net in found if net.version == 4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no IPv4 route on this host")
        mine = ipaddress.ip_address(s.getsockname()[0])
    assert any(mine in net for net in found if net.version == 4)
