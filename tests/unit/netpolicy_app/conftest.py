"""Shared fixtures for the network policy / application layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="session")
def ca_file(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(ca.ca_pem)
    return path
