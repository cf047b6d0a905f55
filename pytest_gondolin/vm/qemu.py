"""Building QEMU command lines (pure: no processes, no files touched)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT_NAME = "org.gondolin.agent"

#: Kernel command line. ``quiet``: under TCG every console byte is emulated
#: UART work; ``panic=-1`` + ``-no-reboot``: a guest panic ends QEMU at once;
#: ``tsc=reliable``/``no_timer_check``: skip calibration loops that are
#: slow under emulation; ``8250.nr_uarts=1``: probe one serial port only.
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
)


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

    @property
    def qmp_socket(self) -> Path:
        return self.rundir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.rundir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.rundir / "console.log"


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
        "q35,smm=off,vmport=off,sata=off,usb=off",
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
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
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
            f"virtio-net-pci,netdev=net0,mac={spec.mac},host_mtu={spec.mtu},romfile=",
        ]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    if spec.loadvm is not None:
        argv += ["-loadvm", spec.loadvm]
    return argv
