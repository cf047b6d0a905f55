"""HTTPS throughput through the mediation, side by side with plain HTTP and the guest's own crypto.

One VM, one run: the guest downloads a large body over plain HTTP and
over HTTPS (the MITM terminates TLS with the guest), and runs
``openssl speed`` for the AEADs a TLS client may pick. The guest's own
AES-GCM speed is the ceiling for HTTPS under TCG; the rows report the
HTTPS figure as a fraction of it. Each figure is the median of
``rounds`` interleaved repetitions, because this machine is shared.

Wall-clock speeds move with the host's load (other QEMUs steal the CPU the
emulated guest runs on), and so do the guest's own ``time`` figures (its
clock keeps running while QEMU waits for a core). The CPU seconds the QEMU
process itself spends (``/proc/<pid>/stat``) count only emulated work, so
the breakdown row uses them: what a download costs the emulated machine,
over plain HTTP, over HTTPS, and what AES-128-GCM alone costs it
(``openssl speed``'s bytes per QEMU CPU second).
"""

from __future__ import annotations

import os
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
    qemu_cpu: float = 0.0  # CPU seconds the QEMU process spent meanwhile


def _qemu_cpu(vm: VM) -> float:
    """CPU seconds (user + system, all threads) the VM's QEMU process has used."""
    if vm.pid is None:
        raise RuntimeError(f"{vm.name} has no QEMU process")
    with open(f"/proc/{vm.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _download(vm: VM, url: str) -> Download:
    before = _qemu_cpu(vm)
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
    qemu_cpu = _qemu_cpu(vm) - before
    lines = r.stdout.splitlines()
    if len(lines) < 2:
        raise RuntimeError(f"unexpected output from the guest's curl: {r.stdout!r} {r.stderr!r}")
    user, sys_ = (float(x) for x in lines[1].split())
    cipher = lines[2].removeprefix("SSL connection using ") if len(lines) > 2 else ""
    return Download(float(lines[0]) / 1e6, cipher, user, sys_, qemu_cpu)


@dataclass(frozen=True)
class Speed:
    """One ``openssl speed`` run: MB/s as it reports it, MB per QEMU CPU second."""

    mbps: float
    per_qemu_cpu: float


def _openssl_speed(vm: VM, cipher: str, *, aead: bool = False) -> Speed:
    """The guest's ``openssl speed -evp`` figure for 16 KiB blocks, in MB/s.

    ``aead``: OpenSSL's ``-aead`` mode, a TLS-like sequence (new IV and
    AAD per 16 KiB block, as per TLS record), instead of one long stream.
    ``openssl speed`` divides by the guest's user time; the second figure
    divides the same bytes by the CPU seconds QEMU spent instead.
    """
    flag = "-aead " if aead else ""
    before = _qemu_cpu(vm)
    # -mr prints "+R:<blocks>:<name>:<user seconds>" on stderr.
    r = vm.exec(
        f"openssl speed -mr -seconds 2 -bytes 16384 {flag}-evp {cipher} 2>&1 | grep '^+R:'",
        timeout=300,
        check=True,
    )
    qemu_cpu = _qemu_cpu(vm) - before
    fields = r.stdout.strip().split(":")
    try:
        blocks, seconds = int(fields[1]), float(fields[3])
    except (IndexError, ValueError):
        raise RuntimeError(f"unexpected openssl speed output for {cipher}: {r.stdout!r}") from None
    mb = blocks * 16384 / 1e6
    return Speed(mb / max(seconds, 1e-3), mb / max(qemu_cpu, 1e-3))


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
    keys = (
        "http",
        "https",
        "http-cpu",
        "https-user",
        "https-sys",
        "http-qemu",
        "https-qemu",
        "aes-qemu",
        "aead",
        *CIPHERS,
    )
    samples: dict[str, list[float]] = {k: [] for k in keys}
    negotiated = set()
    load = os.getloadavg()[0]  # a shared host: say how busy it was
    vm = launch_clean(config, name="bench-https")
    try:
        vm.configure_network(policy)
        for _ in range(rounds):
            plain_dl = _download(vm, "http://api.test/big")
            samples["http"].append(plain_dl.mbps)
            samples["http-cpu"].append(plain_dl.user + plain_dl.sys)
            samples["http-qemu"].append(plain_dl.qemu_cpu)
            tls_dl = _download(vm, "https://api.test/big")
            samples["https"].append(tls_dl.mbps)
            samples["https-user"].append(tls_dl.user)
            samples["https-sys"].append(tls_dl.sys)
            samples["https-qemu"].append(tls_dl.qemu_cpu)
            negotiated.add(tls_dl.cipher)
            for name in CIPHERS:
                speed = _openssl_speed(vm, name)
                samples[name].append(speed.mbps)
                if name == "aes-128-gcm":
                    samples["aes-qemu"].append(speed.per_qemu_cpu)
            samples["aead"].append(_openssl_speed(vm, "aes-128-gcm", aead=True).mbps)
    finally:
        vm.close()
        for server in (plain, tls):
            server.shutdown()
            server.server_close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    size = f"{BIG // (1024 * 1024)} MB"
    aes_cost = BIG / 1e6 / med["aes-qemu"]
    rest = med["https-qemu"] - med["http-qemu"] - aes_cost
    raw = "; ".join(f"{k}: " + ", ".join(f"{x:.0f}" for x in v) for k, v in samples.items())
    print(f"https bench samples (MB/s): {raw}; negotiated: {sorted(negotiated)}")
    return [
        (
            f"{size} download through the mediation, HTTPS (curl, MITM TLS)",
            f"{med['https']:.0f} MB/s",
            f"median of {rounds} (host load {load:.1f} at the start); "
            f"negotiated {', '.join(sorted(negotiated))}; "
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
        (
            f"where an HTTPS {size} download's time goes (QEMU CPU seconds, same run)",
            f"{med['https-qemu']:.2f} s vs {med['http-qemu']:.2f} s plain",
            f"median of {rounds}; HTTPS = transport as for plain HTTP {med['http-qemu']:.2f} s "
            f"+ AES-128-GCM decryption {aes_cost:.2f} s (the guest's `openssl speed`, "
            f"{med['aes-qemu']:.0f} MB per QEMU CPU second) + the rest {rest:.2f} s "
            "(record reads, copies); the one vCPU does all three in turn",
        ),
    ]
