"""A scripted guest that floods the host's HTTP path, in-process, for memory tests.

It drives the production path a real guest's bytes take on the host --
:class:`~pytest_gondolin.netpolicy.stack.network.NetworkStack` (TCP, with
its windows and buffers) -> :class:`~pytest_gondolin.netpolicy.relay.FlowRelay`
-> :class:`~pytest_gondolin.netpolicy.http.mitm.FlowProxy` and the
interceptor -> :func:`~pytest_gondolin.netpolicy.http.mediation.plan_request`
(a stub) -> :class:`~pytest_gondolin.netpolicy.http.recorder.Recorder` --
on one thread, as the driver's loop does, without QEMU or sockets.

Run as a script it floods and prints what the process paid, as JSON::

    python -m tests.unit.netpolicy_app.flood_guest --requests 200 --body 1048576

``--hold MIB`` makes the script keep that much memory itself during the
flood: the negative control that shows the measurement sees held memory.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.mediation import MediationContext
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.limits import DriverLimits
from pytest_gondolin.netpolicy.relay import FlowRelay
from pytest_gondolin.netpolicy.stack.network import GATEWAY_MAC, GUEST_IP, NetworkStack
from pytest_gondolin.netpolicy.stack.packets import (
    ETHERTYPE_IPV4,
    IPPROTO_TCP,
    EthernetFrame,
    IPv4Packet,
    parse_ethernet,
    parse_ipv4,
)
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
)

GUEST_MAC = bytes.fromhex("525400123456")
DST = IPv4Address("198.18.0.7")  # any address reaches the relay; the Host header decides
URL_HOST = "flood.test"
#: Rounds of guest/host exchange one request may take before the flood gives up.
_MAX_ROUNDS = 10_000


class FloodGuest:
    """The guest end of a host network stack: opens flows and POSTs bodies over them."""

    def __init__(self, stack: NetworkStack, relay: FlowRelay) -> None:
        self.stack = stack
        self.relay = relay
        self.now = 0.0
        self.sport = 30000

    def _send(self, seg: TcpSegment) -> None:
        packet = IPv4Packet(GUEST_IP, DST, IPPROTO_TCP, seg.build(GUEST_IP, DST)).build()
        frame = EthernetFrame(GATEWAY_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet).build()
        self.stack.receive_frame(frame, self.now)
        self.relay.process_events()

    def _take(self) -> list[TcpSegment]:
        out = []
        for frame in self.stack.outgoing_frames():
            ip = parse_ipv4(parse_ethernet(frame).payload)
            if ip.protocol == IPPROTO_TCP:
                out.append(parse_tcp(ip.payload, ip.src, ip.dst))
        return out

    def connection(self) -> GuestConnection:
        self.sport += 1
        return GuestConnection(self, self.sport)


class GuestConnection:
    """One guest TCP connection: in-order, lossless, honouring the host's window."""

    def __init__(self, guest: FloodGuest, sport: int) -> None:
        self.guest = guest
        self.sport = sport
        self.snd_una = self.snd_nxt = 1000
        self.rcv = 0
        self.window = 0
        self.shift = 0
        self.received = bytearray()
        self.reset = False
        guest._send(self._seg(TCP_SYN, options=TcpOptions(mss=65480, window_scale=7)))
        self.snd_una = self.snd_nxt = self.snd_nxt + 1
        for seg in guest._take():
            if seg.syn and seg.has_ack:
                self.rcv = (seg.seq + 1) & 0xFFFFFFFF
                self.shift = seg.options.window_scale or 0
                self.window = seg.window  # a SYN's window is never scaled
        if not self.rcv:
            raise ConnectionError("no SYN-ACK from the stack")
        guest._send(self._seg(TCP_ACK))
        self._absorb()

    def _seg(
        self, flags: int, payload: bytes = b"", options: TcpOptions | None = None
    ) -> TcpSegment:
        return TcpSegment(
            self.sport, 80, self.snd_nxt, self.rcv, flags, 0xFFFF, payload, options or TcpOptions()
        )

    def _absorb(self, *, read: bool = True) -> bool:
        """Take the stack's segments; with ``read``, keep and ACK their data.

        Without ``read`` the guest is one that never reads its socket: data
        is ignored and never acknowledged. Returns whether anything came.
        """
        segs = self.guest._take()
        got_data = False
        for seg in segs:
            if seg.rst:
                self.reset = True
            if seg.has_ack:
                self.snd_una = seg.ack
                self.window = seg.window << self.shift
            if read and seg.payload and seg.seq == self.rcv:
                self.received += seg.payload
                self.rcv = (self.rcv + len(seg.payload)) & 0xFFFFFFFF
                got_data = True
        if got_data:
            self.guest._send(self._seg(TCP_ACK))
        return bool(segs)

    def send(self, data: bytes, *, read: bool = True) -> None:
        """Send all of ``data`` as the host's window allows (reading answers if ``read``)."""
        view = memoryview(data)
        sent = 0
        for _ in range(_MAX_ROUNDS):
            in_flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
            room = self.window - in_flight
            while sent < len(data) and room > 0:
                n = min(65480, room, len(data) - sent)
                self.guest._send(self._seg(TCP_ACK, bytes(view[sent : sent + n])))
                self.snd_nxt = (self.snd_nxt + n) & 0xFFFFFFFF
                sent += n
                room -= n
            self._absorb(read=read)
            if self.reset:
                raise ConnectionError("the host reset the connection")
            if sent == len(data):
                return
        raise TimeoutError(f"the host's window stayed shut after {sent} bytes")

    def read_until(self, done: Callable[[bytearray], bool]) -> bytes:
        """Read (and ACK) until ``done(received)``; return what was received."""
        for _ in range(_MAX_ROUNDS):
            if done(self.received):
                return bytes(self.received)
            if not self._absorb():
                self.guest.now += 0.2  # let the stack's timers (window probes) run
                self.guest.stack.on_timer(self.guest.now)
                self.guest.relay.process_events()
            if self.reset:
                raise ConnectionError("the host reset the connection")
        raise TimeoutError(f"no complete response; got {bytes(self.received)[:200]!r}")

    def request(self, data: bytes) -> bytes:
        """Send ``data`` (one HTTP request) and return the response's bytes."""
        self.received.clear()
        self.send(data)
        return self.read_until(_complete)


