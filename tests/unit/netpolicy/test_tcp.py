"""The host-side TCP state machine, driven segment by segment."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.packets import PacketError
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    reset_for,
    seq_add,
    seq_diff,
    seq_le,
    seq_lt,
)
from pytest_gondolin.netpolicy.stack.tcp import CloseReason, TcpConnection, TcpState
from pytest_gondolin.netpolicy.stack.tcp_config import BufferBudget, TcpConfig

GUEST_PORT = 40000
HOST_PORT = 443
MSS = 1000


def seg(
    seq: int,
    ack: int = 0,
    flags: int = TCP_ACK,
    window: int = 65535,
    payload: bytes = b"",
    options: TcpOptions | None = None,
) -> TcpSegment:
    """A segment from the guest."""
    return TcpSegment(
        GUEST_PORT,
        HOST_PORT,
        seq & 0xFFFFFFFF,
        ack & 0xFFFFFFFF,
        flags,
        window,
        payload,
        options or TcpOptions(),
    )


@dataclass
class Flow:
    """A connection plus the guest's view of the sequence numbers."""

    conn: TcpConnection
    snd: int  # guest's next sequence number
    rcv: int  # what the guest has received from us (its RCV.NXT)
    now: float = 0.0
    sent: list[TcpSegment] = field(default_factory=list)

    def guest(
        self,
        payload: bytes = b"",
        flags: int = TCP_ACK,
        *,
        window: int = 65535,
        seq: int | None = None,
        ack: int | None = None,
    ) -> list[TcpSegment]:
        s = seg(
            self.snd if seq is None else seq,
            self.rcv if ack is None else ack,
            flags,
            window,
            payload,
        )
        if seq is None:
            self.snd = seq_add(self.snd, len(payload) + bool(flags & TCP_FIN))
        out = self.conn.receive_segment(s, self.now)
        self.sent += out
        return out

    def absorb(self, out: list[TcpSegment]) -> bytes:
        """The guest receives ``out`` in order; returns the in-order data."""
        data = b""
        for s in out:
            if s.seq == self.rcv and (s.payload or s.fin):
                data += s.payload
                self.rcv = seq_add(self.rcv, len(s.payload) + s.fin)
        return data


def state(flow: Flow) -> TcpState:
    """The connection's state (a call, so type checkers do not pin it)."""
    return flow.conn.state


def open_flow(
    *,
    iss: int = 1000,
    irs: int = 5000,
    window: int = 65535,
    wscale: int | None = None,
    mss: int | None = MSS,
    config: TcpConfig | None = None,
    budget: BufferBudget | None = None,
) -> Flow:
    syn = seg(irs, 0, TCP_SYN, window, options=TcpOptions(mss=mss, window_scale=wscale))
    conn = TcpConnection(syn, iss=iss, now=0.0, config=config, budget=budget)
    (synack,) = conn.flush(0.0)
    assert synack.flags == TCP_SYN | TCP_ACK
    flow = Flow(conn, snd=seq_add(irs, 1), rcv=seq_add(synack.seq, 1))
    out = flow.guest(window=window)
    assert conn.state is TcpState.ESTABLISHED
    # At most a window update (the SYN-ACK could only say 65535).
    assert all(s.flags == TCP_ACK and not s.payload for s in out)
    return flow


# -- sequence arithmetic --------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "lt"),
    [
        (1, 2, True),
        (2, 1, False),
        (5, 5, False),
        (0xFFFFFFFF, 0, True),  # wraps
        (0, 0xFFFFFFFF, False),
        (0xFFFFFF00, 0x100, True),
        (0x7FFFFFFF, 0, False),
        (0x80000001, 0, True),  # more than half the space ahead = behind
    ],
)
def test_seq_lt(a: int, b: int, lt: bool) -> None:
    assert seq_lt(a, b) is lt
    assert seq_le(a, b) is (lt or a == b)


def test_seq_add_and_diff_wrap() -> None:
    assert seq_add(0xFFFFFFFF, 1) == 0
    assert seq_add(0, -1) == 0xFFFFFFFF
    assert seq_diff(5, 0xFFFFFFFE) == 7


