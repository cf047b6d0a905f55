"""Cassettes: format (ours and vcrpy's), record modes, matching, secrets, filters, saving."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import string
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin import config
from pytest_gondolin.errors import ConfigError, GondolinError
from pytest_gondolin.netpolicy.http.cassette import RECORD_MODES, CassettePlayer, open_cassette
from pytest_gondolin.netpolicy.http.cassette_file import Cassette
from pytest_gondolin.netpolicy.http.cassette_match import DEFAULT_MATCHERS, normalize_placeholders
from pytest_gondolin.netpolicy.http.cassette_paths import (
    _safe_stem,
    default_cassette_path,
    resolve_cassette_option,
)
from pytest_gondolin.netpolicy.http.cassette_values import (
    FILTERED,
    CassetteError,
    CassetteMismatch,
    CassetteRequest,
    CassetteResponse,
    Interaction,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore

API = "https://api.example.com"
REAL = "ghp_R3alV4lue_never_in_files"


def req(
    method: str = "GET",
    url: str = f"{API}/v1/items?page=2",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> HttpRequest:
    """A guest request as the interceptor would produce it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or ""
    return HttpRequest(
        method=method,
        target=target,
        scheme=parts.scheme,
        host=host,
        port=port,
        path=parts.path,
        query=parts.query,
        headers=(("Host", parts.netloc), *headers),
        body=body,
    )


def resp(body: bytes | str = b"ok", status: int = 200, **headers: str) -> HttpResponse:
    data = body.encode() if isinstance(body, str) else body
    pairs = tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return HttpResponse(
        status=status, headers=pairs or (("Content-Type", "text/plain"),), body=data
    )


def write_cassette(path: Path, *pairs: tuple[HttpRequest, HttpResponse]) -> None:
    """Record ``pairs`` into a new cassette at ``path`` (mode once)."""
    player = open_cassette(path, "once")
    for request, response in pairs:
        player.record(request, response)
    assert player.save()


def drive(player: CassettePlayer, request: HttpRequest) -> str:
    """What the driver does per request; returns what the guest got."""
    replay = player.lookup(request)
    if replay is not None:
        return f"replayed:{replay.body.decode()}"
    if player.should_record(request):
        live = resp(f"live:{request.path}")
        player.record(request, live)
        return f"live:{request.path}"
    player.unmatched(request)
    return "refused"


