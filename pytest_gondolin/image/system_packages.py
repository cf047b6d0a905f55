"""Extra Debian packages without a new image: a cached layer over the image's ready state.

``--gondolin-system-packages=less,git`` (ini ``gondolin_system_packages``,
env ``GONDOLIN_SYSTEM_PACKAGES``) gives every VM of the session — sandboxed
tests, ``vm``, ``session_vm``, ``vm_factory`` — those packages, through
:func:`system_packages_layer`, a :class:`~pytest_gondolin.vm.layers.Layer`
keyed by the image build and the sorted package set: built once, cached as
a layered ready snapshot, safe under concurrent builders.

How: the guest's own ``apt-get`` installs them, its network mediated by the
host with a policy that allows only the hosts of the Debian archive the
image was built from (read from the guest's apt sources, which mmdebstrap
wrote at build time). apt verifies the archive's signatures with the
image's keyring and resolves dependencies as Debian does. Doing it in the
guest, rather than downloading ``.deb`` files on the host, needs nothing of
the host but the network: it works the same on a macOS host without apt or
dpkg. The package lists and downloaded archives are removed before the
layer is saved, so the layer holds only the installed files.

Errors: a package apt cannot find is a :class:`ConfigError` quoting apt
(``E: Unable to locate package ...``) and naming the package; any other
failure (a post-install script, the archive unreachable) is one
:class:`ImageError` with the tail of apt's output. Either way nothing is
cached (:func:`~pytest_gondolin.vm.layers.launch_layered`).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

from pytest_gondolin.errors import ConfigError, ImageError
from pytest_gondolin.image.store import Image
from pytest_gondolin.logtail import tail_lines
from pytest_gondolin.vm.layers import Layer
from pytest_gondolin.vm.machine import VM

__all__ = ["APT_TIMEOUT", "LAYER_NAME", "apt_error", "archive_hosts", "system_packages_layer"]

LAYER_NAME: Final = "system-packages"
#: ``apt-get update`` plus a few packages take ~50 s under TCG here (the
#: package index is ~9 MB); an hour covers big sets on a loaded CI host.
APT_TIMEOUT: Final = 3600.0
#: Lines of apt's output quoted in an error.
ERROR_TAIL_LINES: Final = 25
#: apt's output searched and quoted: its errors come last.
MAX_QUOTED_BYTES: Final = 64 * 1024
#: The guest's apt sources (mmdebstrap writes the one-line format).
SOURCES: Final = ("/etc/apt/sources.list", "/etc/apt/sources.list.d/*.list")
#: Bumped when the way the layer is built changes what it holds.
_FORMAT: Final = "1"

_UNKNOWN_RE = re.compile(r"^E: (?:Unable to locate package|Package '?)\s*([a-z0-9][a-z0-9+.-]*)")
_APT_ENV: Final = "DEBIAN_FRONTEND=noninteractive"
_APT_OPTS: Final = "-q -o Acquire::Languages=none -o Dpkg::Use-Pty=0 -o APT::Color=0"


def system_packages_layer(image: Image, packages: Sequence[str]) -> Layer:
    """The layer that installs ``packages`` (validated Debian names) over ``image``."""
    names = tuple(sorted(set(packages)))
    key = hashlib.sha256("\n".join([_FORMAT, image.build_id, *names]).encode()).hexdigest()[:24]

    def apply(vm: VM) -> None:
        install(vm, names)

    return Layer(LAYER_NAME, key, apply)


def archive_hosts(sources: str) -> list[str]:
    """``host[:port]`` of each http(s) archive in apt sources text (one-line and deb822 formats)."""
    hosts: list[str] = []
    for raw in sources.splitlines():
        words = raw.split("#", 1)[0].split()
        if words[:1] == ["deb"] or words[:1] == ["deb-src"]:
            urls = [w for w in words[1:] if "://" in w][:1]
        elif words[:1] == ["URIs:"]:
            urls = words[1:]
        else:
            continue
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                continue
            host = parts.hostname + (f":{parts.port}" if parts.port else "")
            if host not in hosts:
                hosts.append(host)
    return hosts


def install(vm: VM, packages: Sequence[str]) -> None:
    """Install ``packages`` with the guest's apt through an archive-only network policy."""
    # Here: the network policy pulls in the HTTP stack, which a run without
    # system packages never needs.
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy

    sources = vm.exec(["sh", "-c", "cat " + " ".join(SOURCES) + " 2>/dev/null"]).stdout
    hosts = archive_hosts(sources[:65536])
    if not hosts:
        raise ImageError(
            f"cannot install system packages {', '.join(packages)}: the image "
            f"{vm.config.image.name}-{vm.config.image.build_id} names no http(s) Debian archive "
            f"in {SOURCES[0]}"
        )
    vm.configure_network(NetworkPolicy.from_options(allow_hosts=hosts))
    try:
        _apt(vm, f"apt-get {_APT_OPTS} update", packages, "apt-get update")
        quoted = " ".join(shlex.quote(p) for p in packages)
        _apt(
            vm,
            f"{_APT_ENV} apt-get {_APT_OPTS} install -y --no-install-recommends {quoted}",
            packages,
            "apt-get install",
        )
        # The lists (~80 MiB) on the disk, the archives and apt's caches in the
        # guest's /var/cache (a tmpfs: they would be RAM in the snapshot).
        vm.exec(
            ["sh", "-c", "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*"],
            check=True,
        )
    finally:
        vm.configure_network()  # back to deny-all before the state is saved


def _apt(vm: VM, command: str, packages: Sequence[str], what: str) -> None:
    result = vm.exec(["sh", "-c", command + " 2>&1"], timeout=APT_TIMEOUT)
    if result.returncode != 0:
        raise apt_error(result.stdout, result.returncode, packages, what, vm.config.image.name)


def apt_error(
    output: str, returncode: int, packages: Sequence[str], what: str, image: str
) -> ConfigError | ImageError:
    """The error for an apt command that exited ``returncode`` with ``output`` (guest bytes: quoted, bounded).

    A package apt cannot find is the user's: ConfigError naming it and
    quoting apt. Anything else (a post-install script, the archive) is one
    ImageError with the tail of apt's output.
    """
    output = output[-MAX_QUOTED_BYTES:]
    for line in output.splitlines():
        match = _UNKNOWN_RE.match(line.strip())
        if match is not None:
            return ConfigError(
                f"system package {match.group(1)!r} (gondolin_system_packages) cannot be "
                f"installed in image {image}: {line.strip()[:300]}"
            )
    return ImageError(
        f"installing system packages {', '.join(packages)} in the guest failed "
        f"({what} exited {returncode}); nothing was cached:\n"
        + tail_lines(output, ERROR_TAIL_LINES)
    )