# -- handshake ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wscale", "expect_ws"),
    [(None, None), (7, TcpConfig().window_shift), (0, TcpConfig().window_shift)],
)
def test_syn_ack(wscale: int | None, expect_ws: int | None) -> None:
    syn = seg(
        5000,
        0,
        TCP_SYN,
        29200,
        options=TcpOptions(mss=1460, window_scale=wscale, sack_permitted=True),
    )
    conn = TcpConnection(syn, iss=1000, now=0.0)
    assert conn.state is TcpState.SYN_RECEIVED
    (synack,) = conn.flush(0.0)
    assert (synack.src_port, synack.dst_port) == (HOST_PORT, GUEST_PORT)
    assert (synack.seq, synack.ack, synack.flags) == (1000, 5001, TCP_SYN | TCP_ACK)
    assert synack.options.mss == TcpConfig().mss
    assert synack.options.window_scale == expect_ws
    assert not synack.options.sack_permitted and synack.options.timestamps is None
    assert synack.window == 65535  # unscaled in a SYN, capped
    assert conn.next_timer == 1.0
    assert conn.mss == 1460


def test_full_handshake() -> None:
    flow = open_flow()
    assert flow.conn.next_timer is None  # nothing outstanding
    assert flow.conn.snd_una == flow.conn.snd_nxt == 1001
    assert flow.conn.rcv_nxt == 5001


def test_first_ack_announces_scaled_window() -> None:
    flow = open_flow(wscale=7)
    (update,) = flow.sent
    shift = TcpConfig().window_shift
    assert update.window << shift == TcpConfig().recv_buffer


def test_syn_ack_retransmitted_then_given_up() -> None:
    cfg = TcpConfig(max_retries=3)
    conn = TcpConnection(seg(5000, 0, TCP_SYN), iss=1000, now=0.0, config=cfg)
    conn.flush(0.0)
    assert conn.on_timer(0.99) == []
    times = []
    while not conn.closed:
        deadline = conn.next_timer
        assert deadline is not None
        times.append(deadline)
        out = conn.on_timer(deadline)
        assert out
        if not conn.closed:
            assert [s.flags for s in out] == [TCP_SYN | TCP_ACK]
    assert times == [1.0, 3.0, 7.0, 15.0]  # 1 s, then doubling
    assert out[-1].flags & TCP_RST
    assert conn.close_reason is CloseReason.TIMEOUT


def test_duplicate_syn_in_syn_received_resends_syn_ack() -> None:
    conn = TcpConnection(seg(5000, 0, TCP_SYN), iss=1000, now=0.0)
    conn.flush(0.0)
    (again,) = conn.receive_segment(seg(5000, 0, TCP_SYN), 0.5)
    assert (again.flags, again.seq, again.ack) == (TCP_SYN | TCP_ACK, 1000, 5001)
    assert conn.state is TcpState.SYN_RECEIVED


def test_duplicate_syn_when_established_gets_challenge_ack() -> None:
    flow = open_flow()
    (ack,) = flow.guest(flags=TCP_SYN, seq=5000)
    assert (ack.flags, ack.seq, ack.ack) == (TCP_ACK, 1001, 5001)
    assert state(flow) is TcpState.ESTABLISHED
    # A SYN inside the window (a different connection attempt): RFC 5961.
    (ack,) = flow.guest(flags=TCP_SYN, seq=5100)
    assert ack.flags == TCP_ACK and ack.ack == 5001
    assert state(flow) is TcpState.ESTABLISHED


def test_bad_ack_in_syn_received_gets_rst() -> None:
    conn = TcpConnection(seg(5000, 0, TCP_SYN), iss=1000, now=0.0)
    conn.flush(0.0)
    (rst,) = conn.receive_segment(seg(5001, 4242), 0.1)
    assert (rst.flags, rst.seq) == (TCP_RST, 4242)
    assert conn.state is TcpState.SYN_RECEIVED


def test_syn_with_data_ignores_the_data() -> None:
    conn = TcpConnection(seg(5000, 0, TCP_SYN, payload=b"early"), iss=1, now=0.0)
    (synack,) = conn.flush(0.0)
    assert synack.ack == 5001
    assert conn.readable == 0


@pytest.mark.parametrize(
    "flags", [TCP_ACK, TCP_SYN | TCP_ACK, TCP_SYN | TCP_RST, TCP_SYN | TCP_FIN]
)
def test_connection_needs_a_plain_syn(flags: int) -> None:
    with pytest.raises(PacketError):
        TcpConnection(seg(1, 0, flags), iss=1, now=0.0)


