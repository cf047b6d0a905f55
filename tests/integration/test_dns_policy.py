"""The guest's DNS answers only the names the mediation knows; the rest get NXDOMAIN.

A real guest resolves with glibc (``getaddrinfo``, ``getent``, curl).
Negative controls: a name no entry names, a sibling of a wildcard, the
deny-all default; positive ones: every kind of entry, ``*``, the guest's
own ``/etc/hosts`` names.
"""

from __future__ import annotations

import json

from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.vm.machine import VM

#: Resolves each argument with getaddrinfo (IPv4, as curl and most clients
#: ask); prints {name: address or "error: <errno>"} as JSON.
RESOLVE = r"""
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as exc:
        out[name] = "error: %d" % exc.errno
print(json.dumps(out))
"""
NXDOMAIN = f"error: {-2}"  # EAI_NONAME: "Name or service not known"


def _resolve(vm: VM, *names: str) -> dict[str, str]:
    r = vm.exec(["python3", "-c", RESOLVE, *names], timeout=120)
    assert r.returncode == 0, r.stderr
    answers: dict[str, str] = json.loads(r.stdout)
    return answers


def test_only_names_the_policy_knows_resolve(vm: VM) -> None:
    recorder = vm.configure_network(
        NetworkPolicy(
            allow_hosts=["api.test", "*.wild.test"],
            resolve={"fake.test:80": "127.0.0.1:9"},
            tcp={"db.test:5432": "127.0.0.1:9"},
        )
    )
    recorder.stub("GET", "http://stub-only.test/x", body="stubbed")
    got = _resolve(
        vm,
        "api.test",
        "a.wild.test",
        "fake.test",
        "db.test",
        "stub-only.test",
        "wild.test",
        "denied.example",
        "localhost",
        "gondolin",
    )
    known = ["api.test", "a.wild.test", "fake.test", "db.test", "stub-only.test"]
    assert all(got[name].startswith("198.1") for name in known), got  # 198.18.0.0/15
    assert got["wild.test"] == NXDOMAIN and got["denied.example"] == NXDOMAIN, got
    # The guest's own names come from its /etc/hosts, never from the host.
    assert (got["localhost"], got["gondolin"]) == ("127.0.0.1", "127.0.1.1"), got
    denied = [(ex.host, ex.scheme, ex.decision) for ex in recorder.requests]
    assert denied == [("wild.test", "dns", "denied"), ("denied.example", "dns", "denied")]
    assert all("[rule: dns]" in ex.reason for ex in recorder.requests)
    # getent says the same through NSS: exit 2 is "not found".
    assert vm.exec("getent hosts denied.example").returncode == 2
    assert vm.exec("getent hosts api.test").returncode == 0


def test_star_resolves_every_name(vm: VM) -> None:
    recorder = vm.configure_network(NetworkPolicy(allow_hosts=["*"]))
    got = _resolve(vm, "anything.example", "x.y.z.invalid", "localhost")
    assert got["anything.example"].startswith("198.1") and got["x.y.z.invalid"].startswith("198.1")
    assert got["localhost"] == "127.0.0.1"
    assert recorder.requests == []


def test_by_default_a_lookup_fails_and_is_recorded_as_denied(vm: VM) -> None:
    # DESIGN.md's example: the default policy denies all egress.
    r = vm.exec("curl -sS -m 20 https://example.org/", timeout=60)
    assert r.returncode == 6 and "Could not resolve host: example.org" in r.stderr, r.stderr
    assert vm.http is not None
    exchange = vm.http.get_requests(host="example.org")[0]
    assert (exchange.decision, exchange.scheme, exchange.status) == ("denied", "dns", None)
    assert "allow_hosts is empty" in exchange.reason
