"""The host's certificate authority for terminating the guest's TLS.

The guest trusts this CA (its certificate, :attr:`CertificateAuthority.ca_pem`,
is installed in the guest's trust store at boot); the host then answers
each TLS connection with a leaf certificate for the requested name, reads
the plaintext HTTP, applies the policy and talks to the real upstream with
full verification.

**The CA private key never leaves the host.** It lives in memory and, with
:meth:`CertificateAuthority.load_or_create`, in a ``0600`` file under the
user's cache directory; only the certificate is given to the guest. Leaf
keys are generated per name, kept in memory, and touch disk only for an
instant in a private (``0700``) temporary directory because
:meth:`ssl.SSLContext.load_cert_chain` reads files.

Certificate profile (RFC 5280), all ECDSA P-256 / SHA-256:

* CA: ``BasicConstraints(ca=True, path_length=0)`` critical,
  ``KeyUsage(keyCertSign, cRLSign)`` critical, SKI, AKI; valid
  :data:`CA_LIFETIME` from a start backdated by :data:`CLOCK_SKEW_ALLOWANCE`.
* Leaf: SAN (``dNSName`` or ``iPAddress``), ``BasicConstraints(ca=False)``
  critical, ``KeyUsage(digitalSignature)`` critical, EKU ``serverAuth``,
  SKI, AKI from the CA's SKI; valid :data:`LEAF_LIFETIME` from a start
  backdated by :data:`CLOCK_SKEW_ALLOWANCE` so a guest whose clock lags
  still accepts it. Cached (LRU, :data:`LEAF_CACHE_SIZE`) and re-issued
  before :data:`LEAF_REFRESH_MARGIN` of validity remains.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import secrets
import ssl
import stat
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import filelock
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.rules import normalize_host

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CertificateAuthority",
    "LeafCertificate",
    "default_ca",
]

log = logging.getLogger(__name__)

CA_KEY_FILE: Final = "gondolin-ca.key"
CA_CERT_FILE: Final = "gondolin-ca.pem"
_LOCK_FILE: Final = "gondolin-ca.lock"
#: Long enough never to expire under a test suite; renewed when it does.
CA_LIFETIME: Final = dt.timedelta(days=3650)
#: Leaves are cheap to re-issue; a short life limits a leaked leaf key.
LEAF_LIFETIME: Final = dt.timedelta(days=7)
#: A leaf is re-issued when less than this much validity remains.
LEAF_REFRESH_MARGIN: Final = dt.timedelta(days=1)
#: Backdate notBefore: a restored guest may briefly run with an old clock.
CLOCK_SKEW_ALLOWANCE: Final = dt.timedelta(days=1)
#: Names whose leaf and SSL context stay cached (a guest can ask for many).
LEAF_CACHE_SIZE: Final = 256
#: Waiting for another process creating the CA (key generation takes ms).
LOCK_TIMEOUT: Final = 30.0
_ORG: Final = "pytest-gondolin"
_CN_MAX: Final = 64  # RFC 5280 ub-common-name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class LeafCertificate:
    """A leaf certificate for one server name and its private key."""

    server_name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class CertificateAuthority:
    """An in-memory CA issuing cached per-name leaves and server SSL contexts.

    Thread-safe. Build with :meth:`create` (ephemeral) or
    :meth:`load_or_create` (persisted, shared by processes).
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise NetworkPolicyError("CA key and certificate do not belong together")
        self._key = key
        self._cert = cert
        try:
            self._ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            raise NetworkPolicyError("CA certificate has no SubjectKeyIdentifier") from None
        self._lock = threading.Lock()
        self._leaves: OrderedDict[str, LeafCertificate] = OrderedDict()
        self._contexts: OrderedDict[
            tuple[str, tuple[str, ...]], tuple[LeafCertificate, ssl.SSLContext]
        ] = OrderedDict()

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, common_name: str | None = None) -> CertificateAuthority:
        """A fresh CA with a new key (never written anywhere)."""
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    common_name or f"pytest-gondolin CA {secrets.token_hex(4)}",
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load the CA persisted in ``directory``, creating it on first use.

        Concurrent callers (xdist workers, parallel jobs) serialise on a file
        lock, so all of them end up with the same CA. The key is written
        ``0600`` and both files atomically (write to a temporary file, then
        rename); the certificate is written last and marks completion, so a
        crash mid-creation just causes a new CA next time. An expired CA is
        replaced. Raises :class:`NetworkPolicyError` if the files exist but
        are unusable (naming the files; delete them to start over).
        """
        root = Path(directory)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with filelock.FileLock(str(root / _LOCK_FILE), timeout=LOCK_TIMEOUT):
                cert_path = root / CA_CERT_FILE
                key_path = root / CA_KEY_FILE
                if cert_path.exists():
                    ca = cls._load(key_path, cert_path)
                    if ca._cert.not_valid_after_utc > _now() + LEAF_LIFETIME:
                        return ca
                    log.warning(
                        "CA certificate %s has expired or is about to; replacing it", cert_path
                    )
                ca = cls.create()
                _write_atomic(key_path, ca._key_pem(), mode=0o600)
                _write_atomic(cert_path, ca.ca_pem, mode=0o644)
                log.info("created a new CA in %s", root)
                return ca
        except filelock.Timeout as exc:
            raise NetworkPolicyError(
                f"timed out after {LOCK_TIMEOUT}s waiting for the CA lock in {root}"
            ) from exc
        except OSError as exc:
            raise NetworkPolicyError(f"cannot create or read the CA in {root}: {exc}") from exc

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        hint = f"(delete {key_path} and {cert_path} to create a new CA)"
        try:
            mode = stat.S_IMODE(key_path.stat().st_mode)
            if mode & 0o077:
                log.warning("CA key %s had mode %o; tightening to 0600", key_path, mode)
                key_path.chmod(0o600)
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError as exc:
            raise NetworkPolicyError(f"CA key {key_path} is missing {hint}") from exc
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise NetworkPolicyError(f"CA files are corrupt: {exc} {hint}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise NetworkPolicyError(f"CA key {key_path} is not an ECDSA key {hint}")
        try:
            return cls(key, cert)
        except NetworkPolicyError as exc:
            raise NetworkPolicyError(f"{exc} {hint}") from None

    # ------------------------------------------------------------------ accessors

    @property
    def cert(self) -> x509.Certificate:
        """The CA certificate."""
        return self._cert

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM: what the guest is told to trust."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def _key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # ------------------------------------------------------------------ leaves

    def issue(self, server_name: str) -> LeafCertificate:
        """A (cached) leaf certificate for ``server_name`` (a DNS name or IP literal).

        Raises :class:`NetworkPolicyError` for an invalid name.
        """
        name = normalize_host(server_name)
        with self._lock:
            leaf = self._leaves.get(name)
            if leaf is not None and _fresh(leaf):
                self._leaves.move_to_end(name)
                return leaf
            leaf = self._issue(name)
            self._leaves[name] = leaf
            while len(self._leaves) > LEAF_CACHE_SIZE:
                self._leaves.popitem(last=False)
            return leaf

    def _issue(self, name: str) -> LeafCertificate:
        key = _new_key()
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            san: x509.GeneralName = x509.DNSName(name)
        else:
            san = x509.IPAddress(ip)
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)]
        if len(name) <= _CN_MAX:  # the SAN is authoritative; CN only for old tools
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        log.debug("issued leaf certificate for %s", name)
        return LeafCertificate(server_name=name, cert=cert, key=key)

    def ssl_context_for(
        self, server_name: str, *, alpn: tuple[str, ...] = ("http/1.1",)
    ) -> ssl.SSLContext:
        """A server-side context presenting a leaf for ``server_name``.

        TLS 1.2+; ALPN selects the first of ``alpn`` the client offers (the
        MITM passes ``("h2", "http/1.1")``: :mod:`.mitm`; the default suits
        an HTTP/1.1-only test server). Cached per name alongside its leaf. Raises
        :class:`NetworkPolicyError` for an invalid name.
        """
        name = normalize_host(server_name)
        with self._lock:
            cached = self._contexts.get((name, alpn))
            if cached is not None and _fresh(cached[0]):
                self._contexts.move_to_end((name, alpn))
                return cached[1]
        leaf = self.issue(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The client's suite order wins (Python turns server preference on, and
        # cannot reorder TLS 1.3 suites): under TCG the guest's AES-128-GCM is
        # cheaper than OpenSSL's first choice AES-256-GCM (docs/network.md).
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        context.set_alpn_protocols(list(alpn))  # the server's order wins
        try:
            with tempfile.TemporaryDirectory(prefix="gondolin-leaf-") as tmp:
                chain = os.path.join(tmp, "chain.pem")
                keyfile = os.path.join(tmp, "key.pem")
                _write_private(chain, leaf.cert_pem)
                _write_private(keyfile, leaf.key_pem)
                context.load_cert_chain(chain, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise NetworkPolicyError(f"cannot build a TLS context for {name!r}: {exc}") from exc
        with self._lock:
            self._contexts[(name, alpn)] = (leaf, context)
            while len(self._contexts) > LEAF_CACHE_SIZE:
                self._contexts.popitem(last=False)
        return context


def _fresh(leaf: LeafCertificate) -> bool:
    return leaf.cert.not_valid_after_utc - _now() > LEAF_REFRESH_MARGIN


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_CA_LOCK = threading.Lock()
_CAS: dict[Path, CertificateAuthority] = {}


def default_ca() -> CertificateAuthority:
    """The interception CA of this cache dir (``<cache>/ca``), created on first use.

    One CA per cache dir, so the CA certificate in cached boot payloads and
    warm snapshots stays valid across runs. Raises
    :class:`~pytest_gondolin.errors.NetworkPolicyError` if it cannot be
    read or created.
    """
    directory = paths.cache_dir() / "ca"
    with _CA_LOCK:
        ca = _CAS.get(directory)
        if ca is None:
            ca = _CAS[directory] = CertificateAuthority.load_or_create(directory)
        return ca