@pytest.mark.parametrize(
    ("mss", "expected"), [(None, 536), (1, 536), (1460, 1460), (65495, TcpConfig().mss)]
)
def test_peer_mss_clamped(mss: int | None, expected: int) -> None:
    conn = TcpConnection(seg(1, 0, TCP_SYN, options=TcpOptions(mss=mss)), iss=1, now=0.0)
    assert conn.mss == expected


def test_send_buffer_queued_during_handshake() -> None:
    conn = TcpConnection(seg(5000, 0, TCP_SYN, options=TcpOptions(mss=MSS)), iss=1000, now=0.0)
    conn.flush(0.0)
    assert conn.send(b"hello") == 5
    conn.close()
    assert conn.flush(0.0) == []  # nothing before the handshake completes
    out = conn.receive_segment(seg(5001, 1001), 0.1)
    assert [(s.payload, s.flags & (TCP_FIN | TCP_PSH)) for s in out] == [
        (b"hello", TCP_PSH),
        (b"", TCP_FIN),
    ]
    assert conn.state is TcpState.FIN_WAIT_1


# -- data ------------------------------------------------------------------------


def test_guest_to_host_data() -> None:
    flow = open_flow()
    (ack,) = flow.guest(b"GET / HTTP/1.1\r\n")
    assert ack.ack == 5001 + 16
    assert flow.conn.readable == 16
    assert flow.conn.read(4) == b"GET "
    assert flow.conn.read() == b"/ HTTP/1.1\r\n"
    assert flow.conn.read() == b""


def test_host_to_guest_data_is_segmented_by_mss() -> None:
    flow = open_flow()
    data = bytes(range(256)) * 10
    assert flow.conn.send(data) == len(data)
    out = flow.conn.flush(0.0)
    assert [len(s.payload) for s in out] == [1000, 1000, 560]
    assert [s.seq for s in out] == [1001, 2001, 3001]
    assert [bool(s.flags & TCP_PSH) for s in out] == [False, False, True]
    assert all(s.ack == 5001 for s in out)
    assert flow.absorb(out) == data
    assert flow.conn.unacked_bytes == len(data)
    assert flow.conn.next_timer == 1.0
    assert flow.guest() == []
    assert flow.conn.unacked_bytes == 0
    assert flow.conn.next_timer is None


def test_partial_ack() -> None:
    flow = open_flow()
    flow.conn.send(b"x" * 2500)
    out = flow.conn.flush(0.0)
    flow.absorb(out)
    flow.guest(ack=2001)
    assert flow.conn.unacked_bytes == 1500
    assert flow.conn.snd_una == 2001


def test_never_exceeds_guest_window() -> None:
    flow = open_flow(window=2500)
    flow.conn.send(b"x" * 10000)
    out = flow.conn.flush(0.0)
    assert sum(len(s.payload) for s in out) == 2500
    flow.absorb(out)
    # The guest ACKs 1000 bytes and keeps the window at 2500: 1000 more may go.
    flow.now = 0.1
    out = flow.guest(ack=2001, window=2500)
    assert sum(len(s.payload) for s in out) == 1000
    assert out[0].seq == 3501


def test_window_scale_applies_to_guest_window() -> None:
    flow = open_flow(window=10, wscale=8)  # 10 << 8 = 2560 bytes
    flow.conn.send(b"x" * 10000)
    flow.absorb(flow.conn.flush(0.0))
    flow.now = 0.1
    out = flow.guest(ack=flow.conn.snd_nxt, window=10)
    assert sum(len(s.payload) for s in out) == 2560


def test_guest_zero_window_stalls_then_update_resumes() -> None:
    flow = open_flow(config=TcpConfig(max_retries=3))
    flow.conn.send(b"a" * 3000)
    flow.absorb(flow.conn.flush(0.0))
    # Everything acknowledged, but the guest's buffer is full.
    flow.now = 0.1
    assert flow.guest(window=0) == []
    assert flow.conn.send(b"b" * 1500) == 1500
    assert flow.conn.flush(0.1) == []
    assert flow.conn.next_timer == pytest.approx(1.1)  # persist timer
    # Probes keep going as long as the guest answers, past max_retries.
    for _ in range(6):
        deadline = flow.conn.next_timer
        assert deadline is not None
        flow.now = deadline
        (probe,) = flow.conn.on_timer(deadline)
        assert probe.seq == seq_add(flow.conn.snd_una, -1) and not probe.payload
        assert flow.guest(window=0) == []  # the guest's answer: still zero
    assert not flow.conn.closed
    # The window opens: the queued data flows at once.
    out = flow.guest(window=65535)
    assert flow.absorb(out) == b"b" * 1500


