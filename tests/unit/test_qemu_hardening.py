"""QEMU least privilege: seccomp sandbox, minimal devices, no stray host files, no capabilities.

Command-line properties are checked on :func:`command_line` directly; one
test asks the installed QEMU whether it accepts the exact sandbox and
machine options (and, as the negative control, rejects a misspelt one).
That a real guest boots, snapshots and restores under them is in
``tests/integration/test_faults.py::test_qemu_runs_confined``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_gondolin.vm import qemu_process
from pytest_gondolin.vm.qemu import (
    MACHINE,
    SANDBOX,
    MachineSpec,
    command_line,
    privilege_drop_args,
)

RUNDIR = Path("/run/gondolin-test/vm1")


def _spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        qemu="qemu-system-x86_64",
        accel="tcg",
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/cache/boot/initrd.img"),
        disk=RUNDIR / "disk.qcow2",
        rundir=RUNDIR,
        net_socket=RUNDIR / "net.sock",
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_sandbox_denies_everything_qemu_does_not_need() -> None:
    argv = command_line(_spec())
    (sandbox,) = _values(argv, "-sandbox")
    options = dict(part.partition("=")[::2] for part in sandbox.split(",")[1:])
    assert sandbox.startswith("on,")
    assert options == {
        "obsolete": "deny",
        "elevateprivileges": "deny",
        "spawn": "deny",
        "resourcecontrol": "deny",
    }


@pytest.mark.parametrize(
    ("incoming", "spawn"),
    [(None, "deny"), ("defer", "deny"), ("unix:/run/x/mig.sock", "deny"), ("exec:cat f", "allow")],
)
def test_only_an_exec_migration_may_spawn(incoming: str | None, spawn: str) -> None:
    argv = command_line(_spec(incoming=incoming))
    (sandbox,) = _values(argv, "-sandbox")
    assert f"spawn={spawn}" in sandbox
    assert "elevateprivileges=deny" in sandbox  # never relaxed


def test_sandbox_can_be_switched_off_for_debugging() -> None:
    assert "-sandbox" not in command_line(_spec(sandbox=False))


def test_snapshot_options_keep_the_sandbox() -> None:
    argv = command_line(_spec(loadvm="gondolin-clean"))
    assert _values(argv, "-loadvm") == ["gondolin-clean"]
    assert _values(argv, "-sandbox") == [SANDBOX]


#: The devices a guest gets: virtio only, each with a job.
ALLOWED_DEVICES = {
    "virtio-serial-pci",  # the agent channel
    "virtserialport",
    "virtio-blk-pci",  # the root disk
    "virtio-rng-pci",  # entropy
    "virtio-net-pci",  # the mediated network
}


@pytest.mark.parametrize("net", [True, False])
def test_only_virtio_devices_and_no_defaults(net: bool) -> None:
    argv = command_line(_spec(net_socket=RUNDIR / "net.sock" if net else None))
    devices = {d.split(",", 1)[0] for d in _values(argv, "-device")}
    assert devices == ALLOWED_DEVICES - (set() if net else {"virtio-net-pci"})
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    for unwanted in ("-usb", "-usbdevice", "-vga", "-soundhw", "-audiodev", "-spice", "-vnc"):
        assert unwanted not in argv
    (machine_opt,) = _values(argv, "-machine")
    assert machine_opt == MACHINE
    switches = dict(p.partition("=")[::2] for p in machine_opt.split(",")[1:])
    for off in ("smm", "vmport", "sata", "usb", "i8042", "smbus", "graphics"):
        assert switches[off] == "off", off


def test_entropy_comes_from_qemu_itself_not_a_host_device() -> None:
    objects = _values(command_line(_spec()), "-object")
    assert objects == ["rng-builtin,id=rng0"]
    assert not any("filename=" in o or "/dev/" in o for o in objects)


def test_host_paths_are_only_the_vm_s_own() -> None:
    """Every host path QEMU is given is its kernel, initrd, or inside its runtime folder."""
    spec = _spec(loadvm="t")
    argv = command_line(spec)
    allowed = (str(spec.kernel), str(spec.initrd), str(RUNDIR) + "/")
    paths = [
        token
        for arg in argv[1:]
        for part in arg.replace(",", " ").replace("=", " ").replace(":", " ").split()
        if (token := part).startswith("/")
    ]
    assert paths, "the scan found no paths at all"
    strays = [p for p in paths if not p.startswith(allowed)]
    assert strays == []
    # Negative control: the scan does see a path outside those places.
    leaky = command_line(_spec(disk=Path("/etc/shadow")))
    assert any(
        "/etc/shadow" in part
        for arg in leaky
        for part in arg.replace(",", " ").replace("=", " ").split()
    )


def test_root_drops_every_capability() -> None:
    assert privilege_drop_args(0) == [
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]
    assert privilege_drop_args(1000) == []


@pytest.mark.parametrize(
    ("euid", "die_with_parent", "expected"),
    [
        (1000, True, ["/bin/setpriv", "--pdeathsig", "KILL", "--"]),
        (1000, False, []),
        (0, False, ["/bin/setpriv", *privilege_drop_args(0), "--"]),
        (0, True, ["/bin/setpriv", "--pdeathsig", "KILL", *privilege_drop_args(0), "--"]),
    ],
)
def test_setpriv_prefix(
    monkeypatch: pytest.MonkeyPatch, euid: int, die_with_parent: bool, expected: list[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert qemu_process.setpriv_prefix(die_with_parent) == expected


def test_setpriv_missing_means_no_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert qemu_process.setpriv_prefix(True) == []


def _qemu_accepts(sandbox: str, machine_opt: str) -> subprocess.CompletedProcess[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    # -S: no guest code runs; QMP on stdio quits at once after the options were applied.
    return subprocess.run(
        [
            qemu,
            "-sandbox",
            sandbox,
            "-machine",
            machine_opt,
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_installed_qemu_accepts_the_hardening_options() -> None:
    ok = _qemu_accepts(SANDBOX, MACHINE)
    assert ok.returncode == 0, ok.stderr
    # Negative control: a misspelt sub-option is an error, so acceptance means something.
    bad = _qemu_accepts(SANDBOX + ",spawns=deny", MACHINE)
    assert bad.returncode != 0 and "spawns" in bad.stderr
