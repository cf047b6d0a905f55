"""The TLS records the MITM writes to the guest: full 16 KiB records, whatever the stack takes.

Under TCG every record costs the guest two reads and a decryption set-up,
so a large answer must go out in maximal records even when the TCP stack
accepts only a little at a time (issue 16, HTTPS speed).
"""

from __future__ import annotations

import ssl
import struct
from ipaddress import IPv4Address

import pytest

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.mitm import FlowProxy

CA = CertificateAuthority.create("mitm records CA")
#: TLS 1.3 application_data record carrying 16 KiB of plaintext: 16384 +
#: 1 (inner content type) + 16 (AES-GCM tag).
FULL_RECORD = 16384 + 1 + 16
_APPLICATION_DATA = 23


def _records(wire: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record in ``wire``, which must hold whole records."""
    out = []
    at = 0
    while at < len(wire):
        kind, _version, length = struct.unpack_from("!BHH", wire, at)
        out.append((kind, length))
        at += 5 + length
    assert at == len(wire), "wire output ends inside a record"
    return out


@pytest.mark.parametrize("take", [1 << 20, 64 * 1024, 1460, 100])
def test_large_answer_goes_out_in_full_records(take: int) -> None:
    proxy = FlowProxy(
        dst_ip=IPv4Address("198.18.0.7"), dst_port=443, dns_name="api.test", ca=CA, now=0.0
    )
    context = ssl.create_default_context(cadata=CA.ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    guest = context.wrap_bio(inc, out, server_hostname="api.test")

    def exchange(limit: int) -> bytes:
        if out.pending:
            proxy.receive(out.read())
        wire = b""
        while data := proxy.pending_output(limit):
            proxy.consume_output(len(data))
            wire += data
        return wire

    for _ in range(10):
        try:
            guest.do_handshake()
            break
        except ssl.SSLWantReadError:
            inc.write(exchange(1 << 20))
    guest.write(b"GET /big HTTP/1.1\r\nHost: api.test\r\n\r\n")
    inc.write(exchange(1 << 20))  # the request in; session tickets out
    (received,) = proxy.take_requests()
    body = bytes(range(256)) * 4096  # 1 MiB
    proxy.respond(HttpResponse(200, (("Content-Length", str(len(body))),), body))
    wire = exchange(take)

    records = _records(wire)
    assert {kind for kind, _ in records} == {_APPLICATION_DATA}
    lengths = [length for _, length in records]
    # Head + 64 records of 16 KiB: every record but the last is full.
    assert all(n == FULL_RECORD for n in lengths[:-1]), sorted(set(lengths))
    assert len(lengths) == len(body) // 16384 + 1
    inc.write(wire)
    got = b""
    while True:
        try:
            got += guest.read(1 << 20)
        except ssl.SSLWantReadError:
            break
    assert got.endswith(body) and got.startswith(b"HTTP/1.1 200 ")
    assert received.request.path == "/big"
