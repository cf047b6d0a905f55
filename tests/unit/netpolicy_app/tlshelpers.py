"""TLS helpers shared by the CA, interceptor and upstream tests."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

#: Bound on any handshake in these tests (local sockets: milliseconds).
HANDSHAKE_TIMEOUT = 10.0


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A strict verifying client, like the guest's curl/requests would be."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def handshake(
    server_context: ssl.SSLContext,
    client: ssl.SSLContext,
    server_hostname: str | None,
    exchange: Callable[[ssl.SSLSocket, ssl.SSLSocket], None] | None = None,
) -> tuple[str | None, str | None]:
    """Run a real TLS handshake over a socketpair; return (ALPN, server's SNI).

    Raises what the client side raised (e.g. ssl.SSLCertVerificationError).
    """
    a, b = socket.socketpair()
    a.settimeout(HANDSHAKE_TIMEOUT)
    b.settimeout(HANDSHAKE_TIMEOUT)
    seen: dict[str, str | None] = {}
    server_error: list[BaseException] = []
    server_socks: list[ssl.SSLSocket] = []

    def sni_callback(
        sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        seen["sni"] = name

    server_context.sni_callback = sni_callback

    def serve() -> None:
        try:
            server_socks.append(server_context.wrap_socket(a, server_side=True))
        except (ssl.SSLError, OSError) as exc:
            server_error.append(exc)
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=server_hostname) as tls:
            thread.join(HANDSHAKE_TIMEOUT)
            if exchange is not None:
                exchange(server_socks[0], tls)
            return tls.selected_alpn_protocol(), seen.get("sni")
    finally:
        b.close()  # unblocks a server still waiting after a client-side failure
        thread.join(HANDSHAKE_TIMEOUT)
        server_context.sni_callback = None
        for s in server_socks:
            s.close()
        a.close()
        b.close()