def test_window_probes_unanswered_give_up() -> None:
    flow = open_flow(config=TcpConfig(max_retries=2))
    flow.guest(window=0)
    flow.conn.send(b"x")
    flow.conn.flush(0.0)
    out: list[TcpSegment] = []
    while not flow.conn.closed:
        deadline = flow.conn.next_timer
        assert deadline is not None
        out = flow.conn.on_timer(deadline)
    assert out[-1].flags & TCP_RST
    assert flow.conn.close_reason is CloseReason.TIMEOUT


def test_guest_shrinking_window_to_zero_is_probed_not_timed_out() -> None:
    flow = open_flow(config=TcpConfig(max_retries=2))
    flow.conn.send(b"x" * 500)
    flow.conn.flush(0.0)  # the guest drops it and shrinks its window
    assert flow.guest(window=0) == []
    for i in range(5):
        deadline = flow.conn.next_timer
        assert deadline is not None
        (probe,) = flow.conn.on_timer(deadline)
        assert not probe.payload, i
        flow.guest(window=0)
    assert not flow.conn.closed
    out = flow.guest(window=1000)
    assert flow.absorb(out) == b"x" * 500


def test_our_buffer_full_advertises_zero_window() -> None:
    flow = open_flow(config=TcpConfig(recv_buffer=4096))
    (ack,) = flow.guest(b"z" * 4096)
    assert ack.window == 0
    assert flow.conn.readable == 4096
    # More data does not fit: dropped, re-ACKed with the zero window.
    (ack,) = flow.guest(b"!", seq=flow.snd)
    assert (ack.ack, ack.window) == (flow.snd, 0)
    assert flow.conn.readable == 4096
    # The application reads a little: below the SWS threshold, no update.
    flow.conn.read(10)
    assert flow.conn.flush(0.0) == []
    # Reading enough sends a window update by itself.
    flow.conn.read(2000)
    (update,) = flow.conn.flush(0.0)
    assert (update.flags, update.window) == (TCP_ACK, 2010)
    # And the guest's retransmission is now accepted.
    flow.guest(b"!")
    assert flow.conn.readable == 4096 - 2010 + 1


def test_zero_window_still_processes_acks() -> None:
    flow = open_flow(config=TcpConfig(recv_buffer=1000))
    flow.guest(b"q" * 1000)  # our window is now zero
    flow.conn.send(b"r" * 100)
    flow.absorb(flow.conn.flush(0.0))
    # The guest piggybacks its ACK of our data on more data we cannot take.
    (ack,) = flow.guest(b"more", seq=flow.snd)
    assert flow.conn.unacked_bytes == 0
    assert ack.window == 0


def test_window_is_limited_by_shared_budget() -> None:
    budget = BufferBudget(1500)
    flow = open_flow(budget=budget)
    (ack,) = flow.guest(b"x" * 1000)
    assert ack.window == 500
    assert budget.used == 1000
    (ack,) = flow.guest(b"y" * 1000)  # only 500 fit
    assert flow.conn.readable == 1500
    assert ack.ack == 5001 + 1500
    assert budget.starved
    assert flow.conn.send(b"z") == 0
    flow.conn.read()
    assert budget.used == 0


def test_send_is_bounded_and_reports_writable_again() -> None:
    flow = open_flow(config=TcpConfig(send_buffer=3000))
    assert flow.conn.send(b"x" * 5000) == 3000
    assert flow.conn.writable_bytes == 0
    assert not flow.conn.poll_writable()
    flow.absorb(flow.conn.flush(0.0))
    flow.guest(ack=2001)
    assert flow.conn.writable_bytes == 1000
    assert flow.conn.poll_writable()
    assert not flow.conn.poll_writable()  # reported once


def test_out_of_order_segment_dropped_with_duplicate_ack() -> None:
    flow = open_flow()
    (dup,) = flow.guest(b"later", seq=5001 + 100)
    assert dup.ack == 5001
    assert flow.conn.readable == 0
    flow.guest(b"first")
    assert flow.conn.read() == b"first"


