"""Build a guest image from Debian packages.

Steps (each reported through ``progress``):

1. ``mmdebstrap`` a minbase root of the recipe's suite with its packages; a
   customize hook fetches the kernel package inside the chroot.
2. Pick the kernel and the virtio modules it builds as modules, resolving
   their dependencies from ``modules.dep``.
3. Write the base initramfs: static busybox, those modules in load order,
   ``/dev/console``, the stage-1 ``init``.
4. ``mkfs.ext4 -d`` the root into a sparse file, convert it to qcow2.
5. Write ``manifest.json`` last: its presence marks the image complete.

Needs root (mmdebstrap's root mode and a root-owned tree for mkfs); the
error says so and how to run the build with sudo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest_gondolin.hosttools as hosttools
from pytest_gondolin.errors import ImageError
from pytest_gondolin.image import cpio
from pytest_gondolin.image.manifest import write_manifest
from pytest_gondolin.image.recipe import Recipe
from pytest_gondolin.logtail import read_tail_text, tail_lines

#: mmdebstrap's own bound; a cold build takes ~1 min with a local mirror.
MMDEBSTRAP_TIMEOUT = 30 * 60
#: Lines of a failed step's log quoted in the error (the full log's path is named too).
LOG_TAIL_LINES = 30
#: Bytes read from the end of that log to find them (mmdebstrap lines are short).
LOG_TAIL_BYTES = 64 * 1024

#: Receives one human-readable line per build step.
Progress = Callable[[str], None]


def _run_logged(
    cmd: list[str], log_path: Path, progress: Progress, step: str, timeout: float
) -> None:
    """Run ``cmd`` with output to ``log_path``; echo its ``I:`` lines as progress."""
    started = time.monotonic()
    with log_path.open("ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                log.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if line.startswith("I: "):
                    progress(f"{step}: {line[3:]} [{time.monotonic() - started:.0f} s]")
                if time.monotonic() - started > timeout:
                    proc.kill()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        tail = tail_lines(read_tail_text(log_path, LOG_TAIL_BYTES), LOG_TAIL_LINES)
        raise ImageError(f"{step} failed (exit code {code}); full log: {log_path}\n{tail}")


def _check(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        raise ImageError(
            f"{what} failed (exit code {res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}"
        )


def _modinfo_depends(module: Path) -> list[str]:
    """Names of the modules ``module`` depends on, from its ``.modinfo`` strings.

    The kernel package ships no ``modules.dep`` (depmod makes it at install
    time), and the modinfo ``depends=`` field is what depmod reads anyway.
    """
    for field in module.read_bytes().split(b"\0"):
        if field.startswith(b"depends="):
            return [d for d in field[len(b"depends=") :].decode().split(",") if d]
    return []


def _modname(path: str | Path) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", Path(path).name).replace("-", "_")


def resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Return the module files for ``wanted`` and their dependencies, dependencies first.

    Modules the kernel has built in (listed in ``modules.builtin``) are skipped.
    """
    by_name = {_modname(p): p for p in moddir.rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = {
        _modname(m) for m in (builtin_file.read_text().split() if builtin_file.exists() else [])
    }
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in builtin or by_name.get(key) in order:
            return
        if key not in by_name:
            raise ImageError(
                f"kernel module {name!r} (needed by {' <- '.join(chain) or 'the recipe'}) is neither a module nor built in ({moddir})"
            )
        if key in chain:
            raise ImageError(f"kernel module dependency loop: {' -> '.join((*chain, key))}")
        for dep in _modinfo_depends(by_name[key]):
            visit(dep, (*chain, key))
        order.append(by_name[key])

    for name in wanted:
        visit(name, ())
    return order


def build_initramfs(rootdir: Path, moddir: Path, recipe: Recipe) -> bytes:
    """Return the base initramfs archive for ``recipe`` (no per-boot payload)."""
    busybox = rootdir / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageError(
            "the recipe must install busybox-static: /bin/busybox is missing from the root"
        )
    entries = [
        cpio.Entry.directory(d)
        for d in ("/bin", "/dev", "/proc", "/sys", "/newroot", "/lib", "/lib/modules")
    ]
    entries.append(cpio.Entry.chardev("/dev/console", 5, 1))
    entries.append(cpio.Entry.file("/bin/busybox", busybox.read_bytes(), 0o755))
    modules = resolve_modules(moddir, recipe.initramfs_modules)
    for mod in modules:
        if mod.suffix != ".ko":
            raise ImageError(
                f"compressed kernel module {mod.name}: busybox insmod needs plain .ko files"
            )
        entries.append(cpio.Entry.file(f"/lib/modules/{mod.name}", mod.read_bytes()))
    entries.append(
        cpio.Entry.file("/modules.order", "".join(f"{m.name}\n" for m in modules).encode())
    )
    entries.append(cpio.Entry.file("/init", (recipe.directory / "init").read_bytes(), 0o755))
    return cpio.archive(entries)


def build_image(recipe: Recipe, out: Path, *, progress: Progress) -> None:
    """Build ``recipe`` into the empty folder ``out``."""
    mmdebstrap = hosttools.require("mmdebstrap")
    mkfs = hosttools.require("mkfs.ext4")
    qemu_img = hosttools.require("qemu-img")
    if os.geteuid() != 0:
        raise ImageError(
            "building the guest image needs root (mmdebstrap, root-owned files); run once: "
            "sudo env GONDOLIN_CACHE_DIR=$HOME/.cache/pytest-gondolin gondolin image build"
        )
    started = time.monotonic()
    log_path = out / "build.log"
    rootdir = out / "root"
    mirror = os.environ.get("GONDOLIN_DEBIAN_MIRROR", recipe.mirror)
    cmd = [
        mmdebstrap,
        f"--variant={recipe.variant}",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt=path-exclude={p}" for p in recipe.path_excludes),
        *(f"--dpkgopt=path-include={p}" for p in recipe.path_includes),
        f'--customize-hook=sh {recipe.directory / "customize.sh"} "$1" {recipe.kernel_package}',
        recipe.suite,
        str(rootdir),
        mirror,
    ]
    progress(
        f"building image {recipe.image_key}: mmdebstrap {recipe.suite} ({len(recipe.packages)} packages)"
    )
    _run_logged(cmd, log_path, progress, "mmdebstrap", MMDEBSTRAP_TIMEOUT)

    kdir = rootdir / "gondolin-kernel" / "extract"
    kernels = sorted((kdir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"the kernel package unpacked no /boot/vmlinuz-* (see {log_path})")
    kernel_version = kernels[-1].name.removeprefix("vmlinuz-")
    moddir = kdir / "lib" / "modules" / kernel_version
    progress(f"kernel {kernel_version}: writing initramfs")
    shutil.copyfile(kernels[-1], out / "vmlinuz")
    (out / "initrd.img").write_bytes(build_initramfs(rootdir, moddir, recipe))
    shutil.rmtree(rootdir / "gondolin-kernel")

    progress(f"writing the root filesystem ({recipe.disk_size_mib} MiB ext4, sparse)")
    raw = out / "rootfs.ext4"
    _check(
        [
            mkfs,
            "-q",
            "-F",
            "-L",
            "gondolin-root",
            "-d",
            str(rootdir),
            str(raw),
            f"{recipe.disk_size_mib}M",
        ],
        "mkfs.ext4",
    )
    shutil.rmtree(rootdir)
    _check(
        [qemu_img, "convert", "-O", "qcow2", str(raw), str(out / "rootfs.qcow2")],
        "qemu-img convert",
    )
    raw.unlink()
    log_path.unlink()

    write_manifest(
        out,
        {
            "name": recipe.name,
            "build_id": recipe.build_id,
            "suite": recipe.suite,
            "kernel_version": kernel_version,
            "packages": list(recipe.packages),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    progress(f"image {recipe.image_key} built in {time.monotonic() - started:.0f} s")
