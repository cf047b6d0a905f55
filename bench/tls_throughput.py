"""HTTPS throughput through the mediation, side by side with plain HTTP and the guest's own crypto.

One VM, one run: the guest downloads a large body over plain HTTP and
over HTTPS (the MITM terminates TLS with the guest), and runs
``openssl speed`` for the AEADs a TLS client may pick. The guest's own
AES-GCM speed is the ceiling for HTTPS under TCG; the rows report the
HTTPS figure as a fraction of it. Each figure is the median of
``rounds`` interleaved repetitions, because this machine is shared.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from network import BIG, _Handler, _Server

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.warm import launch_clean

Row = tuple[str, str, str]
#: The AEADs a TLS client may negotiate, as ``openssl speed -evp`` names them.
CIPHERS = ("aes-128-gcm", "aes-256-gcm", "chacha20-poly1305")


@dataclass(frozen=True)
class Download:
    """One curl download in the guest: speed, negotiated suite, curl's CPU seconds in the guest."""

    mbps: float
    cipher: str
    user: float
    sys: float


def _download(vm: VM, url: str) -> Download:
    r = vm.exec(
        [
            "bash",
            "-c",
            "TIMEFORMAT='%U %S'; { time curl -sS -v --http1.1 -o /dev/null -w '%{speed_download}\\n' "
            f"{url} 2>/tmp/curl.err; }} 2>/tmp/time.txt; cat /tmp/time.txt;"
            " grep -o 'SSL connection using .*' /tmp/curl.err || true",
        ],
        timeout=600,
        check=True,
    )
    lines = r.stdout.splitlines()
    if len(lines) < 2:
        raise RuntimeError(f"unexpected output from the guest's curl: {r.stdout!r} {r.stderr!r}")
    user, sys_ = (float(x) for x in lines[1].split())
    cipher = lines[2].removeprefix("SSL connection using ") if len(lines) > 2 else ""
    return Download(float(lines[0]) / 1e6, cipher, user, sys_)


def _openssl_speed(vm: VM, cipher: str, *, aead: bool = False) -> float:
    """The guest's ``openssl speed -evp`` figure for 16 KiB blocks, in MB/s.

    ``aead``: OpenSSL's ``-aead`` mode, a TLS-like sequence (new IV and
    AAD per 16 KiB block, as per TLS record), instead of one long stream.
    """
    flag = "-aead " if aead else ""
    r = vm.exec(
        f"openssl speed -seconds 2 -bytes 16384 {flag}-evp {cipher} 2>/dev/null | tail -n 1",
        timeout=300,
        check=True,
    )
    line = r.stdout.strip().split()
    if len(line) < 2 or not line[-1].endswith("k"):
        raise RuntimeError(f"unexpected openssl speed output for {cipher}: {r.stdout!r}")
    return float(line[-1][:-1]) * 1000 / 1e6


def https_section(config: VMConfig, rounds: int) -> list[Row]:
    ca = CertificateAuthority.create("bench upstream CA")
    tmp = Path(tempfile.mkdtemp(prefix="gondolin-bench-https-"))
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    plain = _Server(("127.0.0.1", 0), _Handler)
    tls = _Server(("127.0.0.1", 0), _Handler)
    tls.socket = ca.ssl_context_for("api.test").wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    resolve = {
        "api.test:80": f"127.0.0.1:{plain.server_address[1]}",
        "api.test:443": f"127.0.0.1:{tls.server_address[1]}",
    }
    policy = NetworkPolicy(allow_hosts=["api.test"], resolve=resolve, upstream_ca=str(ca_file))
    keys = ("http", "https", "http-cpu", "https-user", "https-sys", "aead", *CIPHERS)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    negotiated = set()
    vm = launch_clean(config, name="bench-https")
    try:
        vm.configure_network(policy)
        for _ in range(rounds):
            plain_dl = _download(vm, "http://api.test/big")
            samples["http"].append(plain_dl.mbps)
            samples["http-cpu"].append(plain_dl.user + plain_dl.sys)
            tls_dl = _download(vm, "https://api.test/big")
            samples["https"].append(tls_dl.mbps)
            samples["https-user"].append(tls_dl.user)
            samples["https-sys"].append(tls_dl.sys)
            negotiated.add(tls_dl.cipher)
            for name in CIPHERS:
                samples[name].append(_openssl_speed(vm, name))
            samples["aead"].append(_openssl_speed(vm, "aes-128-gcm", aead=True))
    finally:
        vm.close()
        for server in (plain, tls):
            server.shutdown()
            server.server_close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    size = f"{BIG // (1024 * 1024)} MB"
    raw = "; ".join(f"{k}: " + ", ".join(f"{x:.0f}" for x in v) for k, v in samples.items())
    print(f"https bench samples (MB/s): {raw}; negotiated: {sorted(negotiated)}")
    return [
        (
            f"{size} download through the mediation, HTTPS (curl, MITM TLS)",
            f"{med['https']:.0f} MB/s",
            f"median of {rounds}; negotiated {', '.join(sorted(negotiated))}; "
            f"{100 * med['https'] / med['aes-128-gcm']:.0f} % of the guest's own AES-128-GCM; "
            f"curl's CPU in the guest {med['https-user']:.1f} s user + {med['https-sys']:.1f} s "
            f"system (plain HTTP: {med['http-cpu']:.1f} s in all)",
        ),
        (
            f"{size} download through the mediation, plain HTTP (same run)",
            f"{med['http']:.0f} MB/s",
            f"median of {rounds}; HTTPS/HTTP = {med['https'] / med['http']:.2f}",
        ),
        (
            "guest `openssl speed -evp` (16 KiB blocks), same run",
            f"{med['aes-128-gcm']:.0f} / {med['aes-256-gcm']:.0f} / "
            f"{med['chacha20-poly1305']:.0f} MB/s",
            f"AES-128-GCM / AES-256-GCM / ChaCha20-Poly1305, median of {rounds}; "
            f"AES-128-GCM in TLS-like records (`-aead`): {med['aead']:.0f} MB/s",
        ),
    ]