def bodies(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return [i.response.body.decode() for i in Cassette.load(path).interactions]


# --------------------------------------------------------------------------- format


def test_round_trip_text_binary_and_empty_bodies(tmp_path: Path) -> None:
    text = "line one\nline two: ünïcode\n"
    binary = bytes(range(256))
    cassette = Cassette(
        (
            Interaction(
                CassetteRequest("POST", f"{API}/upload", (("X-B", "2"), ("X-A", "1")), binary),
                CassetteResponse(201, "Created", (("Content-Type", "text/plain"),), text.encode()),
            ),
            Interaction(
                CassetteRequest("GET", "http://[2001:db8::1]:8080/x?b=2&a=1"),
                CassetteResponse(204, "", (), b""),
            ),
        )
    )
    path = tmp_path / "c.yaml"
    assert cassette.save(path)
    assert Cassette.load(path) == cassette
    written = path.read_text()
    assert "!!binary" in written  # binary body: base64 under YAML's standard tag
    assert "line two: ünïcode" in written  # text stays readable (a | block)
    assert base64.b64encode(binary).decode()[:40] in written.replace("\n", "").replace(" ", "")


def test_written_file_has_the_vcrpy_shape(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(
        path,
        (
            req("GET", headers=(("Accept", "*/*"),)),
            resp('{"a": 1}', Content_Type="application/json"),
        ),
        (req("POST", f"{API}/bin", body=b"\xff\x00"), resp(b"\x89PNG\r\n\x1a\n")),
    )
    doc = yaml.safe_load(path.read_text())
    assert set(doc) == {"interactions", "version"} and doc["version"] == 1
    first, second = doc["interactions"]
    assert set(first) == {"request", "response"}
    assert set(first["request"]) == {"body", "headers", "method", "uri"}
    assert first["request"] == {
        "body": None,
        "headers": {"Accept": ["*/*"], "Host": ["api.example.com"]},
        "method": "GET",
        "uri": f"{API}/v1/items?page=2",
    }
    assert first["response"] == {
        "body": {"string": '{"a": 1}'},
        "headers": {"Content-Type": ["application/json"]},
        "status": {"code": 200, "message": ""},
    }
    assert second["request"]["body"] == b"\xff\x00"  # !!binary loads as bytes
    assert second["response"]["body"] == {"string": b"\x89PNG\r\n\x1a\n"}


def test_output_is_stable(tmp_path: Path) -> None:
    # Same traffic, two runs, two sessions' placeholders: byte-identical files.
    outputs = []
    for run in range(2):
        store = SecretStore({"TOKEN": Secret(REAL, ["api.example.com"])})
        path = tmp_path / f"run{run}.yaml"
        player = open_cassette(path, "once", secret_store=store)
        player.record(
            req(headers=(("X-Token", store.placeholder("TOKEN")), ("Accept", "a"))), resp("x")
        )
        player.save()
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith(b"# pytest-gondolin cassette")


VCRPY_FILE = """\
interactions:
- request:
    body: null
    headers:
      Accept:
      - '*/*'
      User-Agent:
      - python-requests/2.31.0
    method: GET
    uri: https://API.Example.com/v1/items?page=2
  response:
    body:
      string: '{"items": [1, 2]}'
    headers:
      Content-Type:
      - application/json
      Set-Cookie:
      - a=1
      - b=2
    status:
      code: 200
      message: OK
- request:
    body: name=x&kind=y
    headers:
      Content-Type: application/x-www-form-urlencoded
      Content-Length: 13
    method: POST
    uri: http://api.example.com:8080/form
  response:
    body:
      encoding: ISO-8859-1
      string: "caf\\xE9"
    headers: {}
    status:
      code: 302
      message: Found
- request:
    body: !!binary |
      AAEC
    headers: {}
    method: PUT
    uri: https://api.example.com/blob
  response:
    body:
      string: !!binary |
        /9j/4AAQ
    headers:
      Date:
      - Mon, 01 Jan 2024 00:00:00 GMT
    status:
      code: 201
      message: Created
version: 1
"""


def test_a_vcrpy_cassette_loads_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "vcr.yaml"
    path.write_text(VCRPY_FILE)
    player = open_cassette(path, "none")
    got = player.lookup(req("GET", f"{API}/v1/items?page=2"))
    assert got is not None
    assert (got.status, got.reason, got.body) == (200, "OK", b'{"items": [1, 2]}')
    assert [v for n, v in got.headers if n == "Set-Cookie"] == ["a=1", "b=2"]
    form = player.lookup(req("POST", "http://api.example.com:8080/form", body=b"other"))
    assert form is not None and form.body == "café".encode("latin-1") and form.status == 302
    interactions = Cassette.load(path).interactions
    assert interactions[1].request.header("content-length") == "13"  # unquoted int -> str
    assert interactions[2].request.body == b"\x00\x01\x02"
    assert interactions[2].response.body == base64.b64decode("/9j/4AAQ")
    assert player.unused() == [interactions[2]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interactions: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("version: 1\n", "expected an 'interactions:' list"),
        ("interactions: []\nversion: 2\n", "version 2 is not supported"),
        ("interactions: [42]\n", r"interactions\[0\]: expected a mapping"),
        (
            "interactions:\n- request: {method: 'GET /', uri: 'https://a.com/'}\n  response: {}\n",
            r"interactions\[0\].request.method: .* is not an HTTP method",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'ftp://a.com/'}\n  response: {}\n",
            r"interactions\[0\].request.uri 'ftp://a.com/': not an absolute",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com:99999/'}\n"
            "  response: {}\n",
            r"request.uri",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/', headers: {X: \"a\\r\\nB: c\"}}\n"
            "  response: {status: {code: 200}}\n",
            r"request.headers.X\[0\]: header value has CR",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/', headers: {'a b': x}}\n"
            "  response: {status: {code: 200}}\n",
            "not a valid header name",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/'}\n"
            "  response: {status: {code: 102}}\n",
            r"status.code: 102 is not a status in 200..599",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/', body: [1]}\n"
            "  response: {status: {code: 200}}\n",
            r"request.body: expected text, !!binary or null",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/'}\n"
            "  response: {status: {code: 200}, body: {encoding: klingon, string: x}}\n",
            "unknown encoding",
        ),
        (
            "interactions:\n- request: {method: GET, uri: 'https://a.com/', headers: {X: yes}}\n"
            "  response: {status: {code: 200}}\n",
            "quote it in the YAML",
        ),
        ("!!python/object:os.system {}\n", "not valid YAML"),  # safe loader only
        *(
            (
                "interactions:\n- request: {method: GET, uri: 'https://a.com/'}\n"
                f"  response: {{status: 200, body: {{encoding: {enc}, string: {text}}}}}\n",
                message,
            )
            for enc, text, message in [
                ("rot13", "x", "not encodable as rot-13"),  # a codec, but not a text encoding
                ("idna", "a" * 70, "not encodable as idna"),  # label too long
                ('"a\\0b"', "x", "unknown encoding"),
                ("ascii", "é", "not encodable as ascii"),
            ]
        ),
    ],
)
def test_invalid_cassettes_are_rejected_with_the_location(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CassetteError, match=message) as info:
        open_cassette(path, "none")
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_unreadable_cassette_is_a_cassette_error(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(CassetteError, match="cannot read cassette"):
        open_cassette(tmp_path / "dir.yaml", "once")
    (tmp_path / "latin.yaml").write_bytes(b"interactions: [\xff]")
    with pytest.raises(CassetteError, match="not UTF-8"):
        Cassette.load(tmp_path / "latin.yaml")


# --------------------------------------------------------------------------- record modes

A = req("GET", f"{API}/a")
B = req("GET", f"{API}/b")


@pytest.mark.parametrize(
    ("mode", "exists", "guest_got", "writes", "file_after"),
    [
        # none: replay only; a miss is refused; the file is never written.
        ("none", True, ["replayed:recorded-a", "refused"], False, ["recorded-a"]),
        ("none", False, ["refused", "refused"], False, None),
        # once: a new cassette records everything; an existing one replays only.
        ("once", False, ["live:/a", "live:/b"], True, ["live:/a", "live:/b"]),
        ("once", True, ["replayed:recorded-a", "refused"], False, ["recorded-a"]),
        # new_episodes: replay what matches, record the rest, keep both.
        ("new_episodes", True, ["replayed:recorded-a", "live:/b"], True, ["recorded-a", "live:/b"]),
        ("new_episodes", False, ["live:/a", "live:/b"], True, ["live:/a", "live:/b"]),
        # all: never replay, rewrite the file with this run's traffic only.
        ("all", True, ["live:/a", "live:/b"], True, ["live:/a", "live:/b"]),
        ("all", False, ["live:/a", "live:/b"], True, ["live:/a", "live:/b"]),
    ],
)
def test_record_modes(
    tmp_path: Path,
    mode: str,
    exists: bool,
    guest_got: list[str],
    writes: bool,
    file_after: list[str] | None,
) -> None:
    path = tmp_path / "c.yaml"
    if exists:
        write_cassette(path, (A, resp("recorded-a")))
    player = open_cassette(path, mode)
    assert (player.replays, player.records) == (
        "replayed:recorded-a" in guest_got or (mode in ("none", "new_episodes")),
        "live:/b" in guest_got,
    )
    assert [drive(player, A), drive(player, B)] == guest_got
    refused = guest_got.count("refused")
    assert len(player.misses) == refused
    assert player.save() is writes
    assert bodies(path) == file_after
    if refused:
        with pytest.raises(CassetteMismatch, match="did not match cassette"):
            player.check()
    else:
        player.check()


def test_record_modes_match_the_cli_choices() -> None:
    assert RECORD_MODES == config.RECORD_MODES


def test_all_mode_ignores_a_corrupt_file_and_rewrites_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("not: [a, cassette")
    player = open_cassette(path, "all")
    assert drive(player, A) == "live:/a"
    assert player.save()
    assert bodies(path) == ["live:/a"]


def test_a_run_that_records_nothing_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.yaml"
    for mode in RECORD_MODES:
        assert not open_cassette(path, mode).save()
    assert not path.exists()


def test_recordings_replay_in_order_next_run_but_not_in_the_same_run(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    first = open_cassette(path, "once")
    assert first.lookup(A) is None and first.should_record(A)
    first.record(A, resp("one"))
    assert first.lookup(A) is None  # recorded in this run: fetched again, like vcrpy
    first.record(A, resp("two"))
    first.save()
    second = open_cassette(path, "none")
    got = [second.lookup(A), second.lookup(A)]
    assert [r.body if r else None for r in got] == [b"one", b"two"]


def test_record_refuses_in_a_replay_only_mode(tmp_path: Path) -> None:
    player = open_cassette(tmp_path / "c.yaml", "none")
    with pytest.raises(CassetteError, match="'none' does not record"):
        player.record(A, resp())


def test_max_interactions(tmp_path: Path) -> None:
    player = open_cassette(tmp_path / "c.yaml", "once", max_interactions=2)
    for _ in range(2):
        assert player.should_record(A)
        player.record(A, resp())
    assert not player.should_record(A)
    with pytest.raises(CassetteError, match="more than 2 interactions"):
        player.record(A, resp())
    assert "maximum of 2 interactions" in player.unmatched(A)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "rewrite"}, "record mode must be one of none, once, new_episodes, all"),
        ({"matchers": ["method", "verb"]}, "unknown matcher 'verb'"),
        ({"matchers": "method"}, "expected a list of names"),
        ({"matchers": []}, "empty"),
        ({"filter_headers": "authorization"}, "filter_headers: expected a list"),
        ({"filter_query": [1]}, "filter_query: 1 is not a name"),
        ({"max_interactions": 0}, "max_interactions"),
    ],
)
def test_bad_options_are_config_errors(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    mode = kwargs.pop("mode", "once")
    with pytest.raises(ConfigError, match=message):
        open_cassette(tmp_path / "c.yaml", mode, **kwargs)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("matchers", "recorded", "live", "matches"),
    [
        # The default ignores headers and bodies...
        (DEFAULT_MATCHERS, req(headers=(("X", "1"),)), req(headers=(("X", "2"),)), True),
        (DEFAULT_MATCHERS, req("POST", body=b"a"), req("POST", body=b"b"), True),
        # ...compares queries as parameters, not text...
        (DEFAULT_MATCHERS, req(url=f"{API}/p?a=1&b=2"), req(url=f"{API}/p?b=2&a=1"), True),
        (DEFAULT_MATCHERS, req(url=f"{API}/p?a=1"), req(url=f"{API}/p?a=2"), False),
        # ...and every part of the destination.
        (DEFAULT_MATCHERS, req("GET"), req("HEAD"), False),
        (DEFAULT_MATCHERS, req(url="https://a.com/p"), req(url="http://a.com/p"), False),
        (DEFAULT_MATCHERS, req(url="https://a.com/p"), req(url="https://b.com/p"), False),
        (DEFAULT_MATCHERS, req(url="https://a.com/p"), req(url="https://a.com:8443/p"), False),
        (DEFAULT_MATCHERS, req(url="https://a.com/p"), req(url="https://a.com/q"), False),
        (["method", "path"], req(url="https://a.com/p"), req(url="https://b.com/p?x=1"), True),
        (["uri"], req(url=f"{API}/p?a=1&b=2"), req(url=f"{API}/p?b=2&a=1"), True),
        (["uri"], req(url=f"{API}/p"), req(url=f"{API}/p/"), False),
        # body: bytes, or data for JSON and form bodies.
        (["method", "body"], req("POST", body=b"a"), req("POST", body=b"b"), False),
        (["method", "body"], req("POST", body=b"\x00a"), req("POST", body=b"\x00a"), True),
        (
            ["body"],
            req("POST", headers=(("Content-Type", "application/json"),), body=b'{"a":1,"b":[2]}'),
            req(
                "POST",
                headers=(("content-type", "application/json; charset=utf-8"),),
                body=b'{"b": [2], "a": 1}',
            ),
            True,
        ),
        (
            ["body"],
            req("POST", headers=(("Content-Type", "application/json"),), body=b'{"a":1}'),
            req("POST", headers=(("Content-Type", "application/json"),), body=b'{"a":2}'),
            False,
        ),
        (
            ["body"],
            req(
                "POST",
                headers=(("Content-Type", "application/x-www-form-urlencoded"),),
                body=b"a=1&b=2",
            ),
            req(
                "POST",
                headers=(("Content-Type", "application/x-www-form-urlencoded"),),
                body=b"b=2&a=1",
            ),
            True,
        ),
        (["headers"], req(headers=(("X", "1"),)), req(headers=(("x", "1"),)), True),
        (["headers"], req(headers=(("X", "1"),)), req(headers=(("X", "2"),)), False),
    ],
)
def test_matchers(
    tmp_path: Path, matchers: list[str], recorded: HttpRequest, live: HttpRequest, matches: bool
) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (recorded, resp("hit")))
    player = open_cassette(path, "none", matchers=matchers)
    assert (player.lookup(live) is not None) is matches


