"""Building QEMU command lines (pure: no processes, no files touched).

Least privilege, because the guest is hostile and QEMU is the code it
attacks first:

* ``-sandbox`` (:data:`SANDBOX`): QEMU's seccomp filter, with obsolete
  system calls, set*uid/gid, fork/exec and resource-control calls denied.
  Nothing here needs them: snapshots are internal (``savevm``/``loadvm``)
  and clones copy a qcow2 file; only an ``exec:`` migration URI would
  spawn a process, and :func:`command_line` then allows ``spawn`` alone.
* No device the guest does not use: ``-nodefaults``, no user config, q35
  without SMM, VMware port, SATA, USB, PS/2 (``i8042``), SMBus or
  graphics; virtio for disk, console channel, entropy and network only.
  Entropy comes from ``rng-builtin`` (QEMU's own getrandom()), so QEMU
  holds no host device file open for it.
* Host files: the kernel and initrd (read at start), the image's root disk
  (a read-only backing file), the VM's own overlay, console log and
  sockets in its runtime folder, and the host environment's image
  (read-only, in the environment slot below). :func:`privilege_drop_args`
  empties the capability sets when QEMU would otherwise start with root's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT_NAME = "org.gondolin.agent"

#: The environment slot: a read-only virtio disk every VM has, so that a
#: snapshot saved with the host environment's file-system image in it loads
#: in a VM of the same device set (``sandbox/environment_image.py``). Without
#: an image it reads zeros (``null-co``); with one it is that raw file,
#: sparse-truncated to this size, so the capacity the guest saw at boot never
#: changes. ``savevm``/``loadvm`` skip read-only drives, so it needs no
#: snapshot support (checked with QEMU 7.2, either backend in the slot).
ENV_SLOT_BYTES = 64 * 2**30
#: The slot's virtio serial number (``/sys/block/vdX/serial`` in the guest).
ENV_SLOT_SERIAL = "gondolin-env"
#: A fixed PCI address: the device set, not the order of options, places it.
ENV_SLOT_ADDR = "0x10"

#: Kernel command line. ``quiet``: under TCG every console byte is emulated
#: UART work; ``panic=-1`` + ``-no-reboot``: a guest panic ends QEMU at once;
#: ``tsc=reliable``/``no_timer_check``: skip calibration loops that are
#: slow under emulation; ``8250.nr_uarts=1``: probe one serial port only.
#: ``init_on_free=1``: freed pages are zeroed, so a snapshot stores (and a
#: restore loads) only memory in use: 75 instead of 104 MiB here, ~25 ms
#: less per restore; freed guest memory also holds no stale data.
KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1",
    "tsc=reliable",
    "no_timer_check",
    "8250.nr_uarts=1",
    "mitigations=off",
    "random.trust_cpu=on",
    "rootfstype=ext4",
    "init_on_free=1",
)


#: QEMU's seccomp filter (``qemu-system-x86_64 -help``: ``-sandbox``), on
#: since QEMU 2.11 with these sub-options.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: q35 without the parts a virtio-only guest never touches (each is one
#: less emulated device for a guest to attack, and less to probe at boot).
MACHINE = "q35,smm=off,vmport=off,sata=off,usb=off,i8042=off,smbus=off,graphics=off"


def privilege_drop_args(euid: int) -> list[str]:
    """``setpriv`` options that start QEMU without capabilities when we run as root.

    As root, QEMU would otherwise hold every capability (raw sockets,
    mounting, loading modules, ptrace ...) although it needs none. For
    other users the sets are already empty and changing the bounding set
    needs a capability they lack, so nothing is added. ``no_new_privs``
    keeps an exec'd helper from regaining privileges.
    """
    if euid != 0:
        return []
    return ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"]


@dataclass(frozen=True)
class MachineSpec:
    """Everything that decides a QEMU command line."""

    qemu: str
    accel: str  # "kvm" | "tcg"
    kernel: Path
    initrd: Path
    disk: Path
    rundir: Path
    memory_mib: int = 256
    cpus: int = 1
    net_socket: Path | None = None
    mac: str = "52:54:00:12:34:56"
    mtu: int = 1500
    incoming: str | None = None
    loadvm: str | None = None
    extra_kernel_args: tuple[str, ...] = field(default_factory=tuple)
    #: QEMU's seccomp filter (:data:`SANDBOX`); off only for debugging.
    sandbox: bool = True
    #: A raw file-system image of :data:`ENV_SLOT_BYTES` for the environment
    #: slot (None: the slot reads zeros).
    environment_image: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.rundir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.rundir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"


def env_slot_blockdev(image: Path | None) -> str:
    """The ``-blockdev`` of the environment slot: zeros, or ``image`` read-only."""
    if image is None:
        return f"driver=null-co,node-name=envslot,size={ENV_SLOT_BYTES},read-zeroes=on,read-only=on"
    if "," in str(image):
        raise ValueError(
            f"environment image path {str(image)!r} has a comma (QEMU's option separator)"
        )
    return (
        "driver=raw,node-name=envslot,read-only=on,"
        f"file.driver=file,file.filename={image},file.read-only=on"
    )


def command_line(spec: MachineSpec) -> list[str]:
    """Return the argv that starts ``spec``."""
    if spec.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        # One TCG thread per vCPU; a large translation cache avoids retranslation.
        accel = ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
    argv = [
        spec.qemu,
        "-name",
        f"gondolin,process=gondolin-{spec.rundir.name}",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-machine",
        MACHINE,
        *accel,
        "-m",
        f"{spec.memory_mib}M",
        "-smp",
        str(spec.cpus),
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        " ".join((*KERNEL_ARGS, *spec.extra_kernel_args)),
        "-chardev",
        f"file,id=console,path={spec.console_log}",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{spec.qmp_socket},server=on,wait=off",
        "-chardev",
        f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-drive",
        f"file={spec.disk},if=none,id=root,format=qcow2,node-name=rootdisk,discard=unmap,cache=unsafe",
        "-device",
        "virtio-blk-pci,drive=root",
        "-blockdev",
        env_slot_blockdev(spec.environment_image),
        "-device",
        f"virtio-blk-pci,drive=envslot,serial={ENV_SLOT_SERIAL},addr={ENV_SLOT_ADDR}",
        "-object",
        "rng-builtin,id=rng0",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]
    if spec.net_socket is not None:
        argv += [
            "-netdev",
            f"stream,id=net0,server=off,addr.type=unix,addr.path={spec.net_socket}",
            "-device",
            # romfile=: no iPXE option ROM; we boot the kernel directly, and
            # loading and probing the ROM costs boot time under TCG.
            # guest_announce=off: after every restore the guest would
            # otherwise be asked to announce itself (gratuitous ARP, netlink
            # events), kernel work on the restore's critical path.
            f"virtio-net-pci,netdev=net0,mac={spec.mac},host_mtu={spec.mtu},romfile=,guest_announce=off",
        ]
    if spec.sandbox:
        sandbox = SANDBOX
        if spec.incoming is not None and spec.incoming.startswith("exec:"):
            sandbox = sandbox.replace("spawn=deny", "spawn=allow")  # exec: forks a shell
        argv += ["-sandbox", sandbox]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    if spec.loadvm is not None:
        argv += ["-loadvm", spec.loadvm]
    return argv
