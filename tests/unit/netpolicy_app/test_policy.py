"""NetworkPolicy: patterns, decisions, validation, internal addresses, resolve."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import (
    NetworkPolicy,
    internal_range,
    is_internal,
    resolve_upstream,
)
from pytest_gondolin.netpolicy.http.rules import normalize_host, parse_host_pattern
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore

# (allow_hosts, host, port, scheme, allowed, rule)
DECISIONS = [
    # exact names, any port
    (["example.com"], "example.com", 443, "https", True, "example.com"),
    (["example.com"], "example.com", 8080, "http", True, "example.com"),
    (["example.com"], "www.example.com", 443, "https", False, "default-deny"),
    (["example.com"], "example.org", 443, "https", False, "default-deny"),
    (["example.com"], "notexample.com", 443, "https", False, "default-deny"),
    # case, trailing dot, IDNA
    (["Example.COM"], "EXAMPLE.com.", 443, "https", True, "Example.COM"),
    (["bücher.example"], "xn--bcher-kva.example", 443, "https", True, "bücher.example"),
    (["xn--bcher-kva.example"], "BÜCHER.example", 443, "https", True, "xn--bcher-kva.example"),
    # wildcards: subdomains at any depth, never the apex
    (["*.example.com"], "api.example.com", 443, "https", True, "*.example.com"),
    (["*.example.com"], "a.b.example.com", 443, "https", True, "*.example.com"),
    (["*.example.com"], "example.com", 443, "https", False, "default-deny"),
    (["*.example.com"], "badexample.com", 443, "https", False, "default-deny"),
    (["*.example.com"], "example.com.evil.net", 443, "https", False, "default-deny"),
    (["*"], "anything.example", 80, "http", True, "*"),
    (["*"], "203.0.113.9", 80, "http", False, "default-deny"),
    # ports
    (["example.com:8443"], "example.com", 8443, "https", True, "example.com:8443"),
    (["example.com:8443"], "example.com", 443, "https", False, "default-deny"),
    (["*.example.com:443"], "a.example.com", 443, "https", True, "*.example.com:443"),
    (["*.example.com:443"], "a.example.com", 80, "http", False, "default-deny"),
    # first match wins
    (["a.example.com:1", "*.example.com"], "a.example.com", 2, "http", True, "*.example.com"),
    # IP literals; internal ones need resolve while block_internal is on
    (["203.0.113.9"], "203.0.113.9", 443, "https", True, "203.0.113.9"),
    (["[2001:db8::1]:443"], "2001:db8::1", 443, "https", True, "[2001:db8::1]:443"),
    (["[2001:db8::1]:443"], "[2001:DB8::1]", 443, "https", True, "[2001:db8::1]:443"),
    (["127.0.0.1"], "127.0.0.1", 80, "http", False, "block_internal"),
    (["*"], "localhost", 80, "http", False, "block_internal"),
    (["*"], "db.localhost", 80, "http", False, "block_internal"),
    # default: deny all; non-HTTP schemes and garbage are denied
    ([], "example.com", 443, "https", False, "default-deny"),
    (["example.com"], "example.com", 443, "ws", False, "scheme"),
    (["example.com"], "example.com", 22, "ssh", False, "scheme"),
    (["*"], "exa mple.com", 80, "http", False, "invalid-host"),
    (["*"], "", 80, "http", False, "invalid-host"),
    (["*"], "127.1", 80, "http", False, "invalid-host"),
    (["example.com"], "example.com", 0, "http", False, "invalid-host"),
    (["example.com"], "example.com", 70000, "http", False, "invalid-host"),
]


@pytest.mark.parametrize(("allow", "host", "port", "scheme", "allowed", "rule"), DECISIONS)
def test_decide(
    allow: list[str], host: str, port: int, scheme: str, allowed: bool, rule: str
) -> None:
    decision = NetworkPolicy(allow_hosts=allow).decide(host, port, scheme)
    assert (decision.allowed, decision.rule) == (allowed, rule), decision.reason
    assert decision.reason


def test_default_deny_reason_explains_the_default() -> None:
    decision = NetworkPolicy().decide("example.org", 443, "https")
    assert not decision.allowed
    assert "example.org:443" in decision.reason
    assert "denied by default" in decision.reason


def test_block_internal_off_allows_listed_internal_address() -> None:
    policy = NetworkPolicy(allow_hosts=["127.0.0.1", "localhost"], block_internal=False)
    assert policy.decide("127.0.0.1", 80, "http").allowed
    assert policy.decide("localhost", 80, "http").allowed
    # ... but not-listed ones stay denied
    assert not policy.decide("10.0.0.1", 80, "http").allowed


def test_resolve_entry_allows_exactly_its_host_and_port() -> None:
    policy = NetworkPolicy(resolve={"api.test:443": "127.0.0.1:8443"})
    decision = policy.decide("API.test", 443, "https")
    assert decision.allowed
    assert decision.rule == "resolve['api.test:443']"
    assert not policy.decide("api.test", 80, "http").allowed
    assert policy.resolve_target("api.test", 443) == ("127.0.0.1", 8443)


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    (
        {"allow_hosts": ["ok.com", "fine.org", "exa mple.com"]},
        "allow_hosts[2]: 'exa mple.com' is not a valid host name",
    ),
    ({"allow_hosts": "example.com"}, "allow_hosts: expected a list of host names"),
    ({"allow_hosts": [42]}, "allow_hosts[0]: expected a host name string, got 42"),
    (
        {"allow_hosts": ["foo*.example.com"]},
        "allow_hosts[0]: 'foo*.example.com' is not a valid host pattern",
    ),
    (
        {"allow_hosts": ["*.*.example.com"]},
        "allow_hosts[0]: '*.*.example.com' is not a valid host pattern",
    ),
    ({"allow_hosts": ["*.10.0.0.1"]}, "a wildcard cannot cover an IP address"),
    ({"allow_hosts": ["example.com:0"]}, "allow_hosts[0]: 'example.com:0' has an invalid port '0'"),
    ({"allow_hosts": ["example.com:65536"]}, "invalid port '65536'"),
    ({"allow_hosts": ["example.com:http"]}, "invalid port 'http'"),
    ({"allow_hosts": ["example.com:"]}, "invalid port ''"),
    ({"allow_hosts": ["[::1"]}, "allow_hosts[0]: '[::1' has an unclosed '['"),
    ({"allow_hosts": ["a" * 64 + ".com"]}, "is not a valid host name"),
    ({"allow_hosts": ["-bad.com"]}, "is not a valid host name"),
    ({"allow_hosts": ["10.0.0.256"]}, "is not a valid host name"),
    ({"allow_hosts": [""]}, "allow_hosts[0]: '' is not a valid host name"),
    ({"block_internal": "no"}, "block_internal: expected True or False, got 'no'"),
    ({"resolve": {"api.test": "127.0.0.1:80"}}, "resolve['api.test']: 'api.test' needs a port"),
    (
        {"resolve": {"api.test:80": "not an address"}},
        "resolve['api.test:80']: 'not an address' is not a valid",
    ),
    ({"resolve": {"*.test:80": "127.0.0.1:80"}}, "wildcards are not supported in resolve keys"),
    (
        {"resolve": {"api.test:80": 8080}},
        "resolve['api.test:80']: the value must be an 'addr:port' string",
    ),
    (
        {"resolve": {"api.test:80": "127.0.0.1", "API.test:80": "127.0.0.2"}},
        "duplicates resolve['api.test:80']",
    ),
    ({"resolve": ["api.test:80"]}, "resolve: expected a dict"),
    ({"upstream_ca": "/nonexistent/ca.pem"}, "upstream_ca: '/nonexistent/ca.pem' is not a file"),
    (
        {"secrets": {"1BAD": Secret("v", ["a.com"])}},
        "secrets['1BAD']: '1BAD' is not a valid secret name",
    ),
    ({"secrets": {"TOKEN": "value"}}, "secrets['TOKEN']: expected a Secret"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_name_the_option_and_value(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        NetworkPolicy(**options)
    assert message in str(info.value)


def test_upstream_ca_must_be_pem(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"upstream_ca: .* is not a readable PEM CA file"):
        NetworkPolicy(upstream_ca=bogus)
    good = tmp_path / "good.pem"
    good.write_bytes(CertificateAuthority.create().ca_pem)
    policy = NetworkPolicy(upstream_ca=good)
    assert policy.upstream_ca_path == good


def test_policy_is_immutable_hashable_and_normalises_sequences() -> None:
    policy = NetworkPolicy(allow_hosts=["a.com"], resolve={"b.test:80": "127.0.0.1"})
    assert policy.allow_hosts == ("a.com",)
    same = NetworkPolicy(allow_hosts=("a.com",), resolve={"b.test:80": "127.0.0.1"})
    assert policy == same and hash(policy) == hash(same)
    assert policy != NetworkPolicy(allow_hosts=["a.com"])
    with pytest.raises(AttributeError):
        policy.block_internal = False  # type: ignore[misc]


def test_from_options_reads_marker_style_secret_from_environment() -> None:
    policy = NetworkPolicy.from_options(
        allow_hosts=["api.github.com"],
        secrets={"GITHUB_TOKEN": ["api.github.com"]},
        environ={"GITHUB_TOKEN": "ghp_real"},
    )
    assert policy.secrets["GITHUB_TOKEN"].value == "ghp_real"
    assert "ghp_real" not in repr(policy)
    with pytest.raises(ConfigError, match="GITHUB_TOKEN is not set"):
        NetworkPolicy.from_options(secrets={"GITHUB_TOKEN": ["api.github.com"]}, environ={})


def test_secret_hosts_are_validated_with_the_option_path() -> None:
    # A Secret is a plain value (the guest builds them too); the allow_hosts
    # grammar of its hosts is the policy's, checked when it is put on one.
    secret = Secret("v", ["ok.com", "bad host"])
    with pytest.raises(
        ConfigError, match=r"secrets\['TOKEN'\].hosts\[1\]: 'bad host' is not a valid host name"
    ):
        NetworkPolicy(secrets={"TOKEN": secret})
    with pytest.raises(ConfigError, match=r"secrets\['TOKEN'\].hosts\[1\]: 'bad host'"):
        NetworkPolicy.from_options(
            secrets={"TOKEN": ["ok.com", "bad host"]}, environ={"TOKEN": "v"}
        )
    with pytest.raises(ConfigError, match=r"secrets\['TOKEN'\].hosts\[1\]: 'bad host'"):
        SecretStore({"TOKEN": secret})


@pytest.mark.parametrize(
    ("text", "host", "wildcard", "port"),
    [
        ("example.com", "example.com", False, None),
        ("*.Example.com:8443", "example.com", True, 8443),
        ("*", "", True, None),
        ("[::1]:80", "::1", False, 80),
        ("::1", "::1", False, None),
        ("192.0.2.1:443", "192.0.2.1", False, 443),
        ("münchen.de", "xn--mnchen-3ya.de", False, None),
        ("_srv.example.com", "_srv.example.com", False, None),
    ],
)
def test_parse_host_pattern(text: str, host: str, wildcard: bool, port: int | None) -> None:
    pattern = parse_host_pattern(text, where="x")
    assert (pattern.host, pattern.wildcard, pattern.port, pattern.text) == (
        host,
        wildcard,
        port,
        text,
    )


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("2001:db8:0:0::1", "2001:db8::1"),
        ("ÉCOLE.fr", "xn--" + "école".encode("punycode").decode() + ".fr"),
        ("école.FR", "xn--cole-9oa.fr"),
    ],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host",
    ["", ".", "a..b", "exa mple.com", "a/b", "fe80::1%eth0", "[fe80::1%eth0]", "1.2.3", "x." * 130],
)
def test_normalize_host_rejects(host: str) -> None:
    with pytest.raises(NetworkPolicyError):
        normalize_host(host)


INTERNAL = [
    ("127.0.0.1", True),
    ("127.255.255.254", True),
    ("10.1.2.3", True),
    ("172.16.0.1", True),
    ("172.31.255.255", True),
    ("172.32.0.1", False),
    ("192.168.1.1", True),
    ("169.254.169.254", True),
    ("169.254.0.1", True),
    ("100.64.0.1", True),
    ("100.127.255.255", True),
    ("100.128.0.1", False),
    ("224.0.0.1", True),
    ("239.255.255.250", True),
    ("0.0.0.0", True),
    ("0.1.2.3", True),
    ("255.255.255.255", True),
    ("192.0.0.170", True),
    ("198.18.0.1", True),
    ("8.8.8.8", False),
    ("93.184.215.14", False),
    ("::1", True),
    ("::", True),
    ("fc00::1", True),
    ("fd12:3456::1", True),
    ("fe80::1", True),
    ("fe80::1%eth0", True),
    ("ff02::1", True),
    ("2606:4700::1111", False),
    # IPv4-mapped / -compatible / NAT64 / 6to4 / Teredo forms
    ("::ffff:127.0.0.1", True),
    ("::ffff:7f00:1", True),
    ("::ffff:169.254.169.254", True),
    ("::ffff:10.0.0.1", True),
    ("::ffff:8.8.8.8", False),
    ("::127.0.0.1", True),
    ("64:ff9b::127.0.0.1", True),
    ("64:ff9b::8.8.8.8", False),
    ("2002:7f00:1::", True),
    ("2002:0808:0808::", False),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),  # Teredo client 127.0.0.1
]


@pytest.mark.parametrize(("ip", "internal"), INTERNAL)
def test_is_internal(ip: str, internal: bool) -> None:
    assert is_internal(ip) is internal


def test_internal_range_names_the_range() -> None:
    assert internal_range("169.254.169.254") == (
        "169.254.0.0/16 link-local, incl. cloud metadata 169.254.169.254 (RFC 3927)"
    )
    described = internal_range("::ffff:127.0.0.1")
    assert described is not None
    assert "127.0.0.0/8 loopback" in described and "embedded" in described


@pytest.mark.parametrize("bad", ["example.com", "", "1.2.3.4.5", 42])
def test_is_internal_rejects_non_addresses(bad: Any) -> None:
    with pytest.raises(NetworkPolicyError, match="not an IP address"):
        is_internal(bad)


# ------------------------------------------------------------------ resolve_upstream


def fake_dns(*answers: str) -> Any:
    calls: list[tuple[Any, ...]] = []

    def getaddrinfo(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        calls.append((host, port))
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers
        ]

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


def test_resolve_upstream_returns_first_public_address() -> None:
    dns = fake_dns("93.184.215.14", "2606:2800::1")
    policy = NetworkPolicy(allow_hosts=["example.com"])
    assert resolve_upstream("Example.com", 443, policy, getaddrinfo=dns) == ("93.184.215.14", 443)
    assert dns.calls == [("example.com", 443)]


@pytest.mark.parametrize(
    "answers", [("127.0.0.1",), ("93.184.215.14", "10.0.0.5"), ("::ffff:169.254.169.254",)]
)
def test_resolve_upstream_rejects_internal_answers(answers: tuple[str, ...]) -> None:
    """DNS rebinding: the policy allowed the name, DNS now points inside."""
    policy = NetworkPolicy(allow_hosts=["rebind.example"])
    assert policy.decide("rebind.example", 80, "http").allowed
    with pytest.raises(NetworkPolicyError, match="resolved to internal address"):
        resolve_upstream("rebind.example", 80, policy, getaddrinfo=fake_dns(*answers))


def test_resolve_upstream_internal_allowed_when_block_internal_off() -> None:
    policy = NetworkPolicy(allow_hosts=["svc.example"], block_internal=False)
    assert resolve_upstream("svc.example", 80, policy, getaddrinfo=fake_dns("10.0.0.5")) == (
        "10.0.0.5",
        80,
    )


def test_resolve_entry_wins_and_may_be_internal() -> None:
    dns = fake_dns("203.0.113.1")
    policy = NetworkPolicy(resolve={"api.test:443": "127.0.0.1:8443", "web.test:80": "localhost"})
    assert resolve_upstream("api.test", 443, policy, getaddrinfo=dns) == ("127.0.0.1", 8443)
    assert dns.calls == []
    # a name target is resolved but not checked (the user asked for it)
    assert resolve_upstream("web.test", 80, policy, getaddrinfo=fake_dns("127.0.0.1")) == (
        "127.0.0.1",
        80,
    )


def test_resolve_upstream_ip_literals() -> None:
    policy = NetworkPolicy(allow_hosts=["203.0.113.9", "10.0.0.1"])
    assert resolve_upstream("203.0.113.9", 80, policy, getaddrinfo=fake_dns()) == (
        "203.0.113.9",
        80,
    )
    with pytest.raises(NetworkPolicyError, match="internal address"):
        resolve_upstream("10.0.0.1", 80, policy, getaddrinfo=fake_dns())


def test_resolve_upstream_wraps_dns_errors() -> None:
    def failing(*args: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    policy = NetworkPolicy(allow_hosts=["nx.example"])
    with pytest.raises(NetworkPolicyError, match=r"cannot resolve 'nx\.example'") as info:
        resolve_upstream("nx.example", 80, policy, getaddrinfo=failing)
    assert isinstance(info.value.__cause__, socket.gaierror)
    with pytest.raises(NetworkPolicyError, match="no addresses"):
        resolve_upstream("nx.example", 80, policy, getaddrinfo=fake_dns())
    with pytest.raises(NetworkPolicyError, match="not a valid host name"):
        resolve_upstream("bad host", 80, policy, getaddrinfo=fake_dns())
