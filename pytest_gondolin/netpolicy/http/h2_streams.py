"""The pieces of one guest HTTP/2 connection the server keeps: its h2 state and its streams.

:func:`server_connection` is the h2 server connection with our SETTINGS
(RFC 9113 §6.5.2) and windows, its preface already queued;
:class:`H2Stream` is one stream's request as it arrives, then its response
as it leaves; :func:`head_bytes` is what a decoded header block counts
against the guest's budget. :class:`~.h2_server.H2Interceptor` drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.settings

from pytest_gondolin.netpolicy.http.messages import HttpRequest

__all__ = ["H2Stream", "head_bytes", "server_connection"]

#: The receive window each stream starts with (RFC 9113 §6.9.2). 1 MiB lets an
#: upload flow without a round trip per 64 KiB; what is buffered is bounded by
#: the body limits, not by the window.
_INITIAL_WINDOW: Final = 1 << 20


def server_connection(*, max_streams: int, max_header_bytes: int) -> h2.connection.H2Connection:
    """A server connection advertising ``max_streams`` and ``max_header_bytes``, no push."""
    config = h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=True
    )
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _INITIAL_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # h2 gives SETTINGS_MAX_HEADER_LIST_SIZE to its HPACK decoder only when a
    # change is acknowledged, never for initial values: bound the decoder itself.
    conn.decoder.max_header_list_size = max_header_bytes
    conn.initiate_connection()
    # The connection's window too (RFC 9113 §6.9.2: SETTINGS sets only the streams').
    conn.increment_flow_control_window(_INITIAL_WINDOW - 65_535)
    return conn


@dataclass(eq=False)
class H2Stream:
    """One stream's request as it arrives, then its response as it leaves."""

    id: int
    started: float
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    taken: int = 0  # bytes of the shared BodyBudget this stream holds
    head: int = 0  # of which its decoded header block (RFC 7541 §4.1 size)
    request: HttpRequest | None = None  # complete: owed a response
    reset: bool = False  # the guest reset it: drop the response when it comes
    guest_ended: bool = False  # END_STREAM from the guest: the request is whole
    out: memoryview | None = None  # response body not yet framed
    trailers: list[tuple[bytes, bytes]] | None = None  # sent after the body


def head_bytes(headers: list[tuple[str, str]]) -> int:
    """The decoded size of a header block as RFC 7541 §4.1 counts it (32 bytes per field)."""
    return sum(len(n) + len(v) + 32 for n, v in headers)
