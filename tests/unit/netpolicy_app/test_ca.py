"""The host CA: certificate profile, real TLS handshakes, persistence."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http import ca as ca_module
from pytest_gondolin.netpolicy.http.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority

from .tlshelpers import client_context, handshake


def test_ca_certificate_profile(ca: CertificateAuthority) -> None:
    cert = ca.cert
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert (
        ku.critical
        and ku.value.key_cert_sign
        and ku.value.crl_sign
        and not ku.value.digital_signature
    )
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key)
    assert cert.issuer == cert.subject
    assert b"PRIVATE KEY" not in ca.ca_pem


@pytest.mark.parametrize(
    ("name", "san"),
    [
        ("Example.TEST", x509.DNSName("example.test")),
        ("bücher.example", x509.DNSName("xn--bcher-kva.example")),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("[::1]", x509.IPAddress(ipaddress.ip_address("::1"))),
    ],
)
def test_leaf_profile(ca: CertificateAuthority, name: str, san: x509.GeneralName) -> None:
    leaf = ca.issue(name).cert
    assert leaf.issuer == ca.cert.subject
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [san]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now - dt.timedelta(hours=23)  # backdated for clock skew
    assert leaf.not_valid_after_utc - now <= dt.timedelta(days=8)  # short-lived


def test_long_name_has_no_common_name_but_still_verifies(ca: CertificateAuthority) -> None:
    name = ".".join(["a" * 60] * 3) + ".test"
    leaf = ca.issue(name).cert
    assert not leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    _, sni = handshake(ca.ssl_context_for(name), client_context(ca.ca_pem), name)
    assert sni == name


def test_leaves_are_cached_with_lru_bound(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = CertificateAuthority.create()
    first = fresh.issue("a.test")
    assert fresh.issue("A.test.") is first
    assert fresh.ssl_context_for("a.test") is fresh.ssl_context_for("a.test")
    monkeypatch.setattr(ca_module, "LEAF_CACHE_SIZE", 2)
    fresh.issue("b.test")
    fresh.issue("c.test")
    assert fresh.issue("a.test") is not first  # evicted, re-issued


def test_issue_rejects_invalid_names(ca: CertificateAuthority) -> None:
    for bad in ("", "exa mple", "a..b", "*.example.com"):
        with pytest.raises(NetworkPolicyError):
            ca.ssl_context_for(bad)


def test_real_handshake_with_sni_and_alpn(ca: CertificateAuthority) -> None:
    alpn, sni = handshake(
        ca.ssl_context_for("api.example.test"), client_context(ca.ca_pem), "api.example.test"
    )
    assert sni == "api.example.test"
    assert alpn == "http/1.1"  # the client offered h2 too; this context speaks HTTP/1.1 only
    alpn, _ = handshake(
        ca.ssl_context_for("api.example.test", alpn=("h2", "http/1.1")),
        client_context(ca.ca_pem),
        "api.example.test",
    )
    assert alpn == "h2"  # the MITM's context (mitm.py) selects h2 when offered


def test_real_handshake_for_ip_literal_without_sni(ca: CertificateAuthority) -> None:
    _, sni = handshake(ca.ssl_context_for("127.0.0.1"), client_context(ca.ca_pem), "127.0.0.1")
    assert sni is None  # clients do not send IP literals as SNI (RFC 6066 §3)


def test_application_data_flows(ca: CertificateAuthority) -> None:
    def exchange(server: ssl.SSLSocket, client: ssl.SSLSocket) -> None:
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.sendall(b"pong")
        assert client.recv(4) == b"pong"

    handshake(ca.ssl_context_for("echo.test"), client_context(ca.ca_pem), "echo.test", exchange)


def test_wrong_ca_is_rejected(ca: CertificateAuthority) -> None:
    """Negative control: a client trusting another CA refuses our leaf."""
    other = CertificateAuthority.create()
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(
            ca.ssl_context_for("api.example.test"), client_context(other.ca_pem), "api.example.test"
        )


def test_wrong_name_is_rejected(ca: CertificateAuthority) -> None:
    """Negative control: the leaf for one name does not pass for another."""
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(ca.ssl_context_for("a.example.test"), client_context(ca.ca_pem), "b.example.test")


def test_load_or_create_persists(tmp_path: Path) -> None:
    directory = tmp_path / "cache" / "ca"
    first = CertificateAuthority.load_or_create(directory)
    key_file, cert_file = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert cert_file.read_bytes() == first.ca_pem
    assert b"PRIVATE KEY" in key_file.read_bytes()
    second = CertificateAuthority.load_or_create(directory)
    assert second.ca_pem == first.ca_pem
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files left
    # a leaf from the reloaded CA verifies against the first one's certificate
    handshake(second.ssl_context_for("x.test"), client_context(first.ca_pem), "x.test")


def test_load_or_create_concurrent_processes_agree(tmp_path: Path) -> None:
    results: list[bytes] = []

    def load() -> None:
        results.append(CertificateAuthority.load_or_create(tmp_path).ca_pem)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and len(set(results)) == 1


def test_load_or_create_tightens_key_permissions(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    os.chmod(tmp_path / CA_KEY_FILE, 0o644)
    CertificateAuthority.load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / CA_KEY_FILE).stat().st_mode) == 0o600


def test_missing_certificate_means_fresh_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_CERT_FILE).unlink()  # e.g. a crash between the two writes
    assert CertificateAuthority.load_or_create(tmp_path).ca_pem != first.ca_pem


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CA_KEY_FILE).write_bytes(b"garbage"), "CA files are corrupt"),
        (lambda d: (d / CA_KEY_FILE).unlink(), "is missing"),
        (
            lambda d: (d / CA_CERT_FILE).write_bytes(CertificateAuthority.create().ca_pem),
            "do not belong together",
        ),
    ],
)
def test_unusable_files_raise_with_hint(tmp_path: Path, damage: object, message: str) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    assert callable(damage)
    damage(tmp_path)
    with pytest.raises(NetworkPolicyError, match=message) as info:
        CertificateAuthority.load_or_create(tmp_path)
    assert "to create a new CA" in str(info.value)


def test_unwritable_directory_is_wrapped(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(NetworkPolicyError, match="cannot create or read the CA"):
        CertificateAuthority.load_or_create(blocker / "ca")