def _complete(data: bytes | bytearray) -> bool:
    return count_responses(data) >= 1


def count_responses(data: bytes | bytearray) -> int:
    """How many complete ``Content-Length`` responses ``data`` holds (no copies)."""
    count = pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return count
        length = 0
        for line in bytes(data[pos:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        pos = end + 4 + length
        if pos > len(data):
            return count
        count += 1


def make_path(
    recorder: Recorder, limits: DriverLimits | None = None
) -> tuple[NetworkStack, FlowRelay]:
    """A stack and relay wired to ``recorder`` as the driver wires them (deny-all policy)."""
    stack = NetworkStack()
    limits = limits or DriverLimits()
    context = MediationContext(NetworkPolicy(allow_hosts=[]), None, recorder)
    relay = FlowRelay(
        stack,
        ca=CertificateAuthority.create("flood"),
        context=lambda: context,
        on_room=lambda: None,
        counters=collections.Counter(),
        send_chunk=limits.send_chunk,
        body_budget=limits.max_request_body_bytes,
        name="flood",
    )
    return stack, relay


def flood(recorder: Recorder, *, requests: int, body_size: int, per_connection: int = 50) -> int:
    """POST ``requests`` bodies of ``body_size`` bytes to the stub; return how many got 200."""
    stack, relay = make_path(recorder)
    guest = FloodGuest(stack, relay)
    ok = 0
    conn = guest.connection()
    for i in range(requests):
        if i and i % per_connection == 0:
            conn = guest.connection()
        body = bytes([i % 251]) * body_size  # a fresh object per request, as bytes off a wire
        head = (
            f"POST /x HTTP/1.1\r\nHost: {URL_HOST}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        response = conn.request(head + body)
        del body
        ok += response.startswith(b"HTTP/1.1 200")
    return ok


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--body", type=int, default=1 << 20)
    parser.add_argument("--hold", type=int, default=0, help="MiB the script itself keeps")
    parser.add_argument("--unbounded", action="store_true", help="a recorder without a budget")
    args = parser.parse_args(argv)
    recorder = Recorder(body_budget=1 << 40, max_bytes=1 << 40) if args.unbounded else Recorder()
    recorder.stub("*", f"http://{URL_HOST}/x", body=b"ok")
    make_path(Recorder())  # warm imports and the CA before the baseline
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _status()
    began = time.monotonic()
    ok = flood(recorder, requests=args.requests, body_size=args.body)
    held = [bytearray(b"x") * (1 << 20) for _ in range(args.hold)]
    gc.collect()
    end = _status()
    kept = recorder.requests
    result = {
        "ok": ok,
        "recorded": len(kept),
        "with_body": sum(1 for e in kept if e.request_body),
        "bodies_dropped": sum(1 for e in kept if e.bodies_dropped),
        "held_bytes": recorder.held_bytes,
        "body_bytes": sum(len(e.request_body) for e in kept),
        "peak_growth_kib": end["VmHWM"] - start["VmRSS"],
        "kept_growth_kib": end["VmRSS"] - start["VmRSS"],
        "seconds": round(time.monotonic() - began, 2),
        "held_mib": len(held),
    }
    return result


if __name__ == "__main__":
    json.dump(main(sys.argv[1:]), sys.stdout)
    print()
