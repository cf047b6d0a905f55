"""A cached collected worker's disk, used where it lies instead of copied first.

A collected worker's snapshot (``sandbox/worker_cache.py``) is a ~450 MiB
qcow2 file: copying it before QEMU starts cost 0.2 s on an idle host and
1-1.6 s with other VMs writing to the same disk, on the first test's path.
A session that runs **one** test on this worker (the edit-run loop: ``pytest
test_x.py::test_one``) needs no second copy for other VMs, so it:

* **takes** the cached file: renames it, in its own folder, to
  ``.<key>.qcow2.taken-<pid>`` (atomic: no other run sees it while this one
  holds it; a concurrent run of the same tree finds no cached worker and
  collects, as it would after an edit), and QEMU runs on it in place
  (``VM.launch(in_place=True)``);
* **gives it back** once QEMU has stopped (a hard link to the cached name
  unless a newer one is there, then the taken name removed). The file's
  internal snapshot is what the next run loads, and qcow2 never writes a
  snapshot's clusters in place (what the run wrote went to new clusters,
  dropped by the next ``loadvm``), so the tree in it is the one its key
  names. A VM whose QEMU was gone before its close (crashed, killed) does
  not give its file back: it is removed. A file is put back to that
  snapshot before it is kept (:func:`_drop_run_writes`), so nothing the
  run wrote stays in the cache.

A first run of the project in a one-test session likewise does not copy its
freshly saved snapshot before the test: the VM's own disk becomes the
cached file when the VM closes (:func:`keep_at_close`), linked where the
cache is on the same file system, copied otherwise — after the run, not
before its first test.

A run after an edit (a new tree for the same layer stack and ``go``: the same
*lineage*, the key's first part) takes the lineage's previous collected file
instead (:func:`restore_started`): it holds the started worker's snapshot
too (``CLEAN_TAG``, the layer it was made from), so QEMU loads that in
place — no copy of the ~400 MiB layered file — and the new collection's
snapshot replaces the old one's tag. The file is given back under the new
key once that snapshot is saved, removed otherwise: the previous tree's
collected state is gone (going back to it collects again).

A taken file whose process is gone (killed before it could give it back) is
removed by the next run, at its start (``vm/reaper.remove_stale_cache_files``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import pytest

import pytest_gondolin.paths as paths
import pytest_gondolin.sandbox.configured as configured
from pytest_gondolin.errors import GondolinError, VMError
from pytest_gondolin.hosttools import require as require_tool
from pytest_gondolin.sandbox.collected_files import TAKEN as TAKEN
from pytest_gondolin.sandbox.collected_files import (
    collected_dir,
    collected_path,
    link_collected,
    store_collected,
)
from pytest_gondolin.sandbox.transports import VMTransport
from pytest_gondolin.sandbox.worker_cache import StartedWorker
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.warm import CLEAN_TAG

__all__ = [
    "InPlace",
    "give_back",
    "keep_at_close",
    "one_test_session",
    "restore_started",
    "take_collected",
    "take_previous",
]

log = logging.getLogger(__name__)

#: The kept file's snapshot the next run loads (``guest_worker.WORKER_TAG``; importing
#: it from there would be a cycle: a test checks they agree).
KEPT_TAG: Final = "gondolin-worker"
#: Putting a kept file back to that snapshot: ~1 s when the test wrote 1 GiB.
DROP_TIMEOUT: Final = 120.0


def one_test_session(config: pytest.Config, files: Sequence[str]) -> bool:
    """Whether the session has at most one item in ``files`` (so one VM serves them all).

    Counts every selected item in those files, sandboxed for this worker or
    not: never fewer than the worker will run.
    """
    session = config.pluginmanager.get_plugin("session")
    items = getattr(session, "items", None)
    if not isinstance(items, list):
        return False
    wanted = set(files)
    return sum(1 for item in items if str(getattr(item, "path", "")) in wanted) <= 1


def _taken_path(key: str, pid: int) -> Path:
    return collected_dir() / f".{key}.qcow2{TAKEN}{pid}"


def take_collected(key: str) -> Path | None:
    """The cached collected worker ``key``, moved aside for this process alone; None if not there.

    None too when the cache cannot be written (a read-only cache: the caller
    copies, as before). Whoever launches a VM on the returned file must
    :func:`give_back` it when that VM closes.
    """
    folder = collected_dir()
    if not paths.can_write(folder):
        return None
    taken = _taken_path(key, os.getpid())
    try:
        collected_path(key).rename(taken)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("could not take the cached worker %s: %s", collected_path(key), exc)
        return None
    try:
        os.utime(taken)  # least recently used goes first
    except OSError:
        pass
    return taken


def give_back(
    vm: VM,
    taken: Path,
    key: str,
    *,
    saved: Callable[[], bool] = lambda: True,
    record: Callable[[], configured.Record | None] | None = None,
) -> None:
    """Put ``taken`` (``vm``'s disk) back as the cached worker ``key`` once ``vm`` closes.

    Given back only if QEMU was still running when the close began (it is
    then stopped with ``quit``, which leaves the file whole) and ``saved()``
    says the file holds ``key``'s snapshot; otherwise, or when a newer
    cached file is there, ``taken`` is removed. ``record``: what the file's
    configured snapshot depends on (``sandbox/configured.py``), kept with it
    for ``key`` (None: the file is given back with the record ``key`` has).
    """

    def after_stop(alive: bool) -> None:
        try:
            # Not there: found unusable after the launch, and removed.
            if not (alive and saved() and taken.exists() and _drop_run_writes(taken)):
                return
            if not link_collected(taken, key):
                log.warning("could not give back the cached worker %s", taken)
            elif record is not None:
                kept = record()
                if kept is None:
                    configured.forget(key)
                else:
                    configured.store(key, kept)
        finally:
            taken.unlink(missing_ok=True)

    _after_stop(vm, after_stop)


def lineage(key: str) -> str:
    """The lineage part of a collected state's key (``worker_cache.collected_key``)."""
    return key.partition("-")[0]


def take_previous(key: str) -> tuple[Path, str] | None:
    """The most recently used cached collected worker of ``key``'s lineage but not ``key``, taken.

    Same layer stack and ``go``, another tree: its started-worker snapshot is
    the one ``key`` starts from. Returns the taken file and the key it had;
    None when there is none (or the cache cannot be written).
    """
    found: list[tuple[float, Path]] = []
    for path in collected_dir().glob(f"{lineage(key)}-*.qcow2"):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    for _, path in sorted(found, reverse=True):
        other = path.name.removesuffix(".qcow2")
        if other != key and (taken := take_collected(other)) is not None:
            return taken, other
    return None


@dataclasses.dataclass(eq=False)
class InPlace:
    """A VM run in place on a previous tree's file, its worker waiting (``restore_started``)."""

    vm: VM
    transport: VMTransport
    #: Restored configured (``sandbox/configured.py``): the worker waits for ``collect``,
    #: not for its go, and the file's configured snapshot (this record) holds for this tree.
    record: configured.Record | None
    _state: dict[str, object]

    def saved(self, record: configured.Record | None) -> None:
        """The snapshot of the new key is saved: the file is given back as that key's when
        the VM closes, kept with ``record`` (what its configured snapshot depends on)."""
        self._state.update(saved=True, record=record)


def restore_started(
    config: VMConfig,
    key: str,
    worker: StartedWorker,
    *,
    name: str,
    say: Callable[[str], None],
    files: Mapping[str, str] | None = None,
) -> InPlace | None:
    """A VM whose started worker waits, run in place on a previous tree's file of ``key``'s lineage.

    With ``files`` (the new tree, ``configured.tree_files``) matching the
    record of the file's configured snapshot, the worker is restored there
    (configured, waiting for ``collect``); otherwise it waits for its go.
    Returns the VM, the worker's transport and what to call once the
    snapshot of ``key`` is saved in it (the file is then given back as
    ``key`` when the VM closes; before that call, it is removed). None when
    the lineage has no cached file, or the one taken does not load or holds
    no valid worker (it is removed; the caller starts from the layers).
    """
    found = take_previous(key)
    if found is None:
        return None
    taken, previous = found
    record = configured.load(previous)
    configured.forget(previous)  # the file is not ``previous``'s any more
    if record is not None and (files is None or not record.holds_for(files)):
        record = None
    started = time.monotonic()
    vm: VM | None = None
    for tag in [configured.CONFIGURED_TAG] * (record is not None) + [CLEAN_TAG]:
        try:
            vm = VM.launch(config, name=name, loadvm_disk=taken, loadvm_tag=tag, in_place=True)
            break
        except (VMError, OSError) as exc:
            log.warning("cached worker snapshot %s did not load (%s)", taken, exc)
            record = None
    if vm is None:
        log.warning("starting the worker: no snapshot of %s loaded", taken)
        taken.unlink(missing_ok=True)
        return None
    state: dict[str, object] = {"saved": False, "record": None}

    def kept_record() -> configured.Record | None:
        kept = state["record"]
        return kept if isinstance(kept, configured.Record) else None

    give_back(vm, taken, key, saved=lambda: state["saved"] is True, record=kept_record)
    try:
        transport = worker.attach(vm)
    except GondolinError as exc:
        vm.close()  # not saved: the file is removed
        log.warning("cached worker snapshot %s is not usable (%s); starting the worker", taken, exc)
        return None
    what = "configured" if record is not None else "started"
    say(
        f"{name}: restored the {what} worker in place from a previous tree's snapshot "
        f"in {time.monotonic() - started:.2f} s"
    )
    return InPlace(vm, transport, record, state)


def keep_at_close(
    vm: VM, key: str, record: Callable[[], configured.Record | None] = lambda: None
) -> None:
    """Cache ``vm``'s disk (holding its worker snapshot) as ``key`` when ``vm`` closes.

    Linked into the cache when it is on the same file system and no file is
    cached as ``key`` yet, copied otherwise (``store_collected``, its lock
    and eviction). Nothing is kept from a VM whose QEMU was gone before the
    close, or when the cache cannot be written. ``record()``: what the
    disk's configured snapshot depends on, kept with it (``sandbox/configured.py``).
    """
    assert vm.rundir is not None, "a running VM has its folder"
    disk = vm.rundir / "disk.qcow2"

    def after_stop(alive: bool) -> None:
        if not alive or not _drop_run_writes(disk):
            return
        if link_collected(disk, key) or store_collected(disk, key) is not None:
            kept = record()
            if kept is not None:
                configured.store(key, kept)

    _after_stop(vm, after_stop)


def _drop_run_writes(disk: Path) -> bool:
    """Put stopped ``disk`` back to its worker snapshot, as the next run's ``loadvm`` would.

    The test ran on this file: what it wrote must not stay in the cache (up to
    the guest's whole disk, on the host until evicted; red team round 3). The
    freed clusters are punched out of the file (qcow2 passes the discards on).
    ~10-40 ms when the test wrote little. False, with a warning, if qemu-img
    could not: the file is then not kept.
    """
    try:
        done = subprocess.run(
            [require_tool("qemu-img"), "snapshot", "-q", "-a", KEPT_TAG, str(disk)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=DROP_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError, GondolinError) as exc:
        log.warning("not keeping the cached worker %s: %s", disk, exc)
        return False
    if done.returncode != 0:
        log.warning("not keeping the cached worker %s: %s", disk, done.stderr.strip()[-300:])
        return False
    return True


def _after_stop(vm: VM, action: Callable[[bool], None]) -> None:
    """Call ``action(alive)`` once ``vm``'s QEMU has stopped; ``alive``: it still ran when the close began."""
    state = {"alive": False}

    def before_stop() -> None:
        state["alive"] = not vm.exited()  # vm.alive is already False: closing

    vm.add_close_hook(before_stop)
    vm.add_close_hook(lambda: action(state["alive"]), after_stop=True)
