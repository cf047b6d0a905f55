"""The agent channel's sans-IO core and its calls, driven with byte strings only.

No socket, thread or clock: bytes "from the guest" go into
``ChannelCore.receive_data``, requests come out of ``encode`` /
``start_sync``. The fuzz target's invariant (as h11's): whatever the guest
sends, ``receive_data`` returns, the channel is OPEN or BROKEN, and every
call it failed failed with AgentProtocolError.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import (
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    StateError,
    VMError,
    WireProtocolError,
)
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.vm.agent_calls import CallState, ExecCall, ReadCall, SimpleCall
from pytest_gondolin.vm.channel_core import ChannelCore, ChannelState, exec_header

EXIT = {"returncode": 0, "timed_out": False, "truncated": False}


def frame(t: str, req_id: int, payload: bytes = b"", **fields: Any) -> bytes:
    return proto.encode_frame({"t": t, "id": req_id, **fields}, payload)


def decode_one(data: bytes) -> proto.Frame:
    dec = proto.FrameDecoder()
    dec.feed(data)
    got = dec.next_frame()
    assert got is not None
    return got


def sync_answer(request: bytes) -> bytes:
    """What the agent answers to the ``sync`` request ``request``."""
    req = decode_one(request)
    assert req.type == "sync"
    return frame("sync_ok", req.id, nonce=req.header["nonce"])


@pytest.fixture
def core() -> ChannelCore:
    return ChannelCore("t")


def registered(core: ChannelCore, call: Any) -> Any:
    core.register(call)
    return call


# -- calls ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "frames", "state", "check"),
    [
        pytest.param(
            lambda: SimpleCall("set_clock"),
            [("ok", b"", {})],
            CallState.DONE,
            lambda c: c.error is None,
            id="simple-ok",
        ),
        pytest.param(
            lambda: SimpleCall("set_clock"),
            [("error", b"", {"message": "nope", "errno": 1})],
            CallState.FAILED,
            lambda c: isinstance(c.error, AgentRequestError) and c.error.errno == 1,
            id="simple-error",
        ),
        pytest.param(
            lambda: ReadCall(5, path="/f"),
            [("data", b"12", {}), ("data", b"345", {}), ("ok", b"", {})],
            CallState.DONE,
            lambda c: bytes(c.data) == b"12345",
            id="read",
        ),
        pytest.param(
            lambda: ReadCall(4, path="/f"),
            [("data", b"12", {}), ("data", b"345", {})],
            CallState.FAILED,
            lambda c: isinstance(c.error, AgentProtocolError) and "max_size" in str(c.error),
            id="read-over-max-size",
        ),
        pytest.param(
            lambda: ExecCall(4, streaming=False),
            [
                ("started", b"", {"pid": 9}),
                ("stdout", b"abc", {}),
                ("stderr", b"de", {}),
                ("exit", b"", EXIT),
            ],
            CallState.DONE,
            lambda c: (bytes(c.stdout), bytes(c.stderr), c.truncated) == (b"abc", b"d", True),
            id="exec-capped",
        ),
        pytest.param(
            lambda: ExecCall(100, streaming=False),
            [("started", b"", {"pid": 9}), ("started", b"", {"pid": 9})],
            CallState.FAILED,
            lambda c: "duplicate 'started'" in str(c.error),
            id="exec-started-twice",
        ),
        pytest.param(
            lambda: ExecCall(100, streaming=False),
            [("ok", b"", {})],
            CallState.FAILED,
            lambda c: "unexpected 'ok' for a exec request" in str(c.error),
            id="exec-wrong-type",
        ),
        pytest.param(
            lambda: ExecCall(100, streaming=False),
            [("started", b"", {"pid": 9}), ("stdout", b"x", {})],
            CallState.RUNNING,
            lambda c: c.pid == 9 and not c.done,
            id="exec-running",
        ),
    ],
)
def test_calls_follow_their_frames(
    core: ChannelCore,
    make: Any,
    frames: list[tuple[str, bytes, dict[str, Any]]],
    state: CallState,
    check: Any,
) -> None:
    call = registered(core, make())
    assert call.state is CallState.PENDING
    core.receive_data(b"".join(frame(t, call.id, p, **f) for t, p, f in frames))
    assert call.state is state
    assert check(call), (call.error, call.__dict__)
    assert core.state is ChannelState.OPEN  # a bad frame for one call fails only that call


def test_streaming_exec_hands_out_lines_and_chunks_in_order(core: ChannelCore) -> None:
    call = registered(core, ExecCall(1000, streaming=True))
    core.receive_data(
        frame("started", call.id, pid=3)
        + frame("stdout", call.id, b"a\nb")
        + frame("stderr", call.id, b"E")
        + frame("stdout", call.id, b"c\nrest")
    )
    assert call.take_line() == b"a\n"
    assert call.take_line() == b"bc\n"  # stdout joined across chunks, stderr skipped
    assert call.take_line() is None
    assert call.take_chunk() == ("stdout", b"rest")  # the partial line comes first
    assert call.take_chunk() == ("stderr", b"E")
    assert call.take_chunk() is None
    core.receive_data(frame("exit", call.id, **EXIT))
    assert call.state is CallState.DONE and call.take_rest() == b""


def test_rewind_puts_a_finished_exec_back_to_running() -> None:
    call = ExecCall(10, streaming=True, pid=5)
    assert call.state is CallState.RUNNING
    call.fail(AgentError("x"))
    call.fail(VMError("second outcome ignored"))
    assert call.state is CallState.FAILED and str(call.error) == "x"
    call.rewind()
    assert (call.state, call.error, call.pid) == (CallState.RUNNING, None, 5)


def test_a_finished_call_takes_no_more_frames() -> None:
    call = SimpleCall("entropy")
    call.fail(AgentError("abandoned"))
    with pytest.raises(StateError) as info:
        call.receive(decode_one(frame("ok", 0)))
    assert info.value.state is CallState.FAILED


# -- the channel -----------------------------------------------------------------------


def test_ready_is_kept_and_unknown_ids_and_stale_sync_ok_are_dropped(core: ChannelCore) -> None:
    call = registered(core, SimpleCall("poweroff"))
    core.receive_data(
        frame("ready", 0, version=proto.PROTOCOL_VERSION, pid=1)
        + frame("ok", call.id + 1)
        + frame("sync_ok", 7, nonce="a" * 32)
    )
    assert core.ready == {"t": "ready", "id": 0, "version": proto.PROTOCOL_VERSION, "pid": 1}
    assert call.state is CallState.PENDING and core.state is ChannelState.OPEN


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xff" * 8, id="oversized-length"),
        pytest.param(b"\x00\x00\x00\x06\x00\x00\x00\x02[]", id="header-not-object"),
        pytest.param(frame("exec", 1, argv=["x"]), id="host-only-type"),
        pytest.param(frame("ok", 1, b"payload"), id="payload-where-none-allowed"),
    ],
)
def test_garbage_breaks_the_channel_until_a_sync(core: ChannelCore, garbage: bytes) -> None:
    pending = registered(core, SimpleCall("entropy"))
    core.receive_data(garbage)
    assert core.state is ChannelState.BROKEN
    assert isinstance(pending.error, AgentProtocolError)
    assert isinstance(pending.error, WireProtocolError) and isinstance(pending.error, AgentError)
    with pytest.raises(AgentProtocolError, match="channel unusable: guest broke protocol"):
        core.check_usable()
    with pytest.raises(StateError):  # the driver checks usability first; this is a bug guard
        core.register(SimpleCall("entropy"))
    request, scan = core.start_sync([], entropy=b"", clock_ns=None)
    assert core.state is ChannelState.SYNCING
    # Junk (even a cut frame) before the answer is skipped; a frame right after it counts.
    core.receive_data(b"\x00\x00\x10\x00junk" + sync_answer(request)[:5])
    assert core.state is ChannelState.SYNCING
    core.receive_data(sync_answer(request)[5:])
    assert scan.done and core.state is ChannelState.OPEN
    core.finish_sync()
    assert core.state is ChannelState.OPEN  # finishing an answered sync changes nothing
    after = registered(core, SimpleCall("set_clock"))
    core.receive_data(frame("ok", after.id))
    assert after.state is CallState.DONE


def test_a_sync_without_answer_leaves_the_channel_broken(core: ChannelCore) -> None:
    core.start_sync([], entropy=b"", clock_ns=None)
    core.finish_sync()
    assert core.state is ChannelState.BROKEN
    with pytest.raises(AgentProtocolError, match="sync did not complete"):
        core.check_usable()


def test_sync_resets_all_but_preserved_processes(core: ChannelCore) -> None:
    kept = registered(core, ExecCall(100, streaming=True))
    core.receive_data(frame("started", kept.id, pid=4) + frame("stdout", kept.id, b"old"))
    dropped = registered(core, SimpleCall("entropy"))
    request, _ = core.start_sync([kept], entropy=b"e" * 8, clock_ns=123)
    req = decode_one(request)
    assert (req.payload, req.header["clock_ns"]) == (b"e" * 8, 123)
    assert isinstance(dropped.error, AgentError) and "state reset by restore" in str(dropped.error)
    assert kept.state is CallState.RUNNING and kept.take_chunk() is None  # rewound
    core.receive_data(sync_answer(request) + frame("stdout", kept.id, b"new"))
    assert kept.take_chunk() == ("stdout", b"new")


def test_lose_and_close(core: ChannelCore) -> None:
    pending = registered(core, SimpleCall("entropy"))
    assert core.lose(VMError("t: agent channel closed by the guest (EOF)"))
    assert not core.lose(VMError("t: again"))  # once
    assert core.state is ChannelState.LOST and core.gone
    assert isinstance(pending.error, VMError) and not isinstance(pending.error, AgentError)
    with pytest.raises(VMError, match=r"^t: agent channel closed by the guest \(EOF\)$"):
        core.check_alive()
    assert core.close()
    assert not core.close()
    with pytest.raises(VMError, match="EOF"):  # closing after a loss keeps the reason
        core.check_usable()
    core.receive_data(frame("ok", pending.id))  # ignored once gone
    assert not core.lose(VMError("t: late"))


def test_attach_claims_the_original_id(core: ChannelCore) -> None:
    first = ExecCall(10, streaming=True, pid=7)
    core.attach(first, 42)
    assert first.id == 42
    with pytest.raises(AgentError, match="request id 42 is already in use"):
        core.attach(ExecCall(10, streaming=True, pid=7), 42)
    core.receive_data(frame("stdout", 42, b"hi"))
    assert first.take_chunk() == ("stdout", b"hi")


def test_bad_requests_are_refused_before_anything_is_sent(core: ChannelCore) -> None:
    with pytest.raises(AgentProtocolError, match="invalid read request"):
        core.encode({"t": "read", "id": 1, "path": "relative", "max_size": 1})
    header = exec_header(5, ["true"], None, None, None, 10, None)
    assert decode_one(core.encode(header)).header["stdin"] is False
    assert exec_header(5, ["cat"], {"A": "b"}, "/", 1.0, 10, b"")["stdin"] is True


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    frame("ok", 1),
                    frame("started", 1, pid=2),
                    frame("stdout", 1, b"x" * 10),
                    frame("exit", 1, **EXIT),
                    frame("data", 2, b"abc"),
                    frame("error", 2, message="m", errno=None),
                ]
            ),
        ),
        max_size=12,
    )
)
def test_random_guest_bytes_never_escape_the_core(chunks: list[bytes]) -> None:
    core = ChannelCore("fuzz")
    core._next_id = 1  # the sampled frames address ids 1 and 2
    calls = [
        registered(core, ExecCall(64, streaming=True)),
        registered(core, ReadCall(8, path="/f")),
    ]
    for chunk in chunks:
        core.receive_data(chunk)
    assert core.state in (ChannelState.OPEN, ChannelState.BROKEN)
    for call in calls:
        assert call.state in CallState
        if call.state is CallState.FAILED:
            assert isinstance(call.error, AgentProtocolError | AgentRequestError)
        if isinstance(call, ExecCall):
            assert call.received <= call.max_output
        else:
            assert len(call.data) <= call.max_size