def test_deeply_nested_json_body_does_not_break_matching(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    json_req = req("POST", headers=(("Content-Type", "application/json"),), body=deep)
    path = tmp_path / "c.yaml"
    write_cassette(path, (json_req, resp("hit")))
    assert open_cassette(path, "none", matchers=["body"]).lookup(json_req) is not None


def test_cassettes_recorded_with_other_filters_still_match(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    placeholder = "GONDOLIN_SECRET_TOKEN_" + "ab" * 16  # e.g. written by an older version
    player = open_cassette(path, "once", filter_query=(), filter_headers=())
    player.record(
        req(url=f"{API}/{placeholder}?token=abc", headers=(("Authorization", "Bearer x"),)),
        resp("hit"),
    )
    player.save()
    replay = open_cassette(path, "none", matchers=("uri", "headers"))
    live = req(
        url=f"{API}/GONDOLIN_SECRET_TOKEN_{'cd' * 16}?token=xyz",
        headers=(("Authorization", "Bearer y"),),
    )
    assert replay.lookup(live) is not None


def test_a_request_that_cannot_be_represented_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (A, resp()))
    player = open_cassette(path, "none")
    odd = dataclasses.replace(A, host="bad host")
    assert player.lookup(odd) is None
    assert "cannot be matched against cassette" in player.unmatched(odd)
    assert len(player.misses) == 1


def test_repeated_requests_replay_in_order_then_run_out(tmp_path: Path) -> None:
    poll = req("GET", f"{API}/poll")
    path = tmp_path / "c.yaml"
    write_cassette(
        path,
        (poll, resp("pending")),
        (A, resp("other")),
        (poll, resp("running")),
        (poll, resp("done")),
    )
    player = open_cassette(path, "none")
    got = [player.lookup(poll) for _ in range(3)]
    assert [r.body if r else None for r in got] == [b"pending", b"running", b"done"]
    assert player.lookup(poll) is None  # each interaction plays once
    message = player.unmatched(poll)
    assert "3 recorded interaction(s) match it but were already played" in message
    assert player.unused() == [Cassette.load(path).interactions[1]]

    repeats = open_cassette(path, "none", allow_playback_repeats=True)
    got = [repeats.lookup(poll) for _ in range(5)]
    assert [r.body if r else None for r in got] == [
        b"pending",
        b"running",
        b"done",
        b"done",
        b"done",
    ]


def test_new_episodes_records_once_recorded_ones_run_out(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (A, resp("recorded-a")))
    player = open_cassette(path, "new_episodes")
    assert [drive(player, A), drive(player, A)] == ["replayed:recorded-a", "live:/a"]
    player.save()
    assert bodies(path) == ["recorded-a", "live:/a"]


def test_unmatched_names_the_differing_matcher_and_the_closest_candidates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(
        path,
        (req("POST", f"{API}/v1/items?page=2"), resp()),  # differs in method only
        (req("DELETE", "http://other.example/zzz"), resp()),  # differs in 5 places
        (req("GET", f"{API}/v1/items?page=3"), resp()),  # differs in query only
        (req("GET", f"{API}/v2/items?page=3"), resp()),  # path and query
        (req("PUT", f"{API}/v2/items"), resp()),  # method, path and query
    )
    player = open_cassette(path, "none")
    message = player.unmatched(req("GET", f"{API}/v1/items?page=2"))
    lines = message.splitlines()
    assert lines[0] == f"GET {API}/v1/items?page=2 is not in cassette {path}"
    assert "record mode 'none' only replays" in message
    assert (
        "closest recorded requests (matchers: method, scheme, host, port, path, query)" in message
    )
    closest = [line.strip() for line in lines if line.strip().startswith("#")]
    assert closest == [
        f"#0 POST {API}/v1/items?page=2: differs in method: recorded 'POST', got 'GET'",
        f"#2 GET {API}/v1/items?page=3: differs in query: recorded 'page=3', got 'page=2'",
        f"#3 GET {API}/v2/items?page=3: differs in path: recorded '/v2/items', got '/v1/items';"
        " query: recorded 'page=3', got 'page=2'",
    ]
    assert player.misses == [message]


@pytest.mark.parametrize(
    ("mode", "exists", "hint"),
    [
        ("none", False, "the cassette file does not exist; record it with --gondolin-record-mode"),
        ("once", True, "record mode 'once' only replays an existing cassette; delete it"),
        ("none", True, "record mode 'none' only replays; re-run with --gondolin-record-mode"),
    ],
)
def test_unmatched_explains_the_mode(tmp_path: Path, mode: str, exists: bool, hint: str) -> None:
    path = tmp_path / "c.yaml"
    if exists:
        write_cassette(path, (B, resp()))
    assert hint in open_cassette(path, mode).unmatched(A)


def test_unused_interactions_and_check(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (A, resp("a")), (B, resp("b")))
    player = open_cassette(path, "once")
    assert player.lookup(A) is not None
    unused = player.unused()
    assert [i.request.path for i in unused] == ["/b"]
    player.check()  # unused interactions are fine unless asked
    with pytest.raises(
        CassetteMismatch, match=r"1 recorded interaction\(s\) .* never used"
    ) as info:
        player.check(allow_unused=False)
    assert info.value.unused == unused and info.value.misses == []
    assert f"GET {API}/b" in str(info.value)
    assert isinstance(info.value, GondolinError)
    assert player.lookup(B) is not None
    player.check(allow_unused=False)
    assert open_cassette(tmp_path / "new.yaml", "all").unused() == []


# --------------------------------------------------------------------------- secrets and filters


def test_secret_values_are_never_written(tmp_path: Path) -> None:
    store = SecretStore({"GITHUB_TOKEN": Secret(REAL, ["api.example.com"])})
    placeholder = store.placeholder("GITHUB_TOKEN")
    guest = req(
        "POST",
        f"{API}/v1/{placeholder}?q={placeholder}",
        headers=(("X-Api-Key", placeholder), ("Authorization", f"token {placeholder}")),
        body=f"token={placeholder}".encode(),
    )
    # What the driver sends upstream: the real value substituted in headers.
    headers, _ = store.apply("api.example.com", guest.headers, f"{API}/", b"", port=443)
    outgoing = dataclasses.replace(guest, headers=tuple(headers))
    assert any(REAL in v for _, v in outgoing.headers)
    echo = HttpResponse(200, (("X-Echo", REAL),), f'{{"seen": "{REAL}"}}'.encode(), f"OK {REAL}")
    path = tmp_path / "c.yaml"
    player = open_cassette(path, "once", filter_headers=(), secret_store=store)
    player.record(guest, echo)  # the right call: the guest's request
    player.record(outgoing, echo)  # a wrong one: redaction still catches the value
    player.save()
    text = path.read_text()
    assert REAL not in text
    assert placeholder not in text  # the random suffix is not kept either
    assert "GONDOLIN_SECRET_GITHUB_TOKEN" in text
    assert base64.b64encode(REAL.encode()).decode() not in text
    interactions = Cassette.load(path).interactions
    assert interactions[0] == interactions[1]
    assert interactions[0].request.header("x-api-key") == "GONDOLIN_SECRET_GITHUB_TOKEN"
    assert interactions[0].response.message == "OK GONDOLIN_SECRET_GITHUB_TOKEN"


def test_basic_credentials_are_normalised_when_not_filtered(tmp_path: Path) -> None:
    store = SecretStore({"PASS": Secret(REAL, ["api.example.com"])})
    token = base64.b64encode(f"me:{store.placeholder('PASS')}".encode()).decode()
    player = open_cassette(tmp_path / "c.yaml", "once", filter_headers=(), secret_store=store)
    stored = player.record(req(headers=(("Authorization", f"Basic {token}"),)), resp())
    expected = base64.b64encode(b"me:GONDOLIN_SECRET_PASS").decode()
    assert stored.request.header("authorization") == f"Basic {expected}"


def test_placeholders_match_across_sessions(tmp_path: Path) -> None:
    def guest(store: SecretStore) -> HttpRequest:
        p = store.placeholder("TOKEN")
        return req("POST", f"{API}/v1/{p}?t={p}", headers=(("X-Token", p),), body=p.encode())

    path = tmp_path / "c.yaml"
    session1 = SecretStore({"TOKEN": Secret(REAL, ["api.example.com"])})
    recorder = open_cassette(path, "once", secret_store=session1)
    recorder.record(guest(session1), resp("hit"))
    recorder.save()
    session2 = SecretStore({"TOKEN": Secret(REAL, ["api.example.com"])})
    assert session1.placeholder("TOKEN") != session2.placeholder("TOKEN")
    # Even without the store (a leftover placeholder), and on body and headers too.
    for store in (session2, None):
        for matchers in (DEFAULT_MATCHERS, ("method", "uri", "body", "headers")):
            player = open_cassette(path, "none", matchers=matchers, secret_store=store)
            assert player.lookup(guest(session2)) is not None, (store, matchers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GONDOLIN_SECRET_TOKEN_" + "a" * 32, "GONDOLIN_SECRET_TOKEN"),
        ("x=GONDOLIN_SECRET_DB_PASS_" + "0f" * 16 + "&y", "x=GONDOLIN_SECRET_DB_PASS&y"),
        ("GONDOLIN_SECRET_TOKEN", "GONDOLIN_SECRET_TOKEN"),  # already normalised
        ("GONDOLIN_SECRET_TOKEN_" + "a" * 31, "GONDOLIN_SECRET_TOKEN_" + "a" * 31),  # not one
        ("GONDOLIN_SECRET_T_" + "A" * 32, "GONDOLIN_SECRET_T_" + "A" * 32),  # upper-case hex
        ("no placeholder", "no placeholder"),
    ],
)
def test_normalize_placeholders(text: str, expected: str) -> None:
    assert normalize_placeholders(text) == expected
    assert normalize_placeholders(expected) == expected


