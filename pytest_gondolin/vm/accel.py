"""What the host's QEMU is: its version, and the accelerator to use with it.

:func:`qemu_version` is the one probe of ``qemu-system-x86_64 --version``
(the warm-snapshot key and ``gondolin version`` both use it).

The accelerator: KVM when it really works, TCG otherwise.
``/dev/kvm`` existing is not enough: PVM (nested KVM without hardware
virtualization) exposes it, yet QEMU aborts on real CPU models ("failed to
set MSR 0x10a") and guests crawl. So ``auto`` picks KVM only after a
functional probe: no PVM module loaded, and a paused QEMU with ``-accel
kvm -cpu host`` starts and quits cleanly (~40 ms).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest_gondolin.hosttools as hosttools
from pytest_gondolin.errors import ConfigError, VMError

log = logging.getLogger(__name__)

ACCELS = ("auto", "kvm", "tcg")
#: The probe QEMU quits at once; 10 s only guards against a wedged host.
PROBE_TIMEOUT = 10.0
#: ``qemu-system-x86_64 --version`` answers at once; 10 s only guards against a wedged host.
VERSION_TIMEOUT = 10.0


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


@functools.cache
def qemu_version(qemu: str) -> str:
    """The first line of ``qemu --version`` (``"unknown"`` if it prints none), cached per binary.

    Raises VMError if ``qemu`` cannot be run or does not answer within
    :data:`VERSION_TIMEOUT`.
    """
    try:
        res = subprocess.run(
            [qemu, "--version"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=VERSION_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VMError(f"cannot run {qemu} --version: {exc}") from exc
    return res.stdout.splitlines()[0] if res.stdout.strip() else "unknown"


@functools.cache
def probe_kvm() -> str | None:
    """Return None if KVM works for our guests, else the reason it does not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    if Path("/sys/module/kvm_pvm").exists():
        return "/dev/kvm is PVM (nested KVM without hardware virtualization), which stock guest kernels cannot use"
    qemu = hosttools.require("qemu-system-x86_64")
    try:
        res = subprocess.run(
            [
                qemu,
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-nodefaults",
                "-machine",
                "q35",
                "-display",
                "none",
                "-m",
                "64",
                "-S",
                "-monitor",
                "stdio",
            ],
            input="quit\n",
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"KVM probe failed: {exc}"
    if res.returncode != 0 or "error" in res.stderr.lower():
        return f"KVM probe failed (exit {res.returncode}): {res.stderr.strip()[-300:]}"
    return None


def choose_accel(requested: str) -> AccelChoice:
    """Resolve ``auto|kvm|tcg``; ``kvm`` fails loudly if KVM does not work."""
    if requested not in ACCELS:
        raise ConfigError(f"accel must be one of {', '.join(ACCELS)}, got {requested!r}")
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    problem = probe_kvm()
    if problem is None:
        return AccelChoice("kvm", "probe passed")
    if requested == "kvm":
        raise VMError(f"--gondolin-accel=kvm was requested but KVM is unusable: {problem}")
    return AccelChoice("tcg", problem)