def test_retransmitted_overlap_is_trimmed() -> None:
    flow = open_flow()
    flow.guest(b"hello")
    # The guest resends "hello" plus new bytes.
    (ack,) = flow.guest(b"hello world", seq=5001)
    assert ack.ack == 5001 + 11
    assert flow.conn.read() == b"hello world"


def test_old_duplicate_is_acked_not_delivered() -> None:
    flow = open_flow()
    flow.guest(b"hello")
    (ack,) = flow.guest(b"hello", seq=5001)
    assert ack.ack == 5006
    assert flow.conn.read() == b"hello"


def test_ack_of_unsent_data_is_dropped() -> None:
    flow = open_flow()
    (ack,) = flow.guest(b"data", ack=999_999)
    assert ack.ack == 5001  # the data was not accepted either
    assert flow.conn.readable == 0
    assert state(flow) is TcpState.ESTABLISHED


# -- retransmission ---------------------------------------------------------------


def test_retransmission_backoff_and_give_up() -> None:
    flow = open_flow(config=TcpConfig(max_retries=4))
    flow.conn.send(b"x" * 2500)
    first = flow.conn.flush(0.0)
    assert flow.conn.on_timer(0.5) == []
    deadlines = []
    while not flow.conn.closed:
        deadline = flow.conn.next_timer
        assert deadline is not None
        deadlines.append(deadline)
        out = flow.conn.on_timer(deadline)
        if not flow.conn.closed:
            # Only the oldest segment is resent, unchanged.
            assert [(s.seq, s.payload) for s in out] == [(first[0].seq, first[0].payload)]
    assert deadlines == [1.0, 3.0, 7.0, 15.0, 31.0]
    (rst,) = out
    assert rst.flags & TCP_RST and rst.seq == flow.conn.snd_nxt
    assert flow.conn.close_reason is CloseReason.TIMEOUT
    assert flow.conn.next_timer is None
    assert flow.conn.on_timer(100.0) == []


def test_rto_capped_at_rto_max() -> None:
    flow = open_flow(config=TcpConfig(max_retries=20, rto_max=5.0))
    flow.conn.send(b"x")
    flow.conn.flush(0.0)
    gaps = []
    now = 0.0
    for _ in range(6):
        deadline = flow.conn.next_timer
        assert deadline is not None
        gaps.append(deadline - now)
        now = deadline
        flow.conn.on_timer(now)
    assert gaps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_retransmission_recovers_after_ack() -> None:
    flow = open_flow()
    flow.conn.send(b"a" * 2500)
    flow.conn.flush(0.0)  # all three segments "lost"
    (re,) = flow.conn.on_timer(1.0)
    assert re.seq == 1001
    flow.absorb([re])
    flow.now = 1.1
    # The ACK for the first segment releases the rest (go-back-N).
    out = flow.guest()
    assert [s.seq for s in out] == [2001, 3001]
    assert flow.absorb(out) == b"a" * 1500
    flow.guest()
    assert flow.conn.unacked_bytes == 0
    assert flow.conn.next_timer is None


def test_progress_resets_the_retry_count() -> None:
    flow = open_flow(config=TcpConfig(max_retries=2))
    for round_ in range(5):
        flow.conn.send(b"x" * 10)
        flow.conn.flush(flow.now)
        deadline = flow.conn.next_timer
        assert deadline is not None
        flow.now = deadline
        flow.absorb(flow.conn.on_timer(deadline))
        flow.guest()
        assert not flow.conn.closed, round_


# -- closing ------------------------------------------------------------------------


def test_guest_closes_first() -> None:
    flow = open_flow()
    (ack,) = flow.guest(b"bye", TCP_ACK | TCP_FIN)
    assert ack.ack == 5001 + 3 + 1
    assert state(flow) is TcpState.CLOSE_WAIT
    assert flow.conn.eof and flow.conn.read() == b"bye"
    # We may still send after the guest's FIN.
    flow.conn.send(b"reply")
    flow.conn.close()
    out = flow.conn.flush(0.0)
    assert [s.flags & TCP_FIN for s in out] == [0, TCP_FIN]
    assert state(flow) is TcpState.LAST_ACK
    flow.absorb(out)
    assert flow.guest() == []
    assert state(flow) is TcpState.CLOSED
    assert flow.conn.close_reason is CloseReason.NORMAL