def test_default_filters(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    player = open_cassette(path, "once")
    stored = player.record(
        req(
            url=f"{API}/p?Access_Token=abc&x=1&api%5Fkey=k&token",
            headers=(
                ("authorization", "Bearer live-token"),
                ("Cookie", "session=abc"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("Accept", "*/*"),
            ),
        ),
        resp("x", Set_Cookie="session=new"),
    )
    assert stored.request.uri == (
        f"{API}/p?Access_Token={FILTERED}&x=1&api%5Fkey={FILTERED}&token={FILTERED}"
    )
    assert stored.request.header("Authorization") == FILTERED
    assert stored.request.header("cookie") == FILTERED
    assert stored.request.header("proxy-authorization") == FILTERED
    assert stored.request.header("accept") == "*/*"
    # Set-Cookie is kept so that replayed sessions work (see the module docs).
    assert stored.response.header("set-cookie") == "session=new"
    player.save()
    assert "live-token" not in path.read_text() and "abc" not in path.read_text()
    # The next run's different token still matches: the live request is filtered too.
    replay = open_cassette(path, "none")
    assert replay.lookup(req(url=f"{API}/p?Access_Token=OTHER&x=1&api_key=z&token")) is not None


def test_custom_filters(tmp_path: Path) -> None:
    player = open_cassette(
        tmp_path / "c.yaml",
        "once",
        filter_headers=["X-Secret"],
        filter_query=["sig"],
        filter_response_headers=["Set-Cookie"],
    )
    stored = player.record(
        req(url=f"{API}/p?sig=1&token=2", headers=(("Authorization", "a"), ("x-secret", "s"))),
        resp("x", Set_Cookie="id=1"),
    )
    assert stored.request.uri == f"{API}/p?sig={FILTERED}&token=2"
    assert stored.request.header("authorization") == "a"
    assert stored.request.header("x-secret") == FILTERED
    assert stored.response.header("set-cookie") == FILTERED


# --------------------------------------------------------------------------- saving


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (A, resp("old")))
    before = path.read_bytes()
    player = open_cassette(path, "all")
    player.record(A, resp("new"))

    def broken_replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CassetteError, match=r"cannot write cassette .*No space left"):
        player.save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no temp file left
    monkeypatch.undo()
    assert player.save()  # still dirty: a later save succeeds
    assert bodies(path) == ["new"]
    assert not player.save()  # idempotent


