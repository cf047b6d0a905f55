"""What one guest TCP flow may hold and how long it waits: :class:`TcpConfig`.

Also the :class:`BufferBudget` every flow of a stack draws its buffers
from, so a guest opening many flows cannot make the host hold more than
one bound in all, and the flow table's defaults for the whole stack
(flow cap, that budget, how long a SYN waits for its owner).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_gondolin.errors import ConfigError

__all__ = [
    "DEFAULT_ACCEPT_TIMEOUT",
    "DEFAULT_BUFFER_BUDGET",
    "DEFAULT_MAX_FLOWS",
    "DEFAULT_MSS",
    "DEFAULT_PEER_MSS",
    "BufferBudget",
    "TcpConfig",
]

#: MSS for the largest virtio-net MTU QEMU allows (host_mtu=65520) minus
#: the 20-byte IPv4 and 20-byte TCP headers. The guest caps what we send
#: with its own MSS option, so this costs nothing on a 1500-byte link.
DEFAULT_MSS = 65520 - 40
#: RFC 9293 §3.7.1: the MSS to assume when the SYN carries none.
DEFAULT_PEER_MSS = 536
#: Live TCP flows at once. A test suite's guest rarely holds more than a
#: few dozen; the cap bounds per-flow state against a guest opening
#: connections in a loop.
DEFAULT_MAX_FLOWS = 256
#: All flows' send and receive buffers together. Per-flow caps (256 KiB
#: each way) times DEFAULT_MAX_FLOWS would be 128 MiB; 32 MiB keeps the
#: worst case modest while leaving a few busy flows at full speed.
DEFAULT_BUFFER_BUDGET = 32 * 1024 * 1024
#: How long a SYN may wait for accept()/reject(). Generous for an owner
#: that dials upstream before accepting; far below the ~2 minutes the
#: guest itself keeps retrying its SYN.
DEFAULT_ACCEPT_TIMEOUT = 30.0


@dataclass(frozen=True)
class TcpConfig:
    """Per-flow TCP parameters; every default has a reason.

    ``mss``: what we advertise (link MTU - 40). ``send_buffer`` /
    ``recv_buffer``: per-flow caps in bytes; 256 KiB holds four maximal
    segments, plenty for a local link. ``rto_initial``: RFC 6298 §2.1.
    ``rto_max``: RFC 6298 §2.5 allows a cap of at least 60 s.
    ``max_retries``: consecutive unanswered retransmissions (or window
    probes) before the flow is reset; 8 with the defaults is about three
    minutes, longer than any pause of a healthy VM (snapshots, TCG).
    ``min_peer_mss``: floor under the guest's MSS option, so a hostile
    guest cannot make us cut data into 1-byte segments (Linux clamps for
    the same reason, tcp_min_snd_mss); our guests never use a smaller MTU.
    """

    mss: int = DEFAULT_MSS
    send_buffer: int = 256 * 1024
    recv_buffer: int = 256 * 1024
    rto_initial: float = 1.0
    rto_max: float = 60.0
    max_retries: int = 8
    min_peer_mss: int = DEFAULT_PEER_MSS

    def __post_init__(self) -> None:
        if not 88 <= self.mss <= 65495:
            raise ConfigError(f"TCP MSS {self.mss} outside 88..65495")
        if self.send_buffer < 1 or self.recv_buffer < 2:
            raise ConfigError("TCP buffers must hold at least a couple of bytes")
        if self.recv_buffer > 0xFFFF << 14:
            raise ConfigError(f"TCP receive buffer {self.recv_buffer} exceeds the RFC 7323 maximum")
        if not 0 < self.rto_initial <= self.rto_max:
            raise ConfigError("need 0 < rto_initial <= rto_max")
        if self.max_retries < 1:
            raise ConfigError("max_retries must be at least 1")
        if not 1 <= self.min_peer_mss <= self.mss:
            raise ConfigError("min_peer_mss must be between 1 and mss")

    @property
    def window_shift(self) -> int:
        """The smallest RFC 7323 shift that can advertise the whole receive buffer."""
        shift = 0
        while (0xFFFF << shift) < self.recv_buffer:
            shift += 1
        return shift


class BufferBudget:
    """A byte budget shared by the buffers of many flows.

    Flows take from it as they buffer data and give back as it drains, so
    the stack's total buffered bytes never exceed ``limit`` however many
    flows a guest opens. ``starved`` turns true when a flow wanted more
    than was available; the owner clears it after nudging flows.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"buffer budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.starved = False

    @property
    def available(self) -> int:
        return max(self.limit - self.used, 0)

    def take(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used = max(self.used - n, 0)
