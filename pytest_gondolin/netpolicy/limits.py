"""Bounds on what one guest can make its network driver hold or do.

One value, :class:`DriverLimits`, validated on construction and read by
the driver (:mod:`.driver`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.upstream import DEFAULT_UPSTREAM_TIMEOUT
from pytest_gondolin.netpolicy.stack.peer import DEFAULT_MAX_TX_BYTES, DEFAULT_READ_CHUNK

__all__ = ["DriverLimits"]


@dataclass(frozen=True)
class DriverLimits:
    """Bounds on what one guest can make the driver hold or do.

    ``upstream_workers``: concurrent upstream fetches (each blocks a thread
    for up to ``upstream_timeout`` s); a guest's further requests wait in
    line, one per flow at most. ``max_output_bytes``: response bytes
    waiting, across flows, for the guest to read; past it no new upstream
    fetch starts (responses are up to 64 MiB each). ``max_tx_bytes``:
    frames waiting for QEMU to read; past it new frames are dropped like a
    full NIC ring (TCP retransmits). ``read_chunk``/``max_read_per_wake``:
    bytes per ``recv`` from QEMU and per loop iteration, so timers and
    results are served between bursts. ``send_chunk``: bytes offered to the
    stack per ``flow_send`` (its per-flow send buffer is 256 KiB).
    ``max_request_body_bytes``: request bodies the host holds at once
    across flows, from their first byte until answered (each is buffered
    whole, up to 64 MiB); past it a request is refused with 503. Without
    it, every one of the stack's 256 flows could hold a 64 MiB body.

    Raw TCP streams (``tcp=`` services and ``VM.forward``, :mod:`.streams`):
    ``stream_buffer`` bytes wait at most each way per stream (past it the
    other side is not read: its TCP window closes); a stream silent for
    ``stream_idle_timeout`` s or past ``stream_max_bytes`` both ways is
    reset; ``max_ingress_connections`` forwarded connections at once (more
    are closed at once) and ``max_forwards`` forwarded ports per VM.
    """

    upstream_workers: int = 4
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    max_output_bytes: int = 256 * 1024 * 1024
    max_tx_bytes: int = DEFAULT_MAX_TX_BYTES
    read_chunk: int = DEFAULT_READ_CHUNK
    max_read_per_wake: int = 4 * 1024 * 1024
    send_chunk: int = 256 * 1024
    max_request_body_bytes: int = 128 * 1024 * 1024
    #: 256 KiB: one TCP send buffer, enough to keep a local relay busy.
    stream_buffer: int = 256 * 1024
    #: Five minutes: longer than any keep-alive a test's client waits out,
    #: short enough that a forgotten stream frees its slot within a test run.
    stream_idle_timeout: float = 300.0
    #: 4 GiB both ways per stream: a database restore fits, a runaway loop stops.
    stream_max_bytes: int = 4 * 1024**3
    #: Forwarded connections at once: a test drives a handful, a flood stops here.
    max_ingress_connections: int = 64
    #: Forwarded ports per VM.
    max_forwards: int = 64

    def __post_init__(self) -> None:
        for name in (
            "upstream_workers",
            "max_output_bytes",
            "max_tx_bytes",
            "read_chunk",
            "max_read_per_wake",
            "send_chunk",
            "max_request_body_bytes",
            "stream_buffer",
            "stream_max_bytes",
            "max_ingress_connections",
            "max_forwards",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"DriverLimits.{name} must be positive")
        if self.stream_idle_timeout <= 0:
            raise ConfigError("DriverLimits.stream_idle_timeout must be positive")
        if self.upstream_timeout <= 0:
            raise ConfigError("DriverLimits.upstream_timeout must be positive")
