"""The ``tcp`` network option: validation, lookup, and the stream records."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.rules import is_ip_literal
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow, TcpFlowLog
from pytest_gondolin.netpolicy.http.tcp_services import parse_tcp_services


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ({"db.test": "127.0.0.1:5432"}, r"tcp\['db.test'\]: 'db.test' needs a port"),
        ({"db.test:0": "127.0.0.1:5432"}, r"tcp\['db.test:0'\].*invalid port '0'"),
        ({"db.test:70000": "127.0.0.1:5432"}, r"tcp\['db.test:70000'\].*invalid port '70000'"),
        ({"db.test:x": "127.0.0.1:5432"}, r"invalid port 'x'"),
        ({"db.test:5432": "127.0.0.1"}, r"'127.0.0.1' needs a port"),
        ({"db.test:5432": "127.0.0.1:0"}, r"invalid port '0'"),
        ({"db.test:5432": 5432}, r"the value must be an 'addr:port' string, got 5432"),
        ({5432: "127.0.0.1:5432"}, r"tcp\[5432\]: the key must be a 'name:port' string, got int"),
        ({None: "127.0.0.1:5432"}, r"the key must be a 'name:port' string, got NoneType"),
        ({"*.test:5432": "127.0.0.1:5432"}, r"wildcards are not supported"),
        ({"10.0.0.1:5432": "127.0.0.1:5432"}, r"not an address"),
        ({"db.test:5432": "db.internal:5432"}, r"must be an IP address and port"),
        ({"bad name:5432": "127.0.0.1:5432"}, r"not a valid host name"),
        ({"db.test:5432": "127.0.0.1:1", "DB.test:5432": "127.0.0.1:2"}, r"duplicates"),
        ("db.test:5432", r"tcp: expected a dict"),
        (["db.test:5432"], r"tcp: expected a dict"),
    ],
)
def test_bad_entries_fail_naming_them(entries: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        NetworkPolicy(tcp=entries)  # type: ignore[arg-type]


def test_entries_are_looked_up_by_normalised_name_and_port() -> None:
    policy = NetworkPolicy.from_options(
        tcp={
            "DB.Test:5432": "localhost:15432",
            "cache.test:6379": "[::1]:6379",
            "q.test:5672": "10.1.2.3:5672",
        }
    )
    db = policy.tcp_service("db.test", 5432)
    assert db is not None and (db.target_ip, db.target_port, db.target) == (
        "127.0.0.1",
        15432,
        "127.0.0.1:15432",
    )
    cache = policy.tcp_service("cache.test", 6379)
    assert cache is not None and cache.target == "[::1]:6379"
    # Internal targets are fine: the entry names them (block_internal is for HTTP upstreams).
    assert policy.block_internal and policy.tcp_service("q.test", 5672) is not None
    # Anything else is not a service: another port, another name, an address.
    assert policy.tcp_service("db.test", 5433) is None
    assert policy.tcp_service("other.test", 5432) is None
    assert policy.tcp_service(None, 5432) is None
    # A tcp entry allows no HTTP to that name.
    assert not policy.decide("db.test", 5432, "http").allowed


def test_policies_with_different_services_differ() -> None:
    a = NetworkPolicy(tcp={"db.test:5432": "127.0.0.1:1"})
    b = NetworkPolicy(tcp={"db.test:5432": "127.0.0.1:2"})
    assert a != b and hash(a) != hash(b)
    assert a == NetworkPolicy(tcp={"db.test:5432": "127.0.0.1:1"})
    assert parse_tcp_services({}) == {}


def _flow(flow_id: int, **changes: object) -> TcpFlow:
    base = TcpFlow(flow_id, "tcp", "db.test", 5432, "127.0.0.1:5432", 1.0)
    return TcpFlow(**{**base.to_dict(), **changes})  # type: ignore[arg-type]


def test_the_log_updates_in_place_is_bounded_and_clears() -> None:
    log = TcpFlowLog(max_flows=3)
    for i in range(1, 6):
        log.record(_flow(i))
    assert [f.id for f in log.flows] == [3, 4, 5]  # oldest dropped first
    log.update(_flow(4, ended="closed", duration=0.5, bytes_from_guest=10))
    assert [(f.id, f.ended) for f in log.flows] == [(3, None), (4, "closed"), (5, None)]
    assert log.flows[1].summary() == (
        "tcp db.test:5432 -> 127.0.0.1:5432: 10 B from guest, 0 B to guest, closed after 0.50 s"
    )
    log.update(_flow(1, ended="closed"))  # dropped long ago: not resurrected
    assert [f.id for f in log.flows] == [3, 4, 5]


def test_recorder_clear_forgets_streams_and_a_later_end_does_not_bring_them_back() -> None:
    recorder = Recorder()
    recorder.tcp_log.record(_flow(1))
    assert recorder.tcp_flows == [_flow(1)] and recorder.tcp_flows[0].open
    recorder.clear()
    recorder.tcp_log.update(_flow(1, ended="closed"))
    assert recorder.tcp_flows == []
    assert '"tcp_flows": []' in recorder.to_json()


_TEXT = st.text(alphabet="ab.:[]*-_0123456789x\u00e9 ", max_size=24)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_TEXT | st.integers() | st.none(), _TEXT | st.integers(), max_size=4))
def test_any_tcp_option_parses_or_fails_with_config_error(entries: dict[object, object]) -> None:
    try:
        services = parse_tcp_services(entries)
    except ConfigError as exc:
        assert str(exc).startswith("tcp")
        return
    for (name, port), service in services.items():
        assert 1 <= port <= 65535 and 1 <= service.target_port <= 65535
        assert service.name == name and not is_ip_literal(name)
        assert is_ip_literal(service.target_ip)
