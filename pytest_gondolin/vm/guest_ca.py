"""The CA a guest trusts: the one place ``vm/`` gets it from the cache.

:func:`~pytest_gondolin.netpolicy.http.ca.default_ca` loads (or creates)
the CA in ``<cache>/ca`` under a file lock kept in that folder. A cache this
user cannot write, such as a prebuilt one mounted read-only, cannot hold
that lock, although nothing has to be written when the CA is there. Then
the two files are read without the lock: writers replace each one by an
atomic rename, and a key read from one CA and a certificate from another
fail the key check of
:class:`~pytest_gondolin.netpolicy.http.ca.CertificateAuthority`. A CA
missing from (or expiring in) a read-only cache raises
:class:`~pytest_gondolin.errors.CacheDirError`, which names the folder.

The network stack is imported when a guest first needs it, as in
:mod:`~pytest_gondolin.vm.guest_network`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import CacheDirError, NetworkPolicyError

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.ca import CertificateAuthority

__all__ = ["guest_ca"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: CAs read from read-only caches, by folder (``default_ca`` keeps the others).
_read_only: dict[Path, CertificateAuthority] = {}


def guest_ca() -> CertificateAuthority:
    """The CA of this cache: ``default_ca()``, or read without its lock from a read-only cache.

    Raises CacheDirError if there is no usable cache folder, or the CA
    would have to be written to one that cannot be written;
    NetworkPolicyError if the CA files are unusable.
    """
    from pytest_gondolin.netpolicy.http.ca import default_ca

    directory = paths.cache_dir() / "ca"
    if paths.can_write(directory) or (not directory.exists() and paths.can_write(directory.parent)):
        return default_ca()
    with _lock:
        ca = _read_only.get(directory)
        if ca is None:
            ca = _read_only[directory] = _read(directory)
        return ca


def _read(directory: Path) -> CertificateAuthority:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pytest_gondolin.netpolicy.http.ca import (
        CA_CERT_FILE,
        CA_KEY_FILE,
        LEAF_LIFETIME,
        CertificateAuthority,
    )

    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:  # default_ca would tighten it; this cache cannot be changed
            log.warning("CA key %s has mode %o: other users may read it", key_path, mode)
    try:
        key_pem, cert_pem = key_path.read_bytes(), cert_path.read_bytes()
    except FileNotFoundError as exc:
        raise CacheDirError(
            paths.cache_root(),
            "cannot be written",
            need=f"the guests' network CA must be created in {directory}",
        ) from exc
    except OSError as exc:
        raise CacheDirError(
            paths.cache_root(), f"cannot be read ({exc.strerror}: {exc.filename})"
        ) from exc
    hint = f"(delete {key_path} and {cert_path} where the cache can be written)"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise NetworkPolicyError(f"CA files in {directory} are corrupt: {exc} {hint}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NetworkPolicyError(f"CA key {key_path} is not an ECDSA key {hint}")
    ca = CertificateAuthority(key, cert)
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC) + LEAF_LIFETIME:
        raise CacheDirError(
            paths.cache_root(),
            "cannot be written",
            need=f"the guests' network CA in {directory} has expired and must be replaced",
        )
    return ca
