"""Records of raw TCP streams: named TCP services and ``VM.forward`` ingress.

A stream is not an HTTP exchange, so it is recorded as a :class:`TcpFlow`
in the recorder's ``tcp_flows`` (``vm.http.tcp_flows``), next to the
exchanges. A flow is recorded when it opens (``ended is None``) and its
record is replaced when it ends, with the byte counts, the duration and
how it ended. :class:`TcpFlowLog` keeps at most :data:`MAX_TCP_FLOWS`
(oldest dropped first); every record has a fixed size, so the log is
bounded whatever the guest does. Thread-safe: the network thread writes,
the test reads copies.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

__all__ = ["MAX_TCP_FLOWS", "TcpFlow", "TcpFlowKind", "TcpFlowLog"]

#: Stream records kept per recorder (a record is a few hundred bytes).
MAX_TCP_FLOWS: Final = 10_000

TcpFlowKind = Literal["tcp", "ingress", "websocket"]


@dataclass(frozen=True)
class TcpFlow:
    """One raw TCP stream the host relayed.

    ``kind``: ``"tcp"`` (the guest dialled a ``tcp=`` service),
    ``"ingress"`` (a client connected to a ``VM.forward`` port) or
    ``"websocket"`` (the session after a ``101``). ``name`` and ``port``:
    the name and port the guest dialled, or ``"guest"`` and the guest port
    an ingress connection was opened to. ``target``: where the host relayed
    it (``"127.0.0.1:5432"``), or for ingress the forwarded host port
    (``"127.0.0.1:41234"``). ``bytes_from_guest`` /
    ``bytes_to_guest``: payload bytes each way. ``started``: wall-clock
    time (``time.time()``); ``duration``: seconds, ``None`` while open;
    ``ended``: how it ended, ``None`` while open (see docs/traffic.md).
    """

    id: int
    kind: TcpFlowKind
    name: str
    port: int
    target: str
    started: float
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0
    duration: float | None = None
    ended: str | None = None

    @property
    def open(self) -> bool:
        """Whether the stream is still relayed."""
        return self.ended is None

    def summary(self) -> str:
        """One line: kind, endpoints, bytes each way and how it ended."""
        state = "open" if self.ended is None else f"{self.ended} after {self.duration:.2f} s"
        return (
            f"{self.kind} {self.name}:{self.port} -> {self.target}: "
            f"{self.bytes_from_guest} B from guest, {self.bytes_to_guest} B to guest, {state}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TcpFlowLog:
    """The bounded, thread-safe list of :class:`TcpFlow` records of one recorder."""

    def __init__(self, max_flows: int = MAX_TCP_FLOWS) -> None:
        self._lock = threading.Lock()
        self._flows: OrderedDict[int, TcpFlow] = OrderedDict()
        self._max = max_flows

    def record(self, flow: TcpFlow) -> None:
        """Add ``flow`` (a stream that just opened)."""
        with self._lock:
            self._flows[flow.id] = flow
            while len(self._flows) > self._max:
                self._flows.popitem(last=False)

    def update(self, flow: TcpFlow) -> None:
        """Replace the record with ``flow.id`` in place; nothing if it was cleared or dropped."""
        with self._lock:
            if flow.id in self._flows:
                self._flows[flow.id] = flow

    @property
    def flows(self) -> list[TcpFlow]:
        """A copy of the records, oldest first."""
        with self._lock:
            return list(self._flows.values())

    def clear(self) -> None:
        with self._lock:
            self._flows.clear()
