"""Tests for the agent wire protocol (framing, decoder, message table)."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.guest.protocol import (
    CHUNK,
    MAX_FRAME,
    MAX_HEADER,
    MAX_ID,
    MESSAGES,
    Frame,
    FrameDecoder,
    FrameError,
    encode_frame,
    validate,
    validate_frame,
)


def raw_frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    """A frame with exactly these header bytes (no validation), for hostile inputs."""
    return struct.pack(">II", 4 + len(header_bytes) + len(payload), len(header_bytes)) + (
        header_bytes + payload
    )


def decode_all(data: bytes) -> list[Frame]:
    dec = FrameDecoder()
    dec.feed(data)
    frames = list(dec)
    assert dec.buffered == 0
    return frames


# -- framing --------------------------------------------------------------------


def test_encode_layout() -> None:
    data = encode_frame({"t": "ok", "id": 7}, b"xyz")
    header = b'{"id":7,"t":"ok"}'
    assert data == struct.pack(">II", 4 + len(header) + 3, len(header)) + header + b"xyz"


def test_encoding_is_canonical() -> None:
    # The host finds sync_ok by its exact bytes, so key order must not matter.
    a = encode_frame({"t": "sync_ok", "id": 3, "nonce": "n"})
    b = encode_frame({"nonce": "n", "id": 3, "t": "sync_ok"})
    assert a == b


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ({"t": "ok", "id": 0}, b""),
        ({"t": "stdout", "id": MAX_ID - 1}, b"\x00\xff" * 1000),
        ({"t": "error", "id": 1, "message": "caf\u00e9 \u2603", "errno": None}, b""),
        ({"t": "exec", "id": 2, "argv": ["a", "b"], "env": {"K": "V"}, "nested": [1, [2]]}, b""),
        ({"t": "data", "id": 5}, bytes(CHUNK)),
    ],
)
def test_round_trip(header: dict[str, Any], payload: bytes) -> None:
    (frame,) = decode_all(encode_frame(header, payload))
    assert frame == Frame(header, payload)
    assert frame.type == header["t"]
    assert frame.id == header["id"]


def test_decoder_handles_byte_by_byte_and_batched_input() -> None:
    frames = [
        encode_frame({"t": "ok", "id": 1}),
        encode_frame({"t": "data", "id": 2}, b"payload"),
        encode_frame({"t": "ok", "id": 3}),
    ]
    stream = b"".join(frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        out.extend(dec)
    assert [f.id for f in out] == [1, 2, 3]
    assert out[1].payload == b"payload"
    assert [f.id for f in decode_all(stream)] == [1, 2, 3]


def test_next_frame_needs_more_data() -> None:
    data = encode_frame({"t": "ok", "id": 1})
    dec = FrameDecoder()
    dec.feed(data[:-1])
    assert dec.next_frame() is None
    dec.feed(data[-1:])
    assert dec.next_frame() == Frame({"t": "ok", "id": 1})
    assert dec.next_frame() is None


def test_max_frame_boundary() -> None:
    header = {"t": "data", "id": 1}
    overhead = len(encode_frame(header)) - 4
    exact = encode_frame(header, bytes(MAX_FRAME - overhead))
    assert len(exact) == 4 + MAX_FRAME
    assert decode_all(exact)[0].payload == bytes(MAX_FRAME - overhead)
    with pytest.raises(FrameError, match="MAX_FRAME"):
        encode_frame(header, bytes(MAX_FRAME - overhead + 1))


def test_oversized_length_rejected_before_the_body_arrives() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError, match="MAX_FRAME"):
        dec.next_frame()


BAD_FRAMES: list[tuple[str, bytes, str]] = [
    ("too long", struct.pack(">II", MAX_FRAME + 1, 2) + b"{}", "MAX_FRAME"),
    ("too short", struct.pack(">I", 3) + b"abc", "too short"),
    ("header over max", struct.pack(">II", MAX_FRAME, MAX_HEADER + 1), "MAX_HEADER"),
    ("header past frame", struct.pack(">II", 10, 7) + bytes(6), "exceeds frame length"),
    ("bad utf-8", raw_frame(b'{"t":"ok","id":1,"x":"\xff"}'), "UTF-8"),
    ("not json", raw_frame(b"{nope"), "not valid JSON"),
    ("empty header", raw_frame(b""), "not valid JSON"),
    ("array", raw_frame(b"[1,2]"), "JSON object"),
    ("string", raw_frame(b'"ok"'), "JSON object"),
    ("missing t", raw_frame(b'{"id":1}'), "'t'"),
    ("t not str", raw_frame(b'{"t":5,"id":1}'), "'t'"),
    ("t empty", raw_frame(b'{"t":"","id":1}'), "'t'"),
    ("missing id", raw_frame(b'{"t":"ok"}'), "'id'"),
    ("id bool", raw_frame(b'{"t":"ok","id":true}'), "'id'"),
    ("id float", raw_frame(b'{"t":"ok","id":1.0}'), "'id'"),
    ("id negative", raw_frame(b'{"t":"ok","id":-1}'), "'id'"),
    ("id too big", raw_frame(b'{"t":"ok","id":%d}' % MAX_ID), "'id'"),
    ("duplicate key", raw_frame(b'{"t":"ok","id":1,"id":2}'), "duplicate"),
    ("NaN", raw_frame(b'{"t":"ok","id":1,"x":NaN}'), "constant"),
    (
        "deep nesting",
        raw_frame(b'{"t":"ok","id":1,"x":' + b"[" * 30000 + b"]" * 30000 + b"}"),
        "not valid JSON",
    ),
    ("huge int", raw_frame(b'{"t":"ok","id":' + b"9" * 5000 + b"}"), "not valid JSON"),
]


@pytest.mark.parametrize(
    ("data", "match"), [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES]
)
def test_bad_frames_raise_protocol_error(data: bytes, match: str) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    with pytest.raises(FrameError, match=match):
        dec.next_frame()
    assert dec.broken


def test_decoder_stays_broken() -> None:
    dec = FrameDecoder()
    dec.feed(raw_frame(b"[]"))
    with pytest.raises(FrameError):
        dec.next_frame()
    with pytest.raises(FrameError, match="earlier error"):
        dec.feed(encode_frame({"t": "ok", "id": 1}))
    with pytest.raises(FrameError, match="earlier error"):
        dec.next_frame()


def test_good_frame_before_bad_one_is_delivered() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame({"t": "ok", "id": 1}) + raw_frame(b"[]"))
    assert dec.next_frame() == Frame({"t": "ok", "id": 1})
    with pytest.raises(FrameError):
        dec.next_frame()


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        ({"t": "ok"}, b"", "'id'"),
        ({"t": "ok", "id": MAX_ID}, b"", "'id'"),
        ({"t": "ok", "id": 1, "x": object()}, b"", "JSON"),
        ({"t": "ok", "id": 1, "x": float("nan")}, b"", "JSON"),
        ({"t": "ok", "id": 1, "x": "a" * MAX_HEADER}, b"", "MAX_HEADER"),
        ({"t": "data", "id": 1}, bytes(MAX_FRAME), "MAX_FRAME"),
    ],
)
def test_encode_rejects(header: dict[str, Any], payload: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        encode_frame(header, payload)


# -- message validation ----------------------------------------------------------

VALID: dict[str, tuple[dict[str, Any], bytes]] = {
    "sync": ({"nonce": "abc", "clock_ns": None}, b""),
    "exec": (
        {
            "argv": ["sh", "-c", "true"],
            "env": {"A": "1"},
            "cwd": "/tmp",
            "timeout": 1.5,
            "max_output": 100,
            "stdin": False,
        },
        b"",
    ),
    "stdin": ({}, b"data"),
    "stdin_eof": ({}, b""),
    "kill": ({"signal": 9}, b""),
    "write_open": ({"path": "/a/b", "mode": 0o644}, b""),
    "write_chunk": ({}, b"data"),
    "write_close": ({}, b""),
    "read": ({"path": "/etc/hostname", "max_size": 10}, b""),
    "set_clock": ({"ns": 1_700_000_000_000_000_000}, b""),
    "bind": ({"pairs": [["/var/lib/gondolin/disk/ab", "/tmp/work"]]}, b""),
    "unpack": ({"path": "/var/tmp/tree.tar", "folder": "/tmp/work"}, b""),
    "entropy": ({}, b"\x00" * 32),
    "poweroff": ({}, b""),
    "ready": ({"version": proto.PROTOCOL_VERSION, "pid": 1}, b""),
    "sync_ok": ({"nonce": "abc"}, b""),
    "started": ({"pid": 42}, b""),
    "stdout": ({}, b"out"),
    "stderr": ({}, b"err"),
    "exit": ({"returncode": -9, "timed_out": True, "truncated": False}, b""),
    "ok": ({}, b""),
    "data": ({}, b"chunk"),
    "error": ({"message": "nope", "errno": 2}, b""),
}


def test_valid_examples_cover_every_message_type() -> None:
    assert set(VALID) == set(MESSAGES)


@pytest.mark.parametrize("t", sorted(VALID))
def test_valid_messages_pass(t: str) -> None:
    fields, payload = VALID[t]
    header = {"t": t, "id": 0 if t == "ready" else 5, **fields}
    sender = MESSAGES[t].sender
    other: Literal["host", "guest"] = "guest" if sender == "host" else "host"
    assert validate(header, sender=sender) is header
    frame = Frame(header, payload)
    assert validate_frame(frame, sender=sender) is frame
    with pytest.raises(FrameError, match="may only be sent"):
        validate(header, sender=other)


def _with(t: str, **changes: Any) -> dict[str, Any]:
    header = {"t": t, "id": 0 if t == "ready" else 5, **VALID[t][0]}
    for k, v in changes.items():
        if v is _MISSING:
            del header[k]
        else:
            header[k] = v
    return header


_MISSING = object()

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown type", {"t": "bogus", "id": 1}, "unknown message type"),
    ("sync without nonce", _with("sync", nonce=_MISSING), r"sync\.nonce: missing"),
    ("empty nonce", _with("sync", nonce=""), r"sync\.nonce"),
    ("argv empty", _with("exec", argv=[]), r"exec\.argv"),
    ("argv not list", _with("exec", argv="ls"), r"exec\.argv"),
    ("argv non-str", _with("exec", argv=["ls", 1]), r"exec\.argv"),
    ("argv NUL", _with("exec", argv=["l\0s"]), r"exec\.argv"),
    ("env not dict", _with("exec", env=["A=1"]), r"exec\.env"),
    ("env value int", _with("exec", env={"A": 1}), r"exec\.env"),
    ("env name with =", _with("exec", env={"A=B": "1"}), r"exec\.env"),
    ("cwd relative", _with("exec", cwd="tmp"), r"exec\.cwd"),
    ("timeout zero", _with("exec", timeout=0), r"exec\.timeout"),
    ("timeout inf", _with("exec", timeout=float("inf")), r"exec\.timeout"),
    ("timeout bool", _with("exec", timeout=True), r"exec\.timeout"),
    ("max_output negative", _with("exec", max_output=-1), r"exec\.max_output"),
    ("max_output float", _with("exec", max_output=1.0), r"exec\.max_output"),
    ("stdin int", _with("exec", stdin=1), r"exec\.stdin"),
    ("stdin missing", _with("exec", stdin=_MISSING), r"exec\.stdin: missing"),
    ("signal zero", _with("kill", signal=0), r"kill\.signal"),
    ("signal huge", _with("kill", signal=65), r"kill\.signal"),
    ("mode too big", _with("write_open", mode=0o10000), r"write_open\.mode"),
    ("path relative", _with("write_open", path="a/b"), r"write_open\.path"),
    ("path NUL", _with("read", path="/a\0"), r"read\.path"),
    ("max_size str", _with("read", max_size="10"), r"read\.max_size"),
    ("ns negative", _with("set_clock", ns=-1), r"set_clock\.ns"),
    ("bind none", _with("bind", pairs=[]), r"bind\.pairs"),
    ("unpack relative", _with("unpack", path="tree.tar"), r"unpack\.path"),
    ("unpack folder", _with("unpack", folder=5), r"unpack\.folder"),
    ("bind relative", _with("bind", pairs=[["/d", "tmp/work"]]), r"bind\.pairs"),
    ("bind triple", _with("bind", pairs=[["/d", "/tmp/w", "/x"]]), r"bind\.pairs"),
    ("bind NUL", _with("bind", pairs=[["/d", "/tmp/\0"]]), r"bind\.pairs"),
    (
        "bind too many",
        _with("bind", pairs=[["/d", f"/tmp/{i}"] for i in range(257)]),
        r"bind\.pairs",
    ),
    ("ready id", {**_with("ready"), "id": 3}, r"ready\.id"),
    ("ready pid zero", _with("ready", pid=0), r"ready\.pid"),
    ("version int", _with("ready", version=1), r"ready\.version"),
    ("started pid bool", _with("started", pid=True), r"started\.pid"),
    ("returncode str", _with("exit", returncode="0"), r"exit\.returncode"),
    ("returncode range", _with("exit", returncode=256), r"exit\.returncode"),
    ("timed_out null", _with("exit", timed_out=None), r"exit\.timed_out"),
    ("errno str", _with("error", errno="ENOENT"), r"error\.errno"),
    ("message missing", _with("error", message=_MISSING), r"error\.message: missing"),
]


@pytest.mark.parametrize(("header", "match"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_messages_name_the_field(header: dict[str, Any], match: str) -> None:
    with pytest.raises(FrameError, match=match):
        validate(header)


def test_null_is_allowed_where_documented() -> None:
    validate(_with("exec", env=None, cwd=None, timeout=None))
    validate(_with("error", errno=None))


def test_payload_only_where_allowed() -> None:
    with pytest.raises(FrameError, match="carries no payload"):
        validate_frame(Frame(_with("exit"), b"x"))
    with pytest.raises(FrameError, match="carries no payload"):
        validate_frame(Frame(_with("sync_ok"), b"x"))
    assert validate_frame(Frame(_with("sync"), b"entropy")).payload == b"entropy"


def test_extra_fields_are_tolerated() -> None:
    validate(_with("ok", future_field=[1, 2]))


# -- property tests ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.builds(
    lambda extra, t, i: {**extra, "t": t, "id": i},
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.text(min_size=1, max_size=12),
    st.integers(0, MAX_ID - 1),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return pieces


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.tuples(headers, st.binary(max_size=300)), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_round_trip_under_arbitrary_splitting(
    frames: list[tuple[dict[str, Any], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(h, p) for h, p in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for piece in _split(stream, cuts):
        dec.feed(piece)
        out.extend(dec)
    assert out == [Frame(h, p) for h, p in frames]
    assert dec.buffered == 0


def _decode_hostile(pieces: list[bytes]) -> None:
    """Feed pieces; frames must be well-formed, and only FrameError may be raised."""
    dec = FrameDecoder()
    try:
        for piece in pieces:
            dec.feed(piece)
            for frame in dec:
                assert isinstance(frame.header, dict)
                assert isinstance(frame.type, str) and frame.type
                assert isinstance(frame.id, int) and 0 <= frame.id < MAX_ID
                assert isinstance(frame.payload, bytes)
                with contextlib.suppress(FrameError):
                    validate_frame(frame)
    except FrameError:
        assert dec.broken


@settings(max_examples=300)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    _decode_hostile(_split(data, cuts))


@settings(max_examples=300)
@given(
    header=st.binary(max_size=200),
    payload=st.binary(max_size=50),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_random_headers_parse_or_raise_protocol_error(
    header: bytes, payload: bytes, cuts: list[int]
) -> None:
    # Correct framing around garbage headers reaches the UTF-8/JSON/envelope checks.
    _decode_hostile(_split(raw_frame(header, payload), cuts))


@settings(max_examples=200)
@given(
    value=json_values,
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    t=st.sampled_from(sorted(MESSAGES)),
)
def test_random_json_headers_validate_or_raise_protocol_error(
    value: Any, extra: dict[str, Any], t: str
) -> None:
    for field in [*MESSAGES[t].fields, "id", "t"]:
        header = {**_with(t), **extra, field: value}
        _decode_hostile([raw_frame(json.dumps(header).encode())])
        with contextlib.suppress(FrameError):
            validate(header)
