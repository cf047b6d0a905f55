"""Layered ready snapshots: the base image's ready state plus cached changes on top.

A :class:`Layer` is a content key and a function that changes a running
guest (installs Debian packages, unpacks the host's Python environment).
:func:`launch_layered` returns a running VM whose internal snapshot
``CLEAN_TAG`` holds the base ready state with every layer applied, in
order. Each prefix of the stack is cached as its own ready snapshot
(``<state key>+<stack digest>.qcow2``, :mod:`~pytest_gondolin.vm.snapshot_paths`),
so a later run starts from the longest cached prefix and applies only the
layers after it; with everything cached, no layer runs at all. The host-side
work of the layers to build (:attr:`Layer.prepare`: packing a tar layer's
items) runs on a thread while the VM they change starts.

Guarantees, as for the base snapshot (:mod:`~pytest_gondolin.vm.warm`):

* a builder holds the file lock of every prefix of its stack (shortest
  first), so concurrent builders (xdist workers, parallel jobs) build each
  prefix once;
* a file is written to a temporary name and renamed into place: a crash or
  Ctrl-C leaves no half-written snapshot (the temporary file is removed);
* a cached file that fails to load is deleted and rebuilt;
* in a cache that cannot be written, cached files are used and nothing is
  saved;
* a layer that fails (its function raises) leaves nothing in the cache and
  the VM is closed; the error propagates unchanged.

At most :data:`MAX_STACKS_PER_BASE` layered files are kept per base state
key; the least recently used go first (a changed host environment makes a
new one each time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import VMError
from pytest_gondolin.vm.disk_backed import backing_command, folders_to_back
from pytest_gondolin.vm.identity import VMConfig, state_key
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.snapshot_paths import (
    layered_snapshot_lock,
    layered_snapshot_path,
    layered_snapshots_of,
    snapshots_dir,
)
from pytest_gondolin.vm.warm import CLEAN_TAG, WARM_LOCK_TIMEOUT, export_snapshot, launch_clean

__all__ = [
    "LAYER_LOCK_TIMEOUT",
    "MAX_STACKS_PER_BASE",
    "Layer",
    "TarItem",
    "launch_layered",
    "layer_config",
    "stack_digest",
    "tar_layer",
]

log = logging.getLogger(__name__)

#: Installing Debian packages under TCG takes ~1 min for a few; a builder
#: holding the lock far longer than this is hung.
LAYER_LOCK_TIMEOUT: Final = WARM_LOCK_TIMEOUT + 1800.0
#: Layered snapshots kept per base state key (each is ~80 MiB plus its layers).
#: A sandboxed session's stack has three or four prefixes (system packages, the
#: host's interpreter and environment, the started worker: sandbox/worker_cache.py).
MAX_STACKS_PER_BASE: Final = 12
#: Tar items are written to the guest in pieces of about this size: one piece
#: is held in guest memory by the agent while it is written.
CHUNK_BYTES: Final = 32 * 1024 * 1024
#: Unpacking a piece in the guest (TCG, a loaded host).
UNPACK_TIMEOUT: Final = 300.0
#: Tar bytes packed ahead while the VM starts (:attr:`Layer.prepare`) are held
#: in host memory until written: past this, the rest is packed as it is sent.
PREFETCH_BYTES: Final = 2 * CHUNK_BYTES
#: A layer's prepare thread is joined this long at most once the stack is built
#: (it is done then: every layer took its packs; the bound is for a pack hung
#: on a host file).
PREPARE_JOIN_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class Layer:
    """A change to a running guest, named by the content it brings (``key``)."""

    #: Short human name, in progress lines ("system-packages", "host-environment").
    name: str
    #: Content key: equal keys must mean equal changes to the guest.
    key: str
    apply: Callable[[VM], None] = field(compare=False, repr=False)
    #: Host-side work ``apply`` needs (packing), started on a thread while the
    #: VM it will change starts; ``apply`` must work without it.
    prepare: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    #: A read-only file-system image ``apply`` mounts from the environment slot
    #: (``vm/qemu.py``): every VM started from this layer's snapshot, or from
    #: one built on it, needs it there (:func:`layer_config`). ``key`` names it.
    drive: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TarItem:
    """One piece of a tar layer: its content key and how to get the tar bytes (members at absolute paths)."""

    key: str
    pack: Callable[[], bytes] = field(compare=False, repr=False)


def layer_config(config: VMConfig, layers: Sequence[Layer]) -> VMConfig:
    """``config`` with the image a layer of ``layers`` mounts in its environment slot.

    Every VM that loads a snapshot of this stack (its clones, a cached worker
    on top of it) must be launched with this config. ValueError if two
    layers need a drive (there is one slot).
    """
    drives = [layer.drive for layer in layers if layer.drive is not None]
    if len(drives) > 1:
        raise ValueError(f"layers need {len(drives)} drives ({drives}); the guest has one slot")
    drive = drives[0] if drives else None
    if drive == config.environment_image:
        return config
    return dataclasses.replace(config, environment_image=drive)


def stack_digest(base: str, layers: Sequence[Layer]) -> str:
    """The digest naming ``layers`` applied, in order, over base state key ``base``."""
    parts = [base, *([layer.name, layer.key] for layer in layers)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


#: How a tar layer is unpacked, part of its key: a layer unpacked another way
#: (before trees under the guest's tmpfs went to its disk) is never reused.
TAR_LAYER_FORMAT: Final = "tar-layer 2 (tmpfs trees on disk)"


class _Prefetch:
    """Tar items packed ahead on a thread (:meth:`prepare`), taken in order by :meth:`packs`.

    A round of futures, one per item: the thread packs them in order until
    :data:`PREFETCH_BYTES` are held; :meth:`packs` takes each item's bytes
    from its future, or packs it itself when the thread has not started it
    (cancelled, so the thread stops there). Without a round it packs all.
    """

    def __init__(self, items: Sequence[TarItem]) -> None:
        self._items = tuple(items)
        self._lock = threading.Lock()
        self._round: list[Future[bytes]] | None = None

    def prepare(self) -> None:
        futures: list[Future[bytes]] = [Future() for _ in self._items]
        with self._lock:
            if self._round is not None:
                return  # a round not yet taken: the same items, packed already
            self._round = futures
        held = 0
        for item, future in zip(self._items, futures, strict=True):
            if held >= PREFETCH_BYTES or not future.set_running_or_notify_cancel():
                return
            try:
                data = item.pack()
            except Exception as exc:  # raised where the bytes are taken (packs)
                future.set_exception(exc)
                return
            future.set_result(data)
            held += len(data)

    def packs(self) -> Iterator[bytes]:
        with self._lock:
            taken, self._round = self._round, None
        futures: list[Future[bytes] | None] = [None] * len(self._items)
        if taken is not None:
            futures[:] = taken
        del taken
        for index, item in enumerate(self._items):
            future, futures[index] = futures[index], None  # its bytes: the caller's only
            if future is None or future.cancel():
                yield item.pack()
            else:
                yield future.result()


def tar_layer(name: str, items: Sequence[TarItem]) -> Layer:
    """A layer that unpacks ``items`` (tars) at ``/`` in the guest, keyed by their keys.

    Its :attr:`Layer.prepare` packs the first items (up to
    :data:`PREFETCH_BYTES`) while the VM starts.
    """
    key = hashlib.sha256(
        "\n".join([TAR_LAYER_FORMAT, *(item.key for item in items)]).encode()
    ).hexdigest()[:24]
    prefetch = _Prefetch(items)

    def apply(vm: VM) -> None:
        pending: list[bytes] = []
        size = 0
        count = 0
        for data in prefetch.packs():
            if pending and size + len(data) > CHUNK_BYTES:
                _unpack(vm, b"".join(pending), count)
                count += 1
                pending, size = [], 0
            pending.append(data)
            size += len(data)
        if pending:
            _unpack(vm, b"".join(pending), count)

    return Layer(name, key, apply, prefetch.prepare)


def _unpack(vm: VM, data: bytes, index: int) -> None:
    # /var/tmp is a tmpfs of half the guest's memory: a piece (~CHUNK_BYTES)
    # fits, and once removed it leaves nothing in the disk or the snapshot.
    # --ignore-zeros: a piece is several tars joined. Trees under the guest's
    # tmpfs go to its disk (the bind mounts in the same exec: one round trip).
    target = f"/var/tmp/gondolin-layer-{index}.tar"
    vm.write_file(target, data)
    vm.exec(
        f"{backing_command(folders_to_back([data]))} && "
        f"tar --ignore-zeros -xf {target} -C / && rm {target}",
        check=True,
        timeout=UNPACK_TIMEOUT,
    )


def launch_layered(
    config: VMConfig,
    layers: Sequence[Layer],
    *,
    name: str,
    progress: Callable[[str], None] | None = None,
    use_cache: bool = True,
) -> VM:
    """A running VM whose internal snapshot ``CLEAN_TAG`` is the ready state with ``layers`` applied.

    The VM runs with :func:`layer_config` of ``config``. Without layers this
    is :func:`~pytest_gondolin.vm.warm.launch_clean`.
    Raises what a layer's function raises (the VM is then closed and
    nothing is cached), or VMError/VMLaunchError when QEMU fails.
    """
    config = layer_config(config, layers)
    if not layers:
        return launch_clean(config, name=name, progress=progress, use_cache=use_cache)
    say = progress or (lambda msg: log.info("%s", msg))
    base = state_key(config)
    digests = [stack_digest(base, layers[: i + 1]) for i in range(len(layers))]
    files = [layered_snapshot_path(base, d) for d in digests]
    saving = use_cache and _writable(snapshots_dir())
    with contextlib.ExitStack() as held:
        # Every prefix's lock, shortest first (the same order in every
        # process): stacks that share a prefix build it once.
        for digest in digests:
            lock = filelock.FileLock(str(paths.lock_path(layered_snapshot_lock(base, digest))))
            held.enter_context(lock.acquire(timeout=LAYER_LOCK_TIMEOUT))
        # The layers past the longest cached prefix will be built: their host
        # side (packing) runs while the VM starts.
        cached = next((n for n in range(len(files), 0, -1) if files[n - 1].exists()), 0)
        preparing = _prepare(layers[cached:] if use_cache else layers)
        vm, start = _longest_cached(config, files, name, use_cache, saving, say)
        if vm is None:
            vm = launch_clean(config, name=name, progress=say, use_cache=use_cache)
        try:
            for layer, target in zip(layers[start:], files[start:], strict=True):
                _build(vm, layer, target, saving=saving, use_cache=use_cache, say=say)
        except BaseException:
            vm.close()
            raise  # a prepare thread still packing is a daemon: not waited for
        if preparing is not None:
            preparing.join(PREPARE_JOIN_TIMEOUT)  # done: every layer took its packs
    if saving and start < len(layers):
        _evict(base, keep=files[-1])
    return vm


def _prepare(layers: Sequence[Layer]) -> threading.Thread | None:
    """Start the :attr:`Layer.prepare` of ``layers``, in order, on one thread (None: none has one)."""
    steps = [layer.prepare for layer in layers if layer.prepare is not None]
    if not steps:
        return None

    def run() -> None:
        for step in steps:
            try:
                step()
            except Exception:  # apply does the work again and raises it where it is seen
                log.debug("preparing a layer failed", exc_info=True)

    thread = threading.Thread(target=run, name="layer-prepare", daemon=True)
    thread.start()
    return thread


def _longest_cached(
    config: VMConfig,
    files: Sequence[Path],
    name: str,
    use_cache: bool,
    saving: bool,
    say: Callable[[str], None],
) -> tuple[VM | None, int]:
    """A VM started from the longest cached prefix and how many layers it holds (0: none)."""
    if not use_cache:
        return None, 0
    for count in range(len(files), 0, -1):
        cached = files[count - 1]
        if not cached.exists():
            continue
        started = time.monotonic()
        try:
            vm = VM.launch(config, name=name, loadvm_disk=cached, loadvm_tag=CLEAN_TAG)
        except FileNotFoundError:
            continue  # evicted by another process since exists()
        except VMError as exc:
            log.warning("cached layered snapshot %s did not load (%s); rebuilding it", cached, exc)
            if saving:
                cached.unlink(missing_ok=True)
            continue
        if saving:
            try:
                os.utime(cached)  # least recently used goes first (_evict)
            except OSError:
                pass
        say(
            f"{name} restored from the cached ready snapshot with {count} layer(s) "
            f"in {time.monotonic() - started:.2f} s"
        )
        return vm, count
    return None, 0


def _build(
    vm: VM, layer: Layer, target: Path, *, saving: bool, use_cache: bool, say: Callable[[str], None]
) -> None:
    """Apply ``layer`` to ``vm``, save it as ``CLEAN_TAG`` and cache it at ``target``."""
    started = time.monotonic()
    say(f"{vm.name}: building layer {layer.name} ({layer.key[:12]})")
    layer.apply(vm)
    # Written back and out of the page cache: the snapshot is smaller and a
    # restore replays no writeback.
    vm.exec(["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], check=True)
    vm.save_internal(CLEAN_TAG)  # replaces the previous state of that tag
    if saving:
        export_snapshot(vm, target)
        kept = "cached for later runs"
    elif use_cache:
        kept = f"not cached: {snapshots_dir()} cannot be written"
    else:
        kept = "not cached"
    say(f"{vm.name}: layer {layer.name} built in {time.monotonic() - started:.1f} s ({kept})")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return paths.can_write(folder)


def _evict(base: str, *, keep: Path) -> None:
    """Remove the least recently used layered snapshots of ``base`` past :data:`MAX_STACKS_PER_BASE`."""
    found: list[tuple[float, Path]] = []
    for path in layered_snapshots_of(base):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    found.sort(reverse=True)
    for _, path in found[MAX_STACKS_PER_BASE:]:
        if path == keep:
            continue
        log.info("removing least recently used layered snapshot %s", path)
        path.unlink(missing_ok=True)
