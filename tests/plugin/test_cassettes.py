"""Record and replay at the VM boundary: curl and urllib in the guest, no upstream on replay."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration

SECRET = "s3cr3t-value-91b2"


class _Api(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Api.hits.append(self.path)
        body = f'{{"path": "{self.path}", "n": {len(_Api.hits)}}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


TESTS = """
import os, subprocess, urllib.request
import pytest

NET = dict(allow_hosts=["api.test"], resolve={{"api.test:80": "127.0.0.1:{port}"}},
           secrets={{"API_KEY": ["api.test"]}}, cassette=True)


@pytest.mark.sandboxed(**NET)
def test_fetch(http_traffic):
    req = urllib.request.Request("http://api.test/items", headers={{"X-Api-Key": os.environ["API_KEY"]}})
    py_body = urllib.request.urlopen(req, timeout=20).read()
    curl_body = subprocess.run(["curl", "-sf", "http://api.test/items"], capture_output=True, check=True).stdout
    print("BODIES", py_body, curl_body)
    assert py_body.startswith(b'{{"path": "/items"')
    assert [e.decision for e in http_traffic.requests] == ["{expect}"] * 2


@pytest.mark.sandboxed(**NET)
def test_new_request():
    assert urllib.request.urlopen("http://api.test/{extra}", timeout=20).status == 200
"""


def _run(
    pytester: pytest.Pytester, port: int, mode: str, expect: str, extra: str = "items", *args: str
) -> pytest.RunResult:
    # The same module (so the same cassette path), rewritten with what this run expects.
    pytester.makepyfile(**{MODULE: TESTS.format(port=port, expect=expect, extra=extra)})
    return pytester.runpytest_subprocess(
        "-p", "gondolin", f"--gondolin-record-mode={mode}", "-s", *args
    )


MODULE = "test_api"


def test_record_then_replay_without_upstream(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Api.hits.clear()
    monkeypatch.setenv("API_KEY", SECRET)
    port = server.server_address[1]
    try:
        recorded = _run(pytester, port, "once", "allowed")
        recorded.assert_outcomes(passed=2)
    finally:
        server.shutdown()
        server.server_close()
    hits_while_recording = len(_Api.hits)
    assert hits_while_recording == 3
    cassette = pytester.path / "cassettes" / MODULE / "test_fetch.yaml"
    text = cassette.read_text()
    assert SECRET not in text
    data = yaml.safe_load(text)
    assert [i["request"]["uri"] for i in data["interactions"]] == ["http://api.test/items"] * 2

    # Upstream gone: replay serves identical bodies to urllib and curl.
    replayed = _run(pytester, port, "none", "replayed")
    replayed.assert_outcomes(passed=2)
    assert len(_Api.hits) == hits_while_recording
    bodies = [line for line in replayed.stdout.lines if line.startswith("BODIES")]
    recorded_bodies = [line for line in recorded.stdout.lines if line.startswith("BODIES")]
    assert bodies == recorded_bodies

    # A request the cassette does not have fails clearly in mode none.
    missed = _run(pytester, port, "none", "replayed", "other", "-k", "new_request")
    missed.assert_outcomes(failed=1, deselected=1)
    missed.stdout.fnmatch_lines(["*did not match cassette*", "*GET http://api.test/other*"])


def test_new_episodes_appends_and_all_rewrites(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Api.hits.clear()
    monkeypatch.setenv("API_KEY", SECRET)
    port = server.server_address[1]
    new_request = pytester.path / "cassettes" / MODULE / "test_new_request.yaml"
    try:
        _run(pytester, port, "once", "allowed", "items", "-k", "new_request").assert_outcomes(
            passed=1, deselected=1
        )
        _run(
            pytester, port, "new_episodes", "allowed", "other", "-k", "new_request"
        ).assert_outcomes(passed=1, deselected=1)
        uris = [
            i["request"]["uri"] for i in yaml.safe_load(new_request.read_text())["interactions"]
        ]
        assert uris == ["http://api.test/items", "http://api.test/other"]
        _run(pytester, port, "all", "allowed", "third", "-k", "new_request").assert_outcomes(
            passed=1, deselected=1
        )
        uris = [
            i["request"]["uri"] for i in yaml.safe_load(new_request.read_text())["interactions"]
        ]
        assert uris == ["http://api.test/third"]
    finally:
        server.shutdown()
        server.server_close()


FACTORY_TEST = """
def test_factory_cassette(vm_factory):
    vm = vm_factory(allow_hosts=["api.test"], resolve={{"api.test:80": "127.0.0.1:{port}"}}, cassette="{path}")
    r = vm.exec("curl -sf http://api.test/factory")
    assert r.returncode == 0 and r.stdout.startswith('{{"path": "/factory"')
    assert vm.http.requests[0].decision == "{expect}"
    vm.close()
"""


def _record_factory_cassette(pytester: pytest.Pytester) -> tuple[int, Path]:
    """Record FACTORY_TEST's one request into factory.yaml; the upstream is gone afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    path = pytester.path / "factory.yaml"
    try:
        pytester.makepyfile(FACTORY_TEST.format(port=port, path=path, expect="allowed"))
        pytester.runpytest_subprocess(
            "-p", "gondolin", "--gondolin-record-mode=once"
        ).assert_outcomes(passed=1)
    finally:
        server.shutdown()
        server.server_close()
    return port, path


def test_vm_factory_cassette(pytester: pytest.Pytester) -> None:
    port, path = _record_factory_cassette(pytester)
    assert "http://api.test/factory" in path.read_text()
    pytester.makepyfile(FACTORY_TEST.format(port=port, path=path, expect="replayed"))
    pytester.runpytest_subprocess("-p", "gondolin", "--gondolin-record-mode=none").assert_outcomes(
        passed=1
    )


MISS_TESTS = """
import pytest

@pytest.fixture(scope="session")
def api_vm(vm_factory):
    return vm_factory(allow_hosts=["api.test"], resolve={{"api.test:80": "127.0.0.1:{port}"}},
                      cassette="{path}")

def test_replayed(api_vm):
    assert api_vm.exec("curl -sf http://api.test/factory").returncode == 0

def test_miss_fails(api_vm):
    r = api_vm.exec("curl -s -o /dev/null -w '%{{http_code}}' http://api.test/not-recorded")
    assert r.stdout == "403"          # the guest sees the refusal; the test still fails

def test_after_the_miss(api_vm):          # the miss is reported once, to the test that made it
    assert api_vm.exec("true").returncode == 0

def test_without_a_vm():
    pass
"""


def test_cassette_miss_fails_the_host_side_test_that_made_it(pytester: pytest.Pytester) -> None:
    """vm_factory(cassette=...) in mode none: a miss fails the test that made the request only."""
    port, path = _record_factory_cassette(pytester)
    pytester.makepyfile(MISS_TESTS.format(port=port, path=path))
    result = pytester.runpytest_subprocess("-p", "gondolin", "--gondolin-record-mode=none", "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_replayed PASSED*",
            "*test_miss_fails FAILED*",
            "*test_after_the_miss PASSED*",
            "*test_without_a_vm PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*cassette: 1 request(s) did not match cassette*", "*GET http://api.test/not-recorded*"]
    )
