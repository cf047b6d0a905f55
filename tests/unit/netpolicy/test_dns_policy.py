"""The guest's DNS answers only names the mediation knows (policy entries and stubs)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from pytest_gondolin.netpolicy.dns_policy import knows_name, policy_resolver
from pytest_gondolin.netpolicy.http.mediation import MediationContext
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.stack.dns import DEFAULT_POOL, SyntheticResolver
from pytest_gondolin.netpolicy.stack.dns_wire import Rcode

from .dns_helpers import parse_response, query

POLICY = NetworkPolicy(
    allow_hosts=["api.test", "*.wild.test", "only-port.test:8443", "[2001:db8::7]"],
    resolve={"fake.test:80": "127.0.0.1:8080"},
    tcp={"db.test:5432": "127.0.0.1:5432"},
)


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("api.test", True),
        ("API.Test.", True),  # case and the final dot do not matter
        ("a.wild.test", True),
        ("a.b.wild.test", True),
        ("wild.test", False),  # "*.wild.test" is below it only
        ("only-port.test", True),  # known on its one port
        ("fake.test", True),  # a resolve entry's host
        ("db.test", True),  # a tcp service's name
        ("other.test", False),
        ("api.test.evil", False),
        ("", False),
        ("127.0.0.1", False),
    ],
)
def test_the_policy_knows_its_own_names(name: str, known: bool) -> None:
    assert POLICY.knows_name(name) is known


def test_star_knows_every_name_but_loopback_names_under_block_internal() -> None:
    everything = NetworkPolicy(allow_hosts=["*"])
    assert everything.knows_name("anything.example") and everything.knows_name("x.y.z.test")
    assert not everything.knows_name("localhost") and not everything.knows_name("a.localhost")
    assert NetworkPolicy(allow_hosts=["*"], block_internal=False).knows_name("a.localhost")
    assert not NetworkPolicy().knows_name("example.org")  # deny-all knows no name


def test_idn_names_match_in_their_ascii_form() -> None:
    policy = NetworkPolicy(allow_hosts=["bücher.test"])
    assert policy.knows_name("xn--bcher-kva.test") and policy.knows_name("bücher.test")


def test_a_stub_makes_its_host_known() -> None:
    recorder = Recorder()
    context = MediationContext(NetworkPolicy(), None, recorder)
    assert not knows_name(context, "stub-only.test")
    recorder.stub("GET", "http://Stub-Only.test:8080/x", body="hi")
    assert knows_name(context, "stub-only.test") and not knows_name(context, "other.test")


def _ask(resolver: SyntheticResolver, name: str, qtype: int = 1) -> tuple[int, list[str]]:
    response = parse_response(resolver.handle_query(query(name, qtype)) or b"")
    return response.rcode, [str(a) for a in response.addresses]


def test_the_resolver_answers_known_names_and_records_refused_lookups() -> None:
    context = MediationContext(POLICY, None, Recorder())
    resolver = policy_resolver(lambda: context)
    rcode, (address,) = _ask(resolver, "api.test")
    assert rcode == Rcode.NOERROR and IPv4Address(address) in DEFAULT_POOL
    assert resolver.name_for(IPv4Address(address)) == "api.test"
    assert _ask(resolver, "db.test")[0] == Rcode.NOERROR
    assert _ask(resolver, "denied.example") == (Rcode.NXDOMAIN, [])
    assert _ask(resolver, "denied.example", qtype=28) == (Rcode.NXDOMAIN, [])  # AAAA too
    assert _ask(resolver, "api.test", qtype=28) == (Rcode.NOERROR, [])  # known: NODATA
    (record,) = context.recorder.requests  # one record per refused A lookup
    assert (record.host, record.port, record.scheme) == ("denied.example", 53, "dns")
    assert record.decision == "denied" and record.status is None
    assert record.reason.endswith("[rule: dns]") and "'denied.example'" in record.reason
    assert resolver.address_for("denied.example") is None  # no address was spent on it
    assert resolver.counters["nxdomain-policy"] == 2


def test_the_refusal_says_when_everything_is_denied_by_default() -> None:
    context = MediationContext(NetworkPolicy(), None, Recorder())
    resolver = policy_resolver(lambda: context)
    assert _ask(resolver, "example.org")[0] == Rcode.NXDOMAIN
    (record,) = context.recorder.requests
    assert "allow_hosts is empty" in record.reason


def test_the_current_context_decides_each_lookup() -> None:
    contexts = [MediationContext(NetworkPolicy(), None, Recorder())]
    resolver = policy_resolver(lambda: contexts[-1])
    assert _ask(resolver, "later.test")[0] == Rcode.NXDOMAIN
    contexts.append(MediationContext(NetworkPolicy(allow_hosts=["later.test"]), None, Recorder()))
    assert _ask(resolver, "later.test")[0] == Rcode.NOERROR
    contexts.append(MediationContext(NetworkPolicy(), None, Recorder()))
    assert _ask(resolver, "later.test")[0] == Rcode.NXDOMAIN  # mapped before, unknown now


def test_a_failing_name_policy_costs_the_query_a_servfail() -> None:
    def broken(name: str) -> bool:
        raise RuntimeError("boom")

    resolver = SyntheticResolver(admit=broken)
    assert _ask(resolver, "api.test")[0] == Rcode.SERVFAIL
    assert resolver.counters["servfail"] == 1
