"""What names a guest state: the options a guest boots with, their state key, a snapshot's handle.

:class:`VMConfig` decides which guest is booted, and :func:`boot_initrd`
is the initrd it boots (the image's base plus the per-boot payload).
:func:`state_key` digests everything that shapes a booted guest's RAM and
devices: two configs with equal keys boot into interchangeable states, so
the key names a cached ready-state snapshot (:mod:`pytest_gondolin.vm.warm`,
stored where :mod:`pytest_gondolin.vm.snapshot_paths` says). A
:class:`Snapshot` names one snapshot inside one VM: the VM's token and the
snapshot's tag, so it can only be restored into the VM it was taken of.
A disk-only checkpoint records the guest it was made of
(:func:`checkpoint_metadata`); :func:`resume_config` is the guest it
resumes into, which must boot the same image build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.hosttools import require as require_tool
from pytest_gondolin.image.store import Image, ensure_image
from pytest_gondolin.paths import cache_dir, writing_cache
from pytest_gondolin.vm.accel import choose_accel, qemu_version
from pytest_gondolin.vm.guest_ca import guest_ca
from pytest_gondolin.vm.payload import build_payload, combined_initrd
from pytest_gondolin.vm.qemu import MachineSpec, command_line

__all__ = [
    "BOOT_TIMEOUT",
    "Snapshot",
    "VMConfig",
    "boot_initrd",
    "checkpoint_metadata",
    "machine_spec",
    "resume_config",
    "state_key",
]

#: Cold boot is ~5 s under TCG here; 120 s (Gondolin's bound) covers a
#: loaded CI host running two guests on two cores.
BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class VMConfig:
    """The options that decide what guest is booted."""

    image: Image
    accel: str = "tcg"
    memory_mib: int = 256
    cpus: int = 1
    boot_timeout: float = BOOT_TIMEOUT
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    #: An externally served ``-netdev stream`` socket; overrides ``network``.
    net_socket: Path | None = None
    #: virtio-net's largest MTU: ~2x the download throughput of 1500 under
    #: TCG here (fewer frames per byte for the emulated guest and for the
    #: host's Python stack); the MSS both sides use follows from it.
    mtu: int = 65520
    #: Give the guest eth0 served by a NetworkDriver of its own (default policy:
    #: deny all egress; see :meth:`VM.configure_network`). The CA the guest
    #: trusts goes into the boot payload.
    network: bool = True
    #: QEMU gets SIGKILL when the launching thread's process dies (``setpriv
    #: --pdeathsig``). Off only for VMs that may be kept for debugging
    #: (``--gondolin-keep-vm``); the next run's reaper removes those.
    die_with_parent: bool = True
    #: The host environment's file-system image in the environment slot
    #: (``vm/qemu.py``; None: the slot reads zeros). Not part of
    #: :func:`state_key`: the base state is the same with or without it, and a
    #: layer that mounts it names it in its own key (``vm/layers.py``).
    environment_image: Path | None = None


@dataclass(frozen=True)
class Snapshot:
    """A full-VM snapshot (RAM, devices, disk) held inside one VM's overlay."""

    vm_token: str
    tag: str
    created: float


def boot_initrd(config: VMConfig) -> Path:
    """The initrd (image base + per-boot payload) a VM with ``config`` boots."""
    files = {**config.extra_files, "mtu": str(config.mtu).encode()}
    if config.network and config.net_socket is None and "ca.pem" not in files:
        files["ca.pem"] = guest_ca().ca_pem  # one CA per cache dir: stable payload
    boot = cache_dir() / "boot"
    with writing_cache("the guest's boot files must be written there"):
        return combined_initrd(config.image.initrd, build_payload(files), boot)


def state_key(config: VMConfig) -> str:
    """A digest of everything that shapes a booted guest's RAM and devices.

    Two VMs with equal keys boot into interchangeable states, so a saved
    ready-state snapshot of one can stand in for a cold boot of the other.
    """
    qemu = require_tool("qemu-system-x86_64")
    parts = {
        "image": config.image.build_id,
        "initrd": boot_initrd(config).name,
        "accel": config.accel,
        "memory": config.memory_mib,
        "cpus": config.cpus,
        "net": _has_network(config),
        "mtu": config.mtu,
        "qemu": qemu_version(qemu),
        "cmdline": command_line(
            machine_spec(
                dataclasses.replace(config, environment_image=None),
                qemu="q",
                kernel=Path("k"),
                initrd=Path("i"),
                disk=Path("d"),
                rundir=Path("r"),
                net_socket=Path("n") if _has_network(config) else None,
            )
        ),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def machine_spec(
    config: VMConfig,
    *,
    qemu: str,
    kernel: Path,
    initrd: Path,
    disk: Path,
    rundir: Path,
    net_socket: Path | None,
    loadvm: str | None = None,
) -> MachineSpec:
    """What QEMU runs for a VM with ``config``; :func:`state_key` digests its command line."""
    return MachineSpec(
        qemu=qemu,
        accel=config.accel,
        kernel=kernel,
        initrd=initrd,
        disk=disk,
        rundir=rundir,
        memory_mib=config.memory_mib,
        cpus=config.cpus,
        net_socket=net_socket,
        mtu=config.mtu,
        loadvm=loadvm,
        environment_image=config.environment_image,
    )


def _has_network(config: VMConfig) -> bool:
    """Whether the guest gets a NIC (an external socket, or a driver of its own)."""
    return config.net_socket is not None or config.network


def checkpoint_metadata(config: VMConfig) -> dict[str, object]:
    """What a checkpoint of a VM with ``config`` records: :func:`resume_config` reads it back."""
    return {
        "image_build_id": config.image.build_id,
        "image_name": config.image.name,
        "image_rootfs": str(config.image.rootfs),
        "memory_mib": config.memory_mib,
    }


def resume_config(
    path: Path,
    metadata: Mapping[str, object],
    config: VMConfig | None,
    *,
    memory: object = None,
    accel: str | None = None,
    image: str | None = None,
) -> VMConfig:
    """The config a resume of checkpoint ``path`` (with ``metadata``) boots.

    The base is ``config`` (the checkpointed VM's, when known), or with
    ``image`` or without ``config`` that image (default: the cached one)
    under ``auto`` acceleration and the recorded memory; ``memory`` and
    ``accel`` override. SnapshotError if its image build is not the one
    the checkpoint was made from.
    """
    # Here, not at the top: config imports pytest, which a VM used outside pytest never needs.
    from pytest_gondolin.config import parse_memory

    build_id = str(metadata.get("image_build_id"))
    if config is None or image is not None:
        img = ensure_image(image) if image is not None else ensure_image()
        config = VMConfig(
            image=img,
            accel=choose_accel(accel or "auto").name,
            memory_mib=int(str(metadata.get("memory_mib", 256))),
        )
    if config.image.build_id != build_id:
        raise SnapshotError(
            f"checkpoint {path} was made from image build {build_id}, "
            f"but the VM would use image build {config.image.build_id}"
        )
    if memory is not None:
        config = dataclasses.replace(config, memory_mib=parse_memory(memory, "resume(memory=...)"))
    if accel is not None:
        config = dataclasses.replace(config, accel=choose_accel(accel).name)
    return config