def test_save_skips_an_identical_file_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, (A, resp("same")))
    os.chmod(path, 0o640)
    stat = path.stat()
    player = open_cassette(path, "all")
    player.record(A, resp("same"))
    assert not player.save()  # same bytes: not rewritten
    assert path.stat().st_ino == stat.st_ino and path.stat().st_mtime_ns == stat.st_mtime_ns
    player = open_cassette(path, "all")
    player.record(A, resp("changed"))
    assert player.save()
    assert path.stat().st_mode & 0o777 == 0o640


def test_concurrent_recording(tmp_path: Path) -> None:
    player = open_cassette(tmp_path / "c.yaml", "once")

    def work(n: int) -> None:
        for i in range(25):
            player.record(req(url=f"{API}/{n}/{i}"), resp(f"{n}-{i}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(player.recorded) == 100
    player.save()
    assert len(Cassette.load(tmp_path / "c.yaml").interactions) == 100


# --------------------------------------------------------------------------- paths


def test_default_cassette_path(request: pytest.FixtureRequest) -> None:
    here = Path(__file__).parent
    expected = here / "cassettes" / "test_cassette" / "test_default_cassette_path.yaml"
    assert default_cassette_path(request.node) == expected


@pytest.mark.parametrize("value", ["plain-id_1.5", "a b/c"], ids=lambda v: v)
def test_default_cassette_path_with_parameters(request: pytest.FixtureRequest, value: str) -> None:
    path = default_cassette_path(request.node)
    if value == "plain-id_1.5":
        assert path.name == "test_default_cassette_path_with_parameters[plain-id_1.5].yaml"
    else:
        assert re.fullmatch(
            r"test_default_cassette_path_with_parameters\[a_b_c\]-[0-9a-f]{10}\.yaml", path.name
        )


class TestInAClass:
    def test_it(self, request: pytest.FixtureRequest) -> None:
        assert default_cassette_path(request.node).name == "TestInAClass.test_it.yaml"


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("test_x", r"test_x"),
        ("test_x[1-a]", r"test_x\[1-a\]"),
        ("test_x[a:b]", r"test_x\[a_b\]-[0-9a-f]{10}"),
        ("test_x[ünï]", r"test_x\[_n_\]-[0-9a-f]{10}"),
        ("CON", r"CON-[0-9a-f]{10}"),
        ("...", r"[0-9a-f]{10}"),
        ("t" * 300, r"t{120}-[0-9a-f]{10}"),
    ],
)
def test_safe_stem(name: str, pattern: str) -> None:
    assert re.fullmatch(pattern, _safe_stem(name))


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_safe_stems_are_portable_and_distinct(a: str, b: str) -> None:
    for name in (a, b):
        stem = _safe_stem(name)
        assert re.fullmatch(r"[A-Za-z0-9._\-\[\]=+,@]{1,131}", stem)
        assert not stem.startswith(".") and not stem.endswith(".")
    if a != b:
        assert _safe_stem(a) != _safe_stem(b)