def test_host_closes_first() -> None:
    flow = open_flow()
    flow.conn.close()
    (fin,) = flow.conn.flush(0.0)
    assert fin.flags == TCP_FIN | TCP_ACK
    assert state(flow) is TcpState.FIN_WAIT_1
    flow.absorb([fin])
    assert flow.guest() == []
    assert state(flow) is TcpState.FIN_WAIT_2
    # Half-close: the guest keeps sending.
    flow.guest(b"still talking")
    assert flow.conn.read() == b"still talking"
    (ack,) = flow.guest(flags=TCP_ACK | TCP_FIN)
    assert ack.ack == flow.snd
    assert state(flow) is TcpState.CLOSED  # no TIME-WAIT
    assert flow.conn.close_reason is CloseReason.NORMAL


def test_simultaneous_close() -> None:
    flow = open_flow()
    flow.conn.close()
    (fin,) = flow.conn.flush(0.0)
    # The guest's FIN crosses ours (it has not seen our FIN yet).
    (ack,) = flow.guest(flags=TCP_ACK | TCP_FIN)
    assert ack.ack == 5002
    assert state(flow) is TcpState.CLOSING
    flow.absorb([fin])
    flow.guest()
    assert state(flow) is TcpState.CLOSED


def test_fin_waits_for_data_and_is_retransmitted() -> None:
    flow = open_flow(window=1500)
    flow.conn.send(b"d" * 2000)
    flow.conn.close()
    out = flow.conn.flush(0.0)
    assert not any(s.fin for s in out)  # the window holds only 1500 bytes
    flow.absorb(out)
    flow.now = 0.1
    out = flow.guest(window=1500)
    assert out[-1].fin and out[-1].seq == 1001 + 2000
    # The FIN is lost: resent on the timer.
    deadline = flow.conn.next_timer
    assert deadline is not None
    flow.absorb(out[:-1])
    flow.guest(window=1500)
    (again,) = flow.conn.on_timer(flow.conn.next_timer or 0.0)
    assert again.fin and again.seq == 3001
    flow.absorb([again])
    flow.guest()
    assert state(flow) is TcpState.FIN_WAIT_2


def test_send_after_close_is_refused() -> None:
    flow = open_flow()
    flow.conn.close()
    assert flow.conn.send(b"late") == 0
    assert flow.conn.writable_bytes == 0


def test_close_is_idempotent() -> None:
    flow = open_flow()
    flow.conn.close()
    flow.conn.close()
    assert len(flow.conn.flush(0.0)) == 1


# -- resets -----------------------------------------------------------------------


def test_rst_from_guest_exact_sequence() -> None:
    flow = open_flow()
    flow.guest(b"unread")
    flow.conn.send(b"unsent")
    assert flow.guest(flags=TCP_RST) == []
    assert flow.conn.closed
    assert flow.conn.close_reason is CloseReason.GUEST_RESET
    assert flow.conn.readable == 0 and flow.conn.unacked_bytes == 0
    assert flow.conn.flush(0.0) == []


def test_rst_in_window_but_not_exact_gets_challenge_ack() -> None:
    flow = open_flow()
    (ack,) = flow.guest(flags=TCP_RST, seq=5001 + 10)
    assert ack.flags == TCP_ACK and ack.ack == 5001
    assert state(flow) is TcpState.ESTABLISHED


def test_rst_outside_window_is_ignored() -> None:
    flow = open_flow()
    assert flow.guest(flags=TCP_RST, seq=5001 - 10) == []
    assert state(flow) is TcpState.ESTABLISHED


def test_rst_in_syn_received() -> None:
    conn = TcpConnection(seg(5000, 0, TCP_SYN), iss=1000, now=0.0)
    conn.flush(0.0)
    assert conn.receive_segment(seg(5001, 0, TCP_RST), 0.1) == []
    assert conn.close_reason is CloseReason.GUEST_RESET


