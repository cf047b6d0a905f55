"""Red team of the new network code with a real guest: DNS edge names, Host/SNI/:authority games.

The guest's own resolver (glibc) and curl (HTTP/1.1 and HTTP/2) do the
asking; the host must answer only names the policy knows and judge every
request by the name it carries, whatever address or TLS name it came by.
"""

from __future__ import annotations

import json

from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.vm.machine import VM

RESOLVE = r"""
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        out[name] = "error: %s" % getattr(exc, "errno", type(exc).__name__)
print(json.dumps(out))
"""


def test_edge_names_resolve_only_as_the_policy_says(vm: VM) -> None:
    recorder = vm.configure_network(
        NetworkPolicy(allow_hosts=["api.test", "*.wild.test", "bücher.test"])
    )
    names = [
        "API.TEST.",  # case and the final dot: the same name
        "xn--bcher-kva.test",  # the IDNA form of an allowed IDN
        "a.wild.test",
        "wild.test",  # the wildcard's apex is not below it
        "api.test.evil.test",
        "x" * 63 + ".api.test",  # a child of an exact name is another name
    ]
    r = vm.exec(["python3", "-c", RESOLVE, *names], timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for name in names[:3]:
        assert got[name].startswith("198.1"), got  # 198.18.0.0/15
    for name in names[3:]:
        assert got[name] == "error: -2", got  # NXDOMAIN
    refused = sorted(ex.host for ex in recorder.requests)
    assert refused == sorted(names[3:]) and all(ex.scheme == "dns" for ex in recorder.requests)


def test_a_request_is_judged_by_the_name_it_carries_not_the_way_it_came(vm: VM) -> None:
    recorder = vm.configure_network(NetworkPolicy(allow_hosts=["api.test"]))
    recorder.stub("GET", "http://api.test/ok", body="plain")
    recorder.stub("GET", "https://api.test/ok", body="tls")
    addr = vm.exec("getent hosts api.test", check=True).stdout.split()[0]
    script = (
        # Rebinding: the allowed name's synthetic address, a denied Host.
        f"curl -s -o /dev/null -w '%{{http_code}} ' -H 'Host: evil.test' http://{addr}/x; "
        # TLS name api.test, Host (HTTP/1.1) or :authority (HTTP/2) evil.test.
        "curl -s -o /dev/null -w '%{http_code} ' --http1.1 -H 'Host: evil.test' https://api.test/x; "
        "curl -s -o /dev/null -w '%{http_code} %{http_version} ' -H 'Host: evil.test' https://api.test/x; "
        # Controls: the same paths with the allowed name are served.
        f"curl -s -H 'Host: api.test' http://{addr}/ok; echo -n ' '; curl -s https://api.test/ok"
    )
    out = vm.exec(["sh", "-c", script], timeout=120).stdout.split()
    assert out == ["403", "421", "421", "2", "plain", "tls"], out
    evil = recorder.get_requests(host="evil.test")
    assert [(ex.decision, ex.status, ex.http_version) for ex in evil] == [
        ("denied", 403, "1.1"),
        ("denied", 421, "1.1"),
        ("denied", 421, "2"),
    ]
    assert "[rule: misdirected]" in evil[2].reason
    assert [ex.decision for ex in recorder.get_requests(host="api.test")] == ["stubbed", "stubbed"]


def test_a_tcp_service_name_reaches_nothing_on_another_port(vm: VM) -> None:
    # db.test resolves (a tcp entry names it), but only db.test:5432 is a service.
    recorder = vm.configure_network(NetworkPolicy(tcp={"db.test:5432": "127.0.0.1:9"}))
    script = (
        "curl -s -o /dev/null -w '%{http_code} ' http://db.test/; "
        "python3 -c \"import socket; s = socket.create_connection(('db.test', 22), timeout=20); "
        "s.sendall(b'SSH-2.0-x\\r\\n'); print(repr(s.recv(10)))\" 2>&1 | tail -1"
    )
    out = vm.exec(["sh", "-c", script], timeout=120).stdout
    assert out.startswith("403 "), out
    assert "b''" in out or "Error" in out, out  # cut: EOF or reset, never a service
    raw, http = sorted(recorder.get_requests(host="db.test"), key=lambda ex: ex.port)
    assert (raw.port, raw.decision) == (22, "denied") and "[rule: not-http]" in raw.reason
    assert (http.port, http.decision, http.status) == (80, "denied", 403)
