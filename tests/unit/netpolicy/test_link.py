"""QEMU -netdev stream framing: 4-byte big-endian length prefixes."""

from __future__ import annotations

import pytest

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.stack.link import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    LinkError,
    encode_frame,
)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_encode() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_encode_refuses_oversize() -> None:
    with pytest.raises(LinkError):
        encode_frame(b"\0" * 11, max_frame_size=10)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1000])
def test_decode_any_chunking(chunk: int) -> None:
    frames = [b"a", b"bc" * 30, b"\xff" * 1514, b"d"]
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(0, len(stream), chunk):
        decoder.feed(stream[i : i + chunk])
        got += _drain(decoder)
    assert got == frames
    assert decoder.buffered_bytes == 0
    assert decoder.broken is None


def test_partial_frame_waits() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x05ab")
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 6
    decoder.feed(b"cde")
    assert decoder.next_frame() == b"abcde"


def test_zero_length_records_are_skipped() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00" + encode_frame(b"x") + b"\x00\x00\x00\x00")
    assert _drain(decoder) == [b"x"]
    assert decoder.broken is None


def test_max_size_frame_is_accepted() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"\0" * DEFAULT_MAX_FRAME_SIZE))
    assert decoder.next_frame() == b"\0" * DEFAULT_MAX_FRAME_SIZE


@pytest.mark.parametrize("length", [DEFAULT_MAX_FRAME_SIZE + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_absurd_length_breaks_the_link(length: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"good") + length.to_bytes(4, "big") + b"junk")
    # Frames before the bad header are still delivered...
    assert decoder.next_frame() == b"good"
    # ...then the link is declared broken, permanently.
    with pytest.raises(LinkError) as exc:
        decoder.next_frame()
    assert isinstance(exc.value, NetworkPolicyError)
    assert str(length) in exc.value.reason
    assert decoder.broken == exc.value.reason
    assert decoder.buffered_bytes == 0
    with pytest.raises(LinkError):
        decoder.next_frame()
    with pytest.raises(LinkError):
        decoder.feed(encode_frame(b"more"))


def test_custom_max_frame_size() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(encode_frame(b"\0" * 100) + encode_frame(b"\0" * 101))
    assert decoder.next_frame() == b"\0" * 100
    with pytest.raises(LinkError):
        decoder.next_frame()


def test_bad_max_frame_size() -> None:
    with pytest.raises(ConfigError):
        FrameDecoder(max_frame_size=0)
