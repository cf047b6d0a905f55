"""Host tool discovery, the QEMU version probe and the accelerator choice (the KVM probe runs for real)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_gondolin import hosttools
from pytest_gondolin.errors import ConfigError, HostToolMissing, VMError
from pytest_gondolin.vm import accel


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HostToolMissing, match=r"'qemu-img' .*apt-get install qemu-utils") as info:
        hosttools.require("qemu-img")
    assert info.value.package == "qemu-utils"
    with pytest.raises(HostToolMissing, match="apt-get install qemu-system-x86"):
        hosttools.require("qemu-system-x86_64")


def test_found_tool_is_an_absolute_path() -> None:
    assert hosttools.require("qemu-img").startswith("/")


def test_accel_choice_follows_the_functional_probe() -> None:
    accel.probe_kvm.cache_clear()
    problem = accel.probe_kvm()
    assert accel.choose_accel("tcg").name == "tcg"
    if problem is None:
        assert accel.choose_accel("auto").name == "kvm"
        assert accel.choose_accel("kvm").name == "kvm"
    else:
        choice = accel.choose_accel("auto")
        assert choice.name == "tcg" and choice.reason == problem
        with pytest.raises(VMError, match="KVM is unusable"):
            accel.choose_accel("kvm")


def test_unknown_accel_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'hvf'"):
        accel.choose_accel("hvf")


def test_qemu_version_is_the_first_line_and_cached(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    calls = tmp_path / "calls"
    fake.write_text(
        f'#!/bin/sh\necho x >> {calls}\necho "QEMU emulator version 9.9.9"\necho "(c) QEMU"\n'
    )
    fake.chmod(0o755)
    assert accel.qemu_version(str(fake)) == "QEMU emulator version 9.9.9"
    assert accel.qemu_version(str(fake)) == "QEMU emulator version 9.9.9"
    assert calls.read_text() == "x\n"  # probed once per binary


def test_qemu_version_failures(tmp_path: Path) -> None:
    silent = tmp_path / "silent-qemu"
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    assert accel.qemu_version(str(silent)) == "unknown"
    with pytest.raises(VMError, match="cannot run"):
        accel.qemu_version(str(tmp_path / "missing-qemu"))


def test_qemu_version_of_the_real_qemu() -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    assert accel.qemu_version(qemu).startswith("QEMU emulator version")
