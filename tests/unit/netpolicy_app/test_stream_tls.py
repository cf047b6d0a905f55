"""``GuestTls``: the guest's TLS session of a ``wss://`` stream, carried on after the MITM.

A real client ``ssl.SSLObject`` (trusting the test CA) talks to a server
session made by the CA, both over memory BIOs: no socket, no VM.
"""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.stream_tls import GuestTls, GuestTlsError

CA = CertificateAuthority.create("stream tls test CA")


class Pair:
    """A client session and a :class:`GuestTls` server session, handshake done."""

    def __init__(self) -> None:
        client_ctx = ssl.create_default_context(cadata=CA.ca_pem.decode())
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="ws.test")
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = CA.ssl_context_for("ws.test").wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side in (self.client, server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            if s_out.pending:
                self.c_in.write(s_out.read())
            if self.c_out.pending:
                s_in.write(self.c_out.read())
        self.client.do_handshake()  # raises unless complete
        self.guest = GuestTls(server, s_in, s_out)

    def from_client(self, data: bytes) -> bytes:
        self.client.write(data)
        return self.c_out.read()

    def to_client(self) -> bytes:
        self.c_in.write(bytes(self.guest.wire))
        self.guest.wire.clear()
        out = bytearray()
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                return bytes(out)
            except ssl.SSLZeroReturnError:
                return bytes(out) + b"<close_notify>"
            out += chunk


def test_plaintext_crosses_both_ways() -> None:
    pair = Pair()
    assert pair.guest.decrypt(pair.from_client(b"\x81\x82abcdXY")) == b"\x81\x82abcdXY"
    pair.guest.encrypt(b"\x81\x02hi" * 20_000)  # several records
    assert pair.to_client() == b"\x81\x02hi" * 20_000


def test_all_readable_plaintext_comes_out_at_once() -> None:
    pair = Pair()
    wire = b"".join(pair.from_client(bytes([i]) * 10_000) for i in range(8))
    assert pair.guest.decrypt(wire) == b"".join(bytes([i]) * 10_000 for i in range(8))
    assert pair.guest.decrypt(b"") == b""  # nothing left waiting inside the session


def test_a_record_split_anywhere_is_decrypted_once_whole() -> None:
    pair = Pair()
    wire = pair.from_client(b"frame")
    assert pair.guest.decrypt(wire[:7]) == b""
    assert pair.guest.decrypt(wire[7:]) == b"frame"


def test_close_notify_ends_the_guest_side_and_ours_is_queued_once() -> None:
    pair = Pair()
    try:
        pair.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert pair.guest.decrypt(pair.c_out.read()) == b""
    assert pair.guest.guest_closed
    pair.guest.close()
    pair.guest.close()
    assert pair.to_client() == b"<close_notify>"


def test_a_tcp_eof_without_close_notify_also_ends_the_guest_side() -> None:
    pair = Pair()
    assert pair.guest.decrypt(b"", eof=True) == b""
    assert pair.guest.guest_closed


def test_garbage_from_the_guest_is_a_tls_error() -> None:
    pair = Pair()
    with pytest.raises(GuestTlsError, match="TLS error from the guest"):
        pair.guest.decrypt(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record that fails to decrypt


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_from_the_guest_decrypt_or_raise_guest_tls_error(data: bytes) -> None:
    pair = Pair()
    try:
        out = pair.guest.decrypt(data)
    except GuestTlsError:
        return
    assert out == b""  # random bytes never authenticate as plaintext