def test_abort_sends_rst() -> None:
    budget = BufferBudget(10_000)
    flow = open_flow(budget=budget)
    flow.guest(b"abc")
    flow.conn.send(b"def")
    flow.conn.abort()
    (rst,) = flow.conn.flush(0.0)
    assert rst.flags == TCP_RST | TCP_ACK
    assert (rst.seq, rst.ack) == (1001, 5004)
    assert flow.conn.close_reason is CloseReason.ABORTED
    assert budget.used == 0
    flow.conn.abort()  # idempotent
    assert flow.conn.flush(0.0) == []
    assert flow.conn.receive_segment(seg(5004, 1001), 0.0) == []


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        (seg(100, 0, TCP_SYN), (0, 101, TCP_RST | TCP_ACK)),
        (seg(100, 0, TCP_SYN, payload=b"abc"), (0, 104, TCP_RST | TCP_ACK)),
        (seg(100, 777, TCP_ACK), (777, 0, TCP_RST)),
        (seg(100, 777, TCP_ACK | TCP_FIN, payload=b"x"), (777, 0, TCP_RST)),
        (seg(0xFFFFFFFF, 0, TCP_FIN, payload=b"x"), (0, 1, TCP_RST | TCP_ACK)),  # wraps
    ],
)
def test_reset_for_closed_port(incoming: TcpSegment, expected: tuple[int, int, int]) -> None:
    rst = reset_for(incoming)
    assert rst is not None
    assert (rst.seq, rst.ack, rst.flags) == expected
    assert (rst.src_port, rst.dst_port) == (HOST_PORT, GUEST_PORT)


def test_never_reset_a_reset() -> None:
    assert reset_for(seg(1, 2, TCP_RST | TCP_ACK)) is None


# -- wraparound ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iss", "irs"),
    [(2**32 - 1500, 2**32 - 700), (2**32 - 1, 2**32 - 1), (0x7FFFFFFF, 0x7FFFFF00)],
)
def test_sequence_wraparound_both_directions(iss: int, irs: int) -> None:
    flow = open_flow(iss=iss, irs=irs)
    sent_by_guest = b""
    received = b""
    for i in range(6):
        chunk = bytes([65 + i]) * 400
        flow.guest(chunk)
        sent_by_guest += chunk
        flow.conn.send(chunk)
        received += flow.absorb(flow.conn.flush(flow.now))
        flow.guest()
    assert flow.conn.read() == sent_by_guest
    assert received == sent_by_guest
    assert flow.conn.unacked_bytes == 0
    assert flow.conn.rcv_nxt == (irs + 1 + 2400) % 2**32
    assert flow.conn.snd_una == (iss + 1 + 2400) % 2**32
    # And closing across the boundary still works.
    flow.guest(flags=TCP_ACK | TCP_FIN)
    flow.conn.close()
    flow.absorb(flow.conn.flush(0.0))
    flow.guest()
    assert flow.conn.close_reason is CloseReason.NORMAL


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mss": 10},
        {"mss": 70000},
        {"send_buffer": 0},
        {"recv_buffer": 1},
        {"recv_buffer": 2**31},
        {"rto_initial": 0},
        {"rto_initial": 2.0, "rto_max": 1.0},
        {"max_retries": 0},
        {"min_peer_mss": 0},
    ],
)
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TcpConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("buf", "shift"), [(65535, 0), (65536, 1), (256 * 1024, 3), (2**20, 5)])
def test_window_shift(buf: int, shift: int) -> None:
    assert TcpConfig(recv_buffer=buf).window_shift == shift


def test_ack_older_than_any_window_is_dropped() -> None:
    flow = open_flow(window=1000)
    flow.conn.send(b"x" * 1000)
    flow.absorb(flow.conn.flush(0.0))
    flow.guest()
    # An ACK far behind SND.UNA (RFC 5961 §5.2) carrying data: both ignored.
    (ack,) = flow.guest(b"data", ack=2001 - 70_000)  # max window seen: 65535
    assert ack.ack == 5001
    assert flow.conn.readable == 0


def test_data_after_guest_fin_is_ignored() -> None:
    flow = open_flow()
    flow.guest(flags=TCP_ACK | TCP_FIN)
    assert state(flow) is TcpState.CLOSE_WAIT
    (ack,) = flow.guest(b"impossible", seq=5002)
    assert ack.ack == 5002
    assert flow.conn.readable == 0


def test_ack_beyond_rewound_snd_nxt() -> None:
    flow = open_flow()
    flow.conn.send(b"a" * 3000)
    out = flow.conn.flush(0.0)
    flow.conn.on_timer(1.0)  # rewinds SND.NXT to SND.UNA
    # The guest had everything all along.
    flow.absorb(out)
    assert flow.guest() == []
    assert flow.conn.unacked_bytes == 0
    assert flow.conn.snd_nxt == flow.conn.snd_una == 4001
    assert flow.conn.next_timer is None
