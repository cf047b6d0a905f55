"""``tcp`` services from ini/env/CLI (``gondolin_tcp``, ``GONDOLIN_TCP``), merged under the marker's."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_gondolin.config import Settings, load_settings, parse_tcp
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.tcp_services import merge_tcp_services
from pytest_gondolin.sandbox.options import options_from_marks

SOURCE = "$GONDOLIN_TCP"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("", ()),
        ("db.test:5432=127.0.0.1:5432", (("db.test:5432", "127.0.0.1:5432"),)),
        (
            " db.test:5432 = 127.0.0.1:5432 , cache.test:6379=[::1]:6379,",
            (("db.test:5432", "127.0.0.1:5432"), ("cache.test:6379", "[::1]:6379")),
        ),
        (  # an ini linelist: one per line, comments and blanks skipped
            ["# the CI database", "db.test:5432=127.0.0.1:5432", "", "q.test:5672=localhost:5672"],
            (("db.test:5432", "127.0.0.1:5432"), ("q.test:5672", "localhost:5672")),
        ),
    ],
)
def test_tcp_entries_parse(value: object, expected: tuple[tuple[str, str], ...]) -> None:
    assert parse_tcp(value, SOURCE) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("db.test:5432", r"tcp entry 'db\.test:5432' must look like 'name:port=addr:port'"),
        ("db.test:5432=", r"tcp entry 'db\.test:5432=' must look like"),
        ("=127.0.0.1:1", r"tcp entry '=127\.0\.0\.1:1' must look like"),
        ("a.test:1=b=c", r"tcp entry 'a\.test:1=b=c' must look like"),
        ("db.test=127.0.0.1:5432", r"tcp entry 'db\.test=127\.0\.0\.1:5432': .*needs a port"),
        ("db.test:0=127.0.0.1:5432", r"tcp entry 'db\.test:0=127\.0\.0\.1:5432': .*1\.\.65535"),
        ("db.test:5432=db.host:5432", r"tcp entry 'db\.test:5432=db\.host:5432': .*IP address"),
        ("*.test:1=127.0.0.1:1", r"tcp entry '\*\.test:1=127\.0\.0\.1:1': .*wildcards"),
        (
            "db.test:1=127.0.0.1:1,DB.test:1=127.0.0.1:2",
            r"tcp entry 'DB\.test:1=127\.0\.0\.1:2': .*duplicates",
        ),
        (3, r"expected tcp services as 'name:port=addr:port' entries, got 3"),
    ],
)
def test_bad_tcp_entries_name_the_source_and_the_entry(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^\$GONDOLIN_TCP: {message}"):
        parse_tcp(value, SOURCE)


def test_tcp_precedence_ini_env_cli(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GONDOLIN_TCP", raising=False)
    assert load_settings(pytester.parseconfig()).tcp == ()
    pytester.makeini(
        "[pytest]\ngondolin_tcp =\n    a.test:1=127.0.0.1:1\n    b.test:2=127.0.0.1:2\n"
    )
    ini = load_settings(pytester.parseconfig()).tcp
    assert ini == (("a.test:1", "127.0.0.1:1"), ("b.test:2", "127.0.0.1:2"))
    monkeypatch.setenv("GONDOLIN_TCP", "c.test:3=127.0.0.1:3")  # replaces the ini's, as usual
    assert load_settings(pytester.parseconfig()).tcp == (("c.test:3", "127.0.0.1:3"),)
    config = pytester.parseconfig("--gondolin-tcp=d.test:4=127.0.0.1:4")
    assert load_settings(config).tcp == (("d.test:4", "127.0.0.1:4"),)
    monkeypatch.setenv("GONDOLIN_TCP", "c.test=127.0.0.1:3")
    with pytest.raises(pytest.UsageError, match=r"\$GONDOLIN_TCP: tcp entry 'c\.test=.*needs"):
        load_settings(pytester.parseconfig())


def test_the_override_wins_per_name_and_port() -> None:
    base = {"db.test:5432": "127.0.0.1:1", "q.test:5672": "127.0.0.1:2"}
    assert merge_tcp_services(base, None) == base
    assert merge_tcp_services(
        base, {"DB.test:5432": "127.0.0.1:9", "new.test:1": "127.0.0.1:3"}
    ) == {
        "q.test:5672": "127.0.0.1:2",
        "DB.test:5432": "127.0.0.1:9",
        "new.test:1": "127.0.0.1:3",
    }
    assert merge_tcp_services(base, "not a dict") == "not a dict"  # validated later, named there
    assert merge_tcp_services({}, {"x.test:1": "127.0.0.1:1"}) == {"x.test:1": "127.0.0.1:1"}


SETTINGS = Settings(
    accel="tcg",
    image="debian",
    memory_mib=256,
    cpus=1,
    boot_timeout=60.0,
    timeout=None,
    keep_vm=False,
    record_mode="none",
    artifacts=None,
    tcp=(("db.test:5432", "127.0.0.1:5432"),),
)


def _policy_tcp(settings: Settings, **marker: object) -> dict[str, str] | None:
    mark = pytest.mark.sandboxed(**marker).mark
    policy = options_from_marks([mark], settings, nodeid="t.py::t").policy
    return None if policy is None else dict(policy.tcp)


def test_a_sandboxed_test_gets_the_session_services_under_its_own() -> None:
    assert _policy_tcp(SETTINGS) == {"db.test:5432": "127.0.0.1:5432"}
    assert _policy_tcp(SETTINGS, tcp={"db.test:5432": "127.0.0.1:6000"}) == {
        "db.test:5432": "127.0.0.1:6000"
    }
    both = _policy_tcp(SETTINGS, allow_hosts=["api.test"], tcp={"c.test:1": "127.0.0.1:1"})
    assert both == {"db.test:5432": "127.0.0.1:5432", "c.test:1": "127.0.0.1:1"}
    # Negative control: without session services a bare marker stays deny-all.
    assert _policy_tcp(dataclasses.replace(SETTINGS, tcp=())) is None
    with pytest.raises(ConfigError, match=r"t\.py::t: sandboxed: tcp\['c\.test'\]: .*needs a port"):
        _policy_tcp(SETTINGS, tcp={"c.test": "127.0.0.1:1"})
