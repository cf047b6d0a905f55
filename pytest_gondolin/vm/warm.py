"""Ready-state snapshots cached across runs, so a second run skips the cold boot.

The first VM for a given :func:`~pytest_gondolin.vm.identity.state_key` boots
cold, saves an internal snapshot ``CLEAN_TAG`` (RAM + devices + disk) in its
overlay, and exports that overlay to ``<cache>/snapshots/<key>.qcow2``
(:mod:`~pytest_gondolin.vm.snapshot_paths`).
Later VMs with the same key start QEMU with a copy of that file and
``-loadvm`` (no boot at all). The key covers the image build, the boot
payload (agent code, CA, MTU), memory, CPUs, accelerator, QEMU version and
command line, so any change invalidates it. Writers hold a file lock and
rename into place; a cached file that fails to load is deleted and rebuilt.
In a cache that cannot be written, a snapshot in it is still used; without
one the VM boots cold and nothing is saved (the lock is then held in the
runtime folder, :func:`~pytest_gondolin.paths.lock_path`). Snapshots with
layers on top of this ready state are :mod:`pytest_gondolin.vm.layers`'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import VMError
from pytest_gondolin.vm.identity import VMConfig, state_key
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.overlay import copy_disk
from pytest_gondolin.vm.snapshot_paths import (
    evict_old_bases,
    snapshots_dir,
    warm_snapshot_lock,
    warm_snapshot_path,
)

log = logging.getLogger(__name__)

CLEAN_TAG = "gondolin-clean"
#: A cold boot plus save takes ~6 s here; a lock held far longer is a hung peer.
WARM_LOCK_TIMEOUT = 600.0


def launch_clean(
    config: VMConfig,
    *,
    name: str,
    progress: Callable[[str], None] | None = None,
    use_cache: bool = True,
) -> VM:
    """Return a running VM that holds internal snapshot ``CLEAN_TAG`` of its ready state."""
    say = progress or (lambda msg: log.info("%s", msg))
    key = state_key(config)
    saving = use_cache and _writable(snapshots_dir())
    cached = warm_snapshot_path(key)
    lock = filelock.FileLock(str(paths.lock_path(warm_snapshot_lock(key))))
    with lock.acquire(timeout=WARM_LOCK_TIMEOUT):
        if use_cache and cached.exists():
            started = time.monotonic()
            try:
                vm = VM.launch(config, name=name, loadvm_disk=cached, loadvm_tag=CLEAN_TAG)
            except VMError as exc:
                log.warning("cached snapshot %s did not load (%s); booting cold", cached, exc)
                if saving:
                    cached.unlink(missing_ok=True)
            else:
                with contextlib.suppress(OSError):  # its last use, for evict_old_bases
                    os.utime(cached)
                say(
                    f"{name} restored from the cached ready snapshot in {time.monotonic() - started:.2f} s"
                )
                return vm
        started = time.monotonic()
        say(
            f"booting {name} cold ({config.accel}, {config.memory_mib} MiB, image {config.image.name}-{config.image.build_id})"
        )
        vm = VM.launch(config, name=name)
        try:
            vm.save_internal(CLEAN_TAG)
            if saving:
                export_snapshot(vm, cached)
                evict_old_bases(keep=key)
        except BaseException:
            vm.close()
            raise
        if saving:
            kept = "cached for later runs"
        elif use_cache:
            kept = f"not cached: {snapshots_dir()} cannot be written"
        else:
            kept = "not cached"
        say(f"{name} booted and snapshotted in {time.monotonic() - started:.1f} s ({kept})")
        return vm


def _writable(folder: Path) -> bool:
    """Create ``folder`` if it can be; whether snapshots can be saved in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return paths.can_write(folder)


def export_snapshot(vm: VM, target: Path) -> None:
    """Copy ``vm``'s overlay (holding its internal snapshots) to ``target``, atomically.

    Written under a temporary name and renamed into place; on any failure,
    Ctrl-C included, the temporary file is removed. An OSError is logged
    (the snapshot is only not cached); anything else propagates.
    """
    if vm.rundir is None:
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    vm.pause()  # the overlay must not change while it is copied
    try:
        copy_disk(vm.rundir / "disk.qcow2", tmp)
        tmp.rename(target)
    except OSError as exc:
        log.warning("could not cache the ready snapshot at %s: %s", target, exc)
    finally:
        tmp.unlink(missing_ok=True)
        vm.resume()
