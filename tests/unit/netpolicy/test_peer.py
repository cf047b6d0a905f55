"""PeerLink over a real socketpair: framing both ways, and dropping stale frames on a reset."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pytest_gondolin.netpolicy.stack.link import FrameDecoder, LinkError, encode_frame
from pytest_gondolin.netpolicy.stack.peer import PeerLink


@pytest.fixture
def pair() -> Iterator[tuple[PeerLink, socket.socket]]:
    ours, qemu = socket.socketpair()
    qemu.settimeout(1.0)
    link = PeerLink(ours, read_chunk=4096)
    yield link, qemu
    link.close()
    qemu.close()


def drain(qemu: socket.socket, decoder: FrameDecoder | None = None) -> list[bytes]:
    """Every whole frame QEMU's end can read now (a partial one stays in ``decoder``)."""
    whole = decoder is None
    decoder = decoder or FrameDecoder()
    qemu.setblocking(False)
    try:
        while True:
            try:
                data = qemu.recv(1 << 20)
            except BlockingIOError:
                break
            decoder.feed(data)
    finally:
        qemu.settimeout(1.0)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert not whole or decoder.buffered_bytes == 0, "the stream to QEMU lost its framing"
    return frames


def test_frames_both_ways(pair: tuple[PeerLink, socket.socket]) -> None:
    link, qemu = pair
    assert link.recv_frames() is None  # nothing ready
    qemu.sendall(encode_frame(b"a" * 60) + encode_frame(b"b" * 70)[:10])
    assert link.recv_frames() == [b"a" * 60]
    qemu.sendall(encode_frame(b"b" * 70)[10:])
    assert link.recv_frames() == [b"b" * 70]
    link.queue([b"x" * 60, b"y" * 61])
    link.flush()
    assert drain(qemu) == [b"x" * 60, b"y" * 61]
    qemu.close()
    with pytest.raises(LinkError, match="closed"):
        link.recv_frames()


def test_discard_stale_drops_what_qemu_sent_before(pair: tuple[PeerLink, socket.socket]) -> None:
    link, qemu = pair
    half = encode_frame(b"h" * 100)
    qemu.sendall(encode_frame(b"old1" * 20) + encode_frame(b"old2" * 20) + half[:30])
    assert link.discard_stale() == 2
    qemu.sendall(half[30:] + encode_frame(b"new" * 20))
    # The frame QEMU was half-way through is dropped too; the next one is kept.
    assert link.recv_frames() == [b"new" * 20]
    # Negative control: without a reset in between, nothing is dropped.
    qemu.sendall(encode_frame(b"n2" * 30))
    assert link.recv_frames() == [b"n2" * 30]


def test_discard_stale_keeps_the_rest_of_a_half_written_frame() -> None:
    ours, qemu = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        link = PeerLink(ours)
        frames = [bytes([i]) * 3000 for i in range(1, 60)]  # far more than the socket takes
        link.queue(frames)
        link.flush()
        assert link.pending_tx > 0  # the kernel took some, not all
        dropped = link.discard_stale()
        assert dropped > 0
        got: list[bytes] = []
        decoder = FrameDecoder()  # QEMU's side of the stream
        for _ in range(100):
            got += drain(qemu, decoder)
            link.flush()
            if not link.pending_tx:
                break
        got += drain(qemu, decoder)
        assert link.pending_tx == 0 and decoder.buffered_bytes == 0  # still framed
        # What QEMU read is a prefix of what was queued, whole frames only.
        assert got == frames[: len(got)] and len(got) + dropped == len(frames)
        link.queue([b"after" * 20])  # new frames go through as usual
        link.flush()
        assert drain(qemu) == [b"after" * 20]
    finally:
        ours.close()
        qemu.close()


def test_discard_stale_with_nothing_queued_drops_nothing(
    pair: tuple[PeerLink, socket.socket],
) -> None:
    link, qemu = pair
    link.queue([b"z" * 64])
    link.flush()
    assert link.discard_stale() == 0
    assert drain(qemu) == [b"z" * 64]  # already written whole: not recalled
