"""Reading what an ELF object needs, on the host's own interpreter files and patched copies."""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.sandbox import elf_checks
from pytest_gondolin.sandbox.elf_checks import ElfNeeds, ElfReadError, read_elf, why_not_runnable

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ELF hosts only")

MACHINE = elf_checks.MACHINES.get(platform.machine(), "?")
BINARY = os.path.realpath(sys.executable)
DYNLOAD = Path(sysconfig.get_config_var("DESTSHARED") or "")


def _module(name: str) -> Path:
    """The host's extension module ``name`` (``zlib``, ``_json``) from lib-dynload."""
    found = sorted(DYNLOAD.glob(f"{name}.*.so"))
    if not found:
        pytest.skip(f"{name} is built into this interpreter")
    return found[0]


def _patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy of ``src`` with the first NUL-terminated ``old`` string replaced (same length)."""
    assert len(old) == len(new)
    data = src.read_bytes()
    at = data.find(old + b"\0")
    assert at > 0, f"{old!r} not in {src}"
    dst.write_bytes(data[:at] + new + data[at + len(old) :])
    return dst


def _newest_glibc_string(path: Path) -> bytes:
    names = re.findall(rb"GLIBC_2\.[0-9.]+(?=\0)", path.read_bytes())
    assert names, f"{path} needs no GLIBC symbol version"
    return max(names, key=lambda n: elf_checks.glibc_version(n.decode()) or (0, 0))


def test_the_host_binary_needs_libc_and_a_glibc_version() -> None:
    needs = read_elf(BINARY)
    assert needs.machine == MACHINE
    assert "libc.so.6" in needs.needed
    assert needs.glibc is not None and needs.glibc >= (2, 2)
    assert needs.glibc <= tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2])


def test_an_extension_module_lists_its_libraries_and_run_path() -> None:
    needs = read_elf(str(_module("zlib")))
    assert "libz.so.1" in needs.needed
    assert all(os.path.isabs(folder) for folder in needs.runpath)


def test_a_patched_glibc_need_is_read(tmp_path: Path) -> None:
    src = _module("zlib")
    old = _newest_glibc_string(src)
    new = b"GLIBC_9.99" + b".9" * ((len(old) - 10) // 2) if len(old) >= 10 else b"GLIBC_9.9"
    new = new[: len(old)].ljust(len(old), b"9")
    patched = _patched(src, tmp_path / src.name, old, new)
    needs = read_elf(str(patched))
    assert needs.glibc is not None and needs.glibc[0] == 9
    assert read_elf(str(src)).glibc != needs.glibc  # the patch, not the file, made the difference


def test_a_patched_needed_library_is_read(tmp_path: Path) -> None:
    src = _module("zlib")
    patched = _patched(src, tmp_path / src.name, b"libz.so.1", b"libq.so.1")
    assert "libq.so.1" in read_elf(str(patched)).needed
    assert "libz.so.1" not in read_elf(str(patched)).needed


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7fELF", b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 9, b"#!/bin/sh\n", b"\x7fELF" * 100],
)
def test_what_is_not_an_elf_object_is_an_elf_read_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.so"
    path.write_bytes(data)
    with pytest.raises(ElfReadError, match=re.escape(str(path))):
        read_elf(str(path))


def test_a_truncated_binary_is_an_elf_read_error(tmp_path: Path) -> None:
    path = tmp_path / "python"
    path.write_bytes(Path(BINARY).read_bytes()[:3000])
    with pytest.raises(ElfReadError):
        read_elf(str(path))


def test_a_missing_file_is_an_elf_read_error(tmp_path: Path) -> None:
    with pytest.raises(ElfReadError, match="nothing-here"):
        read_elf(str(tmp_path / "nothing-here"))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_corrupted_objects_read_or_raise_elf_read_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    """Invariant: bytes flipped anywhere in a real object read as one, or raise ElfReadError."""
    blob = bytearray(Path(_module("zlib")).read_bytes())
    # Where the tables live: the ELF and program headers at the start, the
    # section headers at the end; anywhere else rarely matters.
    regions = [(0, 4096), (len(blob) - 4096, len(blob) - 1), (0, len(blob) - 1)]
    for _ in range(data.draw(st.integers(1, 8))):
        low, high = data.draw(st.sampled_from(regions))
        at = data.draw(st.integers(low, high))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(16, len(blob)))
    path = tmp_path / "fuzzed.so"
    path.write_bytes(bytes(blob[:cut]))
    try:
        needs = read_elf(str(path))
    except ElfReadError:
        return
    assert isinstance(needs, ElfNeeds)


NEEDS = ElfNeeds("EM_X86_64", ("libc.so.6", "libz.so.1"), (), (2, 34))


@pytest.mark.parametrize(
    ("machine", "glibc", "libraries", "why"),
    [
        ("EM_X86_64", (2, 36), {"libc.so.6", "libz.so.1"}, None),
        ("EM_X86_64", (2, 34), {"libc.so.6", "libz.so.1"}, None),
        (
            "EM_AARCH64",
            (2, 36),
            {"libc.so.6", "libz.so.1"},
            "built for EM_X86_64, the guest is EM_AARCH64",
        ),
        ("EM_X86_64", (2, 31), {"libc.so.6", "libz.so.1"}, "needs glibc 2.34, the guest has 2.31"),
        ("EM_X86_64", (2, 36), {"libc.so.6"}, "needs libz.so.1, which the guest lacks"),
    ],
)
def test_why_not_runnable(
    machine: str, glibc: tuple[int, int], libraries: set[str], why: str | None
) -> None:
    got = why_not_runnable("/x/y.so", NEEDS, machine=machine, glibc=glibc, libraries=libraries)
    if why is None:
        assert got is None
    else:
        assert got is not None and got.startswith("/x/y.so") and why in got


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("GLIBC_2.34", (2, 34)),
        ("GLIBC_2.2.5", (2, 2)),
        ("GLIBC_PRIVATE", None),
        ("GLIBCXX_3.4", None),
    ],
)
def test_glibc_version(name: str, version: tuple[int, int] | None) -> None:
    assert elf_checks.glibc_version(name) == version


def test_the_real_binary_copied_runs_nowhere_else(tmp_path: Path) -> None:
    """A copy is read the same as the original (the checks depend on content, not path)."""
    copy = tmp_path / "python"
    shutil.copy2(BINARY, copy)
    original, copied = read_elf(BINARY), read_elf(str(copy))
    assert (original.machine, original.needed, original.glibc) == (
        copied.machine,
        copied.needed,
        copied.glibc,
    )
