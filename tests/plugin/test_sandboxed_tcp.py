"""``@pytest.mark.sandboxed(tcp=...)``: a named raw-TCP service for one sandboxed test."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A host TCP server answering each line with ``echo: <line>``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(b"echo: " + line)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


TESTS = """
import socket

import pytest


def talk():
    with socket.create_connection(("db.test", 5432), timeout=20) as s:
        s.sendall(b"ping\\n")
        return s.recv(100)


@pytest.mark.sandboxed(tcp={{"db.test:5432": "127.0.0.1:{port}"}})
def test_service_reachable():
    assert talk() == b"echo: ping\\n"


@pytest.mark.sandboxed
def test_service_needs_the_entry():
    with pytest.raises(socket.gaierror):  # no entry names db.test: its lookup fails
        assert talk() == b""
"""

BAD = """
import pytest


@pytest.mark.sandboxed(tcp={"db.test": "127.0.0.1:5432"})
def test_bad_entry():
    pass
"""


def test_tcp_service_per_sandboxed_test(pytester: pytest.Pytester, echo_port: int) -> None:
    pytester.makepyfile(test_services=TESTS.format(port=echo_port), test_bad=BAD)
    # A bad entry fails at collection, naming it; the other module still runs.
    result = pytester.runpytest_subprocess(
        "-p", "gondolin", "-v", "--continue-on-collection-errors"
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.re_match_lines([r".*tcp\['db\.test'\]: 'db\.test' needs a port.*"])


FROM_INI = """
import socket

import pytest


@pytest.mark.sandboxed
def test_service_from_ini():
    with socket.create_connection(("db.test", 5432), timeout=20) as s:
        s.sendall(b"ping\\n")
        assert s.recv(100) == b"echo: ping\\n"


@pytest.mark.sandboxed(tcp={"db.test:5432": "127.0.0.1:1"})
def test_the_marker_entry_wins():
    with pytest.raises(ConnectionRefusedError):  # its target, port 1, refuses
        socket.create_connection(("db.test", 5432), timeout=20)
"""


def test_tcp_service_from_ini(pytester: pytest.Pytester, echo_port: int) -> None:
    # gondolin_tcp gives every sandboxed test the service; a marker's entry
    # for the same name:port replaces it for that test.
    pytester.makeini(f"[pytest]\ngondolin_tcp =\n    db.test:5432=127.0.0.1:{echo_port}\n")
    pytester.makepyfile(test_from_ini=FROM_INI)
    result = pytester.runpytest_subprocess("-p", "gondolin", "-v")
    result.assert_outcomes(passed=2)
