"""Guest system setup done in-process by PID 1 before it becomes the agent.

Runs inside the guest (stdlib only). Under TCG every fork+exec costs
~40 ms, so mounting, naming the host and configuring the network with
``mount``/``ip`` commands cost over a second of boot; the same work through
``mount(2)`` and ``ioctl(2)`` costs milliseconds.

``python3 -m pytest_gondolin.guest.sysinit [agent args...]`` sets the guest
up, then runs the agent's ``main`` in this same process (PID 1).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

GUEST_ADDR = "192.168.127.3"
GATEWAY_ADDR = "192.168.127.1"
NETMASK = "255.255.255.0"
PAYLOAD_DIR = "/run/gondolin"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000

# linux/sockios.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2

#: (fstype, target, mode, flags): Gondolin's tmpfs set plus devpts and shm.
MOUNTS = (
    ("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666", MS_NOSUID),
    ("tmpfs", "/dev/shm", "mode=1777", MS_NOSUID | MS_NODEV),
    ("tmpfs", "/tmp", "mode=1777", MS_NOSUID | MS_NODEV),
    ("tmpfs", "/root", "mode=0700", 0),
    ("tmpfs", "/var/tmp", "mode=1777", 0),
    ("tmpfs", "/var/cache", "mode=0755", 0),
    ("tmpfs", "/var/log", "mode=0755", 0),
)

# By soname, not ctypes.util.find_library: that imports subprocess and
# shutil (~170 ms of boot under TCG). The guest is glibc-based Debian.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _log(msg: str) -> None:
    sys.stderr.write(f"gondolin-sysinit: {msg}\n")


def mount(
    source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    if not os.path.exists(target):  # a bind mount may target a file (the CA bundle)
        os.makedirs(target, exist_ok=True)
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def _ifreq_addr(name: str, addr: str) -> bytes:
    sockaddr = struct.pack("<HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))
    return struct.pack("16s16s", name.encode(), sockaddr)


def _set_up(sock: socket.socket, name: str) -> None:
    req = struct.pack("16sh22x", name.encode(), 0)
    flags = struct.unpack("16sh22x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh22x", name.encode(), flags | IFF_UP))


def _disable_ipv6(name: str) -> None:
    # The host drops all IPv6 (netpolicy/stack/network.py); without this the kernel
    # would keep sending router solicitations, DAD and MLD reports, and that
    # background work would replay after every snapshot restore.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as fh:
            fh.write("1")
    except OSError as exc:
        _log(f"disable_ipv6 on {name}: {exc}")


def _add_default_route(sock: socket.socket, gateway: str) -> None:
    def sin(addr: str) -> bytes:
        return struct.pack("<HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))

    # struct rtentry (x86_64): ulong pad; sockaddr dst, gateway, genmask; ushort flags;
    # short pad; ulong pad; void* tos/class pad; short metric; char* dev; ulong mtu, window; ushort irtt.
    rtentry = struct.pack(
        "L16s16s16sHhLPhPLLH",
        0,
        sin("0.0.0.0"),
        sin(gateway),
        sin("0.0.0.0"),
        RTF_UP | RTF_GATEWAY,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    fcntl.ioctl(sock, SIOCADDRT, rtentry.ljust(120, b"\0"))


def configure_network(mtu: int) -> None:
    """Bring up lo, and eth0 (if present) as GUEST_ADDR/24 with the host as default gateway."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_up(sock, "lo")
        if not os.path.exists("/sys/class/net/eth0"):
            return
        _disable_ipv6("eth0")
        fcntl.ioctl(sock, SIOCSIFMTU, struct.pack("16si12x", b"eth0", mtu))
        fcntl.ioctl(sock, SIOCSIFADDR, _ifreq_addr("eth0", GUEST_ADDR))
        fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq_addr("eth0", NETMASK))
        _set_up(sock, "eth0")
        _add_default_route(sock, GATEWAY_ADDR)


def install_ca() -> None:
    """Trust the host's interception CA: system bundle (bind mount) and the usual env vars."""
    ca = os.path.join(PAYLOAD_DIR, "ca.pem")
    if os.path.exists(ca) and os.path.getsize(ca) > 0:
        merged = os.path.join(PAYLOAD_DIR, "ca-bundle.crt")
        with open(merged, "wb") as out:
            with open(CA_BUNDLE, "rb") as system:
                out.write(system.read())
            with open(ca, "rb") as extra:
                out.write(b"\n" + extra.read())
        mount(merged, CA_BUNDLE, None, MS_BIND)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        os.environ[var] = CA_BUNDLE


def setup() -> None:
    """Everything stage-2 init does; failures are logged, never fatal (the agent reports state)."""
    for fstype, target, data, flags in MOUNTS:
        try:
            mount(fstype, target, fstype, flags, data)
        except OSError as exc:
            _log(str(exc))
    try:
        socket.sethostname("gondolin")
    except OSError as exc:
        _log(f"sethostname: {exc}")
    try:
        with open(os.path.join(PAYLOAD_DIR, "mtu")) as fh:
            mtu = int(fh.read().strip() or 1500)
    except (OSError, ValueError):
        mtu = 1500
    try:
        configure_network(mtu)
    except OSError as exc:
        _log(f"network: {exc}")
    try:
        install_ca()
    except OSError as exc:
        _log(f"CA: {exc}")
    os.environ.update({"HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"})
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def _uptime() -> str:
    try:
        with open("/proc/uptime") as fh:
            return fh.read().split()[0]
    except OSError:
        return "?"


def main(argv: list[str]) -> int:
    _log(f"python started at {_uptime()} s")
    setup()
    _log(f"system set up at {_uptime()} s; starting the agent")
    from pytest_gondolin.guest import agent

    result = agent.main(argv)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
