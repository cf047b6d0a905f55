"""A ``process`` run's verdict counts only with the key of the run's seal (sandbox/isolation.py).

The test process shares the worker's channel, so it can write a clean
verdict (``settled``) itself; the worker opens each run with ``seal`` — a
key made after the test process was forked, which it never holds — and puts
the key in its verdict. The host takes the seal only as the run's first
message (live output aside) and a verdict only with its key; anything else
means a restore. Plugin-level proof with a real guest:
``tests/plugin/test_hostile_process_verdict.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox.isolation import UNSEALED, read_settled
from tests.unit.sandbox._wire import DONE, NODEID, line, report_line, started

KEY = "4f1c2e9a0b7d3c5e8f6a1b2c3d4e5f60"


def _lines(*items: bytes | None) -> Callable[[float], bytes | None]:
    queue = list(items)

    def recv(timeout: float) -> bytes | None:
        return queue.pop(0)

    return recv


def _verdict(reason: str = "", **extra: object) -> bytes:
    return json.dumps({"t": "settled", "reason": reason, **extra}).encode() + b"\n"


def test_the_worker_s_verdict_with_the_key_is_taken() -> None:
    """Control: the worker's clean verdict keeps the VM, a dirty one names the change."""
    assert read_settled(_lines(_verdict(key=KEY)), seal=KEY) is None
    dirty = read_settled(_lines(_verdict("kernel modules were loaded", key=KEY)), seal=KEY)
    assert dirty == "the test changed kernel state: kernel modules were loaded"


@pytest.mark.parametrize(
    "forged",
    [
        _verdict(),  # no key
        _verdict(key=""),
        _verdict(key="chosen-by-the-test"),
        _verdict(key=KEY.upper()),
        _verdict(key=[KEY]),
        _verdict(key=None),
    ],
)
def test_a_verdict_without_the_run_s_key_means_a_restore(forged: bytes) -> None:
    assert read_settled(_lines(forged), seal=KEY) == UNSEALED


def test_without_a_seal_no_verdict_is_taken() -> None:
    for key in (None, "", KEY):
        assert read_settled(_lines(_verdict(key=key)), seal=None) == UNSEALED


def test_a_forged_verdict_before_the_real_one_is_the_one_read() -> None:
    """The forger's line comes first; it is refused, so the VM is restored either way."""
    recv = _lines(_verdict(), _verdict("the clock was set", key=KEY))
    assert read_settled(recv, seal=KEY) == UNSEALED


def test_the_seal_is_kept_when_it_opens_the_run() -> None:
    seal = line({"t": "seal", "key": KEY})
    output = line({"t": "output", "stream": "stdout", "data": "x"})
    client, _ = started([output, seal, report_line(when="setup"), DONE])
    client.run(NODEID, seed=0, timeout=5)
    assert client.seal == KEY
    client2, _ = started([report_line(when="setup"), DONE])  # a vm-mode run: none
    client2.run(NODEID, seed=0, timeout=5)
    assert client2.seal is None


@pytest.mark.parametrize("key", [KEY, "chosen-by-the-test"])
def test_a_seal_after_the_run_began_is_a_protocol_error(key: str) -> None:
    seal = line({"t": "seal", "key": key})
    client, transport = started([report_line(when="setup"), seal, DONE])
    with pytest.raises(WorkerProtocolError, match="a seal that is not the run's first message"):
        client.run(NODEID, seed=0, timeout=5)
    assert transport.killed and client.seal is None


def test_a_second_seal_is_a_protocol_error() -> None:
    seal = line({"t": "seal", "key": KEY})
    client, _ = started([seal, seal, DONE])
    with pytest.raises(WorkerProtocolError, match="not the run's first"):
        client.run(NODEID, seed=0, timeout=5)
