"""Which TLS suite a guest client and the MITM agree on (issue 16, HTTPS speed).

Under TCG the guest's own AES-GCM is the ceiling for HTTPS through the
mediation, and AES-128 is the cheaper strong suite. The image makes
OpenSSL clients in the guest offer it first (``/etc/ssl/openssl.cnf``,
image recipe ``customize.sh``) and the MITM lets the client's order win
(:meth:`~pytest_gondolin.netpolicy.http.ca.CertificateAuthority.ssl_context_for`).
Both halves are checked: the guest's default order, what is negotiated
end to end with curl and Python, that a TLS 1.2 client still works, and
that a client preferring another suite gets that one (the host does not
force its own order).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading

import pytest

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.vm.machine import VM

URL = "https://suite.test/"


@pytest.fixture
def stubbed(vm: VM) -> VM:
    assert vm.http is not None
    vm.http.stub("GET", URL, body="suite ok")
    return vm


def _negotiated(vm: VM, args: str) -> tuple[str, str]:
    """(body, "TLSv1.x / SUITE") of one curl request in the guest."""
    r = vm.exec(f"curl -sS -v -m 30 {args} {URL}", timeout=90)
    assert r.returncode == 0, r.stderr
    m = re.search(r"SSL connection using (\S+ / \S+)", r.stderr)
    assert m is not None, r.stderr
    return r.stdout, m.group(1)


def test_guest_openssl_offers_aes_128_gcm_first(vm: VM) -> None:
    r = vm.exec("openssl ciphers -s -tls1_3", timeout=60, check=True)
    assert r.stdout.strip().split(":")[0] == "TLS_AES_128_GCM_SHA256", r.stdout


def test_curl_negotiates_aes_128_gcm_through_the_mitm(stubbed: VM) -> None:
    body, suite = _negotiated(stubbed, "--http1.1")
    assert body == "suite ok"
    assert suite == "TLSv1.3 / TLS_AES_128_GCM_SHA256"


def test_python_in_the_guest_negotiates_aes_128_gcm(stubbed: VM) -> None:
    code = (
        "import socket, ssl\n"
        "ctx = ssl.create_default_context()\n"
        "with socket.create_connection(('suite.test', 443), timeout=30) as raw:\n"
        "    with ctx.wrap_socket(raw, server_hostname='suite.test') as s:\n"
        "        print(s.version(), s.cipher()[0])\n"
    )
    r = stubbed.exec(["python3", "-c", code], timeout=90, check=True)
    assert r.stdout.split() == ["TLSv1.3", "TLS_AES_128_GCM_SHA256"]


def test_tls12_client_still_works(stubbed: VM) -> None:
    body, suite = _negotiated(stubbed, "--http1.1 --tls-max 1.2")
    assert body == "suite ok"
    assert suite.startswith("TLSv1.2 / ECDHE-"), suite
    assert "GCM" in suite or "CHACHA20" in suite, suite


def test_client_preferring_another_suite_gets_it(stubbed: VM) -> None:
    # The MITM does not impose its own order: a client that asks for
    # ChaCha20 first (as some do on CPUs without AES instructions) gets it.
    _, suite = _negotiated(
        stubbed,
        "--http1.1 --tls13-ciphers TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384",
    )
    assert suite == "TLSv1.3 / TLS_CHACHA20_POLY1305_SHA256"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mitm_context_lets_the_client_order_win_on_the_host() -> None:
    """Host only: the same property without a VM, against ``openssl s_client``."""
    ca = CertificateAuthority.create("suite order CA")
    context = ca.ssl_context_for("order.test")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            cipher = tls.cipher()
            seen.append(cipher[0] if cipher else "")
            tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "order.test",
                "-ciphersuites",
                "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
            ],
            input=b"x",
            capture_output=True,
            timeout=30,
            check=False,
        )
        thread.join(timeout=30)
    finally:
        listener.close()
    assert seen == ["TLS_AES_128_GCM_SHA256"], out.stdout.decode(errors="replace")[-2000:]
