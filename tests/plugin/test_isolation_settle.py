"""Process isolation's verdict after ``done``: how the host reads it and when a lane is restored.

No VM: the worker's side is driven through a real ``Isolation`` only where a
test needs the guest (test_isolation.py); here the host's reader gets the
lines a worker (or a hostile guest) could send, and the pool gets members.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.sandbox.isolation import LaneLedger, read_settled
from pytest_gondolin.vm.pool import RestorePool


def lines(*items: bytes | type[TimeoutError] | None) -> Callable[[float], bytes | None]:
    """A transport's ``recv_line`` that returns ``items`` in turn."""
    queue = list(items)

    def recv_line(timeout: float) -> bytes | None:
        assert timeout >= 0
        item = queue.pop(0)
        if item is TimeoutError:
            raise TimeoutError("nothing")
        assert item is None or isinstance(item, bytes)
        return item

    return recv_line


#: The run's seal (guest/process_runs.py); the verdicts here carry it.
KEY = "0123456789abcdef"


def settled(reason: str) -> bytes:
    return json.dumps({"t": "settled", "reason": reason, "key": KEY}).encode() + b"\n"


def test_a_clean_verdict_is_none_and_live_output_before_it_is_skipped() -> None:
    assert read_settled(lines(settled("")), seal=KEY) is None
    output = b'{"t":"output","stream":"stdout","data":"late"}\n'
    assert read_settled(lines(output, output, settled("")), seal=KEY) is None


def test_a_dirty_verdict_names_the_change_bounded_and_printable() -> None:
    reason = read_settled(
        lines(settled("the clock was set (+5.0 s)\x1b[2J\n\u202e" + "x" * 5000)), seal=KEY
    )
    assert reason is not None
    assert reason.startswith(
        "the test changed kernel state: the clock was set (+5.0 s)^[[2J^J\\u202exxx"
    )
    assert reason.isprintable()
    assert len(reason) < 400


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ((TimeoutError,), "the worker sent no verdict within 30 s of the run"),
        ((None,), "the worker's output ended after the run"),
        ((b"{not json\n",), "the worker's verdict is not JSON: b'{not json\\n'"),
        ((b'{"t":"done","nodeid":"x"}\n',), "expected the worker's verdict, got 'done'"),
        ((b'{"t":"settled","reason":7}\n',), "expected the worker's verdict, got 'settled'"),
        ((b"[1, 2]\n",), "expected the worker's verdict, got None"),
        (
            (b'{"t":"output","data":"x"}\n',) * 100,
            "more than 100 lines before the worker's verdict",
        ),
    ],
)
def test_anything_but_a_verdict_means_a_restore(
    items: tuple[bytes | type[TimeoutError] | None, ...], expected: str
) -> None:
    assert read_settled(lines(*items), seal=KEY) == expected


class FakeVM:
    """What LaneLedger.settle touches of a VM: no network, so nothing to reset."""

    name = "lane"
    network = None


def test_ledger_settle_counts_and_logs_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    ledger = LaneLedger(restore_every=100)
    vm = FakeVM()
    assert ledger.settle(vm, lines(settled("")), seal=KEY) is True  # type: ignore[arg-type]
    caplog.set_level("INFO", logger="pytest_gondolin.sandbox.isolation")
    assert ledger.settle(vm, lines(settled("kernel modules were loaded")), seal=KEY) is False  # type: ignore[arg-type]
    assert ledger.settle(vm, lines(None), seal=KEY) is False  # type: ignore[arg-type]
    assert ledger.fallbacks == {"kernel state": 1, "settle": 1}
    assert (
        "restoring the VM after a process-isolated run: the test changed kernel state: "
        "kernel modules were loaded"
    ) in caplog.text


class Member:
    def __init__(self, name: str) -> None:
        self.name, self.alive = name, True

    def close(self) -> None:
        self.alive = False


@pytest.mark.parametrize("verdict", [True, False, SnapshotError("reset failed")])
def test_one_member_pool_settles_before_handing_out_again(verdict: bool | Exception) -> None:
    restored: list[Member] = []
    settles: list[Member] = []
    pool = RestorePool[Member](None, restored.append, size=1)
    member = Member("m")
    pool.add(member)

    def settle(m: Member) -> bool:
        settles.append(m)
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    assert pool.take() is member
    pool.give_back(member, settle=settle)
    assert settles == []  # with one member, settled by the next take
    assert pool.take() is member
    assert settles == [member]
    assert restored == ([] if verdict is True else [member])
    pool.close()


def test_two_member_pool_settles_in_the_background_while_the_other_member_serves() -> None:
    restored: list[Member] = []
    release = threading.Event()
    a, b = Member("a"), Member("b")
    pool = RestorePool[Member](None, restored.append, size=2)
    pool.add(a)
    pool.add(b)

    def slow_settle(m: Member) -> bool:
        assert release.wait(10)
        return False  # dirty: the pool restores it

    assert pool.take() is a
    pool.give_back(a, settle=slow_settle)
    assert pool.take() is b  # a is still settling
    pool.give_back(b, clean=True)
    assert pool.take() is b
    release.set()
    pool.give_back(b, clean=True)
    # b is ready, so it serves; a is restored once its settle said dirty.
    assert pool.take() is b
    pool.give_back(b, clean=True)
    pool.close()
    assert restored == [a]