def test_resolve_cassette_option(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    where = "test: sandboxed"
    assert resolve_cassette_option(None, where=where) is None
    assert resolve_cassette_option(False, where=where) is None
    assert resolve_cassette_option(True, where=where, item=request.node) == default_cassette_path(
        request.node
    )
    here = Path(__file__).parent
    assert resolve_cassette_option("c/api", where=where, item=request.node) == here / "c/api.yaml"
    assert (
        resolve_cassette_option("api.yml", where=where, base_dir=tmp_path) == tmp_path / "api.yml"
    )
    assert resolve_cassette_option(tmp_path / "x.json", where=where) == tmp_path / "x.json"
    with pytest.raises(ConfigError, match="cassette=True needs a test"):
        resolve_cassette_option(True, where=where)
    for bad in ("", 3, ["a"]):
        with pytest.raises(ConfigError, match="test: sandboxed: cassette must be True or a file"):
            resolve_cassette_option(bad, where=where)


# --------------------------------------------------------------------------- properties

_TCHAR = "!#$%&'*+.^_`|~-" + string.ascii_letters + string.digits
_FIELD = (
    "\t" + "".join(chr(c) for c in range(0x20, 0x7F)) + "".join(chr(c) for c in range(0x80, 0x100))
)
_URL_CHARS = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@/"

hosts = st.from_regex(r"[a-z]([a-z0-9-]{0,7}[a-z0-9])?(\.[a-z][a-z0-9]{0,8}){0,2}", fullmatch=True)
uris = st.builds(
    lambda scheme, host, port, path, query: (
        f"{scheme}://{host}{'' if port is None else f':{port}'}/{path}{f'?{query}' if query else ''}"
    ),
    st.sampled_from(["http", "https"]),
    hosts,
    st.none() | st.integers(1, 65535),
    st.text(_URL_CHARS, max_size=20),
    st.text(_URL_CHARS + "?", max_size=20),
)
header_lists = st.lists(
    st.tuples(st.text(_TCHAR, min_size=1, max_size=10), st.text(_FIELD, max_size=20)), max_size=4
)
bodies_st = st.binary(max_size=64) | st.text(max_size=64).map(
    lambda t: t.encode("utf-8", "surrogatepass")
)
interactions = st.builds(
    Interaction,
    st.builds(
        CassetteRequest,
        method=st.text(_TCHAR, min_size=1, max_size=10),
        uri=uris,
        headers=header_lists,
        body=bodies_st,
    ),
    st.builds(
        CassetteResponse,
        status=st.integers(200, 599),
        message=st.text(_FIELD, max_size=20),
        headers=header_lists,
        body=bodies_st,
    ),
)


@given(st.lists(interactions, max_size=4))
def test_random_cassettes_round_trip_through_yaml(items: list[Interaction]) -> None:
    cassette = Cassette(tuple(items))
    assert Cassette.from_yaml(cassette.to_yaml()) == cassette


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(interactions, min_size=1, max_size=3))
def test_random_cassettes_round_trip_through_save_and_load(
    tmp_path: Path, items: list[Interaction]
) -> None:
    path = tmp_path / "prop.yaml"
    path.unlink(missing_ok=True)
    cassette = Cassette(tuple(items))
    assert cassette.save(path)
    assert Cassette.load(path) == cassette
    assert not cassette.save(path)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "interactions",
                    "version",
                    "request",
                    "response",
                    "method",
                    "uri",
                    "headers",
                    "body",
                    "status",
                    "code",
                    "message",
                    "string",
                    "encoding",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@given(yaml_values)
def test_any_yaml_document_loads_or_raises_cassette_error(doc: object) -> None:
    try:
        Cassette.from_yaml(yaml.safe_dump(doc))
    except CassetteError:
        pass


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_load_or_raise_cassette_error(data: bytes | str) -> None:
    try:
        Cassette.from_yaml(data)
    except CassetteError:
        pass
