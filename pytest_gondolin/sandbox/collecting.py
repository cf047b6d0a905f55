"""The first VM's collection: the ``go`` (or ``collect``), the configured pause, the stale snapshot.

:class:`~.guest_worker.GuestWorker` prepares its first VM and then calls
:func:`collect`, which

* sends the started worker its ``go``; in a one-test session (the edit-run
  loop) the worker pauses once pytest is configured, and the configured
  snapshot is saved for the next edit's run (``sandbox/configured.py``);
* or, when that snapshot was restored (the tree matched its record), tells
  the worker to ``collect`` at once;
* and, for a VM run in place on a previous tree's file
  (``sandbox/worker_disk.py``), deletes that tree's collected snapshot in a
  thread meanwhile: QEMU holds its big lock while it deletes, which would
  stall the tree's copy, but not collection, which runs in the guest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import pytest_gondolin.sandbox.configured as configured
import pytest_gondolin.sandbox.worker_cache as worker_cache
import pytest_gondolin.sandbox.worker_disk as worker_disk
from pytest_gondolin.errors import AgentError, GondolinError
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.messages import Collected, Configured
from pytest_gondolin.sandbox.transports import VMTransport
from pytest_gondolin.vm.machine import VM

__all__ = ["collect"]

log = logging.getLogger(__name__)


def collect(
    client: WorkerClient,
    transport: VMTransport,
    stale_tag: str,
    go: Mapping[str, Any],
    phases: worker_cache.Phases,
    reused: worker_disk.InPlace | None,
    files: Mapping[str, str] | None,
    *,
    timeout: float,
) -> tuple[Collected, configured.Record | None]:
    """What the worker collected, and the record of the configured snapshot its VM's disk holds.

    ``files`` (the tree, ``configured.tree_files``): a one-test session, whose
    worker pauses once configured. ``reused``: the VM runs in place on a
    previous tree's file, whose snapshot ``stale_tag`` is deleted meanwhile.
    """
    vm = transport.vm
    if reused is not None and reused.record is not None:
        deleting = _deleting(vm, stale_tag)
        collected = client.start(timeout, resume=True)
        deleting.join()
        return collected, reused.record
    worker_cache.send_go(transport, go["argv"], go["cwd"], go["env"], pause=files is not None)
    stale = _deleting(vm, stale_tag) if reused is not None else None
    kept: list[configured.Record] = []

    def on_configured(message: Configured) -> None:
        phases.mark("configure")
        if stale is not None:
            stale.join()  # one snapshot operation at a time
        if files is None or message.read is None:
            return
        try:
            vm.save_internal(configured.CONFIGURED_TAG)
        except GondolinError as exc:
            log.warning("%s: no configured snapshot for the next run: %s", vm.name, exc)
            return
        kept.append(configured.Record.made(files, message.read))
        phases.mark("save configured")

    try:
        collected = client.start(timeout, on_configured=on_configured)
    except AgentError as exc:
        # A file of tens of thousands of items took 100 s and ~200 MB to collect
        # (packaging's test_version.py): in a 256 MiB guest, a timeout or a kill.
        raise AgentError(
            f"{exc}\n(the guest has {vm.config.memory_mib} MiB of memory: collecting a large "
            "file may need more, --gondolin-memory or the sandboxed marker's memory=)"
        ) from exc
    finally:
        if stale is not None:
            stale.join()
    return collected, kept[0] if kept else None


def _deleting(vm: VM, tag: str) -> threading.Thread:
    """A started thread deleting ``vm``'s snapshot ``tag`` (failures logged: savevm deletes it then)."""

    def delete() -> None:
        try:
            vm.delete_internal(tag)
        except GondolinError as exc:
            log.debug("%s: snapshot %s not deleted ahead: %s", vm.name, tag, exc)

    thread = threading.Thread(target=delete, name=f"{vm.name}-delvm", daemon=True)
    thread.start()
    return thread
