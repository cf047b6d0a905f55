"""Sandboxed tests and the host-mediated network: policy per test, http_traffic, secrets."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration

REAL_TOKEN = "real-token-7f3a9c"


class _Echo(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Echo.seen.append(self.headers.get("Authorization", ""))
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Echo.seen.clear()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


TESTS = """
import os
import urllib.error
import urllib.request

import pytest

ALLOW = dict(allow_hosts=["api.test"], resolve={{"api.test:80": "127.0.0.1:{port}"}})


@pytest.mark.sandboxed(**ALLOW)
def test_allowed_and_recorded(http_traffic):
    assert urllib.request.urlopen("http://api.test/one", timeout=20).read() == b"hello /one"
    http_traffic.assert_request_made(method="GET", host="api.test", path="/one")
    assert [e.decision for e in http_traffic.requests] == ["allowed"]


@pytest.mark.sandboxed
def test_same_host_denied_without_policy(http_traffic):
    # Without a policy naming it, the guest cannot even look the name up.
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen("http://api.test/two", timeout=20)
    assert "Name or service not known" in str(info.value.reason)
    (exchange,) = http_traffic.requests
    assert exchange.decision == "denied" and "[rule: dns]" in exchange.reason


@pytest.mark.sandboxed
def test_stub_from_the_guest(http_traffic):
    http_traffic.stub("GET", "http://stub.test/data", json={{"stubbed": True}})
    assert urllib.request.urlopen("http://stub.test/data", timeout=20).read() == b'{{"stubbed": true}}'
    assert http_traffic.requests[0].decision == "stubbed"


@pytest.mark.sandboxed(secrets={{"API_TOKEN": ["api.test"]}}, **ALLOW)
def test_secret_is_a_placeholder_in_the_guest(http_traffic):
    token = os.environ["API_TOKEN"]
    assert token.startswith("GONDOLIN_SECRET_API_TOKEN_") and "{real}" not in token
    req = urllib.request.Request("http://api.test/auth", headers={{"Authorization": f"Bearer {{token}}"}})
    assert urllib.request.urlopen(req, timeout=20).read() == b"hello /auth"
    (exchange,) = http_traffic.requests
    assert "{real}" not in repr(exchange)
"""


def test_network_policy_per_sandboxed_test(
    pytester: pytest.Pytester, upstream: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TOKEN", REAL_TOKEN)
    pytester.makepyfile(TESTS.format(port=upstream, real=REAL_TOKEN))
    result = pytester.runpytest_subprocess("-p", "gondolin", "-v")
    result.assert_outcomes(passed=4)
    # The upstream saw the real secret for the allowed host, and nothing else did.
    assert _Echo.seen.count(f"Bearer {REAL_TOKEN}") == 1
    assert REAL_TOKEN not in result.stdout.str()
