"""A running guest (:class:`VM`) and the disk-only checkpoints it leaves (:class:`Checkpoint`).

A VM is put together from parts that live next door: what it boots and
how its snapshots are named (:mod:`~pytest_gondolin.vm.identity`), its
overlay disk (:mod:`~pytest_gondolin.vm.overlay`), the QEMU child and its
QMP monitor (:mod:`~pytest_gondolin.vm.qemu_process`), the agent channel
(:mod:`~pytest_gondolin.vm.channel`), its guest API -- commands and files
(:mod:`~pytest_gondolin.vm.guest_operations`, a base of :class:`VM`), its
internal snapshots (:mod:`~pytest_gondolin.vm.internal_snapshots`, the base
between them) -- and, unless turned off, a network driver of its own. This
module owns the VM's lifecycle, its network and its disk-only checkpoints.

Its lifecycle (:mod:`~pytest_gondolin.vm.runstate`: the states, the moves
between them, which error a call in the wrong state gets) changes only in
``VM._set_state``. ``close()`` is soft then hard (QMP ``quit``, SIGTERM,
SIGKILL), idempotent, callable from any thread, and always removes the
runtime folder.

:class:`Checkpoint` lives here because each of the two makes the other:
``VM.checkpoint()`` returns one, ``Checkpoint.resume()`` launches a VM.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_gondolin.errors import AgentError, SnapshotError, StateError, VMError
from pytest_gondolin.hosttools import require as require_tool
from pytest_gondolin.statemachine import require, transition
from pytest_gondolin.vm import checkpoint as ckpt
from pytest_gondolin.vm.channel import AgentChannel
from pytest_gondolin.vm.commands import ExecResult
from pytest_gondolin.vm.guest_network import CassetteOpener, apply_policy, start_network
from pytest_gondolin.vm.identity import (
    Snapshot,
    VMConfig,
    boot_initrd,
    checkpoint_metadata,
    machine_spec,
    resume_config,
)
from pytest_gondolin.vm.internal_snapshots import InternalSnapshots
from pytest_gondolin.vm.overlay import copy_disk, create_overlay
from pytest_gondolin.vm.qemu_process import QemuProcess, console_tail, qemu_log_tail
from pytest_gondolin.vm.reaper import new_rundir
from pytest_gondolin.vm.runstate import LAUNCHED, VM_TRANSITIONS, Runstate

if TYPE_CHECKING:  # annotations only: guest_network loads the stack when a guest needs it
    from pytest_gondolin.netpolicy.driver import NetworkDriver
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.http.recorder import Recorder

__all__ = ["VM", "Checkpoint", "ExecResult", "Runstate", "Snapshot", "VMConfig"]

log = logging.getLogger(__name__)

#: ``sync`` before a checkpoint writes back the guest's dirty pages: seconds under TCG.
CHECKPOINT_SYNC_TIMEOUT = 60.0


_LIVE: weakref.WeakSet[VM] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    """Safety net: no QEMU outlives the interpreter, even if a caller forgot close()."""
    for vm in list(_LIVE):
        vm.close()


class VM(InternalSnapshots):
    """One guest. Use :meth:`launch` (or the fixtures) to get a running VM.

    Its guest API (``exec``, ``spawn``, ``attach``, ``read_file``,
    ``write_file``, ``secret_env``) comes from
    :class:`~pytest_gondolin.vm.guest_operations.GuestOperations`, its
    internal snapshots (``save_internal``, ``load_internal``,
    ``delete_internal``, ``pause``, ``resume``, ``snapshot``, ``restore``)
    from :class:`~pytest_gondolin.vm.internal_snapshots.InternalSnapshots`.
    """

    def __init__(self, config: VMConfig, *, name: str = "vm") -> None:
        self.config = config
        self.name = name
        self._state = Runstate.CREATED
        self._lock = threading.Lock()  # makes _set_state's check-and-move one step
        self.rundir: Path | None = None
        self._qemu: QemuProcess | None = None
        self._channel: AgentChannel | None = None
        self._close_hooks: list[Callable[[], object]] = []
        self._after_stop_hooks: list[Callable[[], object]] = []
        self.boot_seconds: float | None = None
        self.http: Recorder | None = None  # the network driver's recorder (vm.http)
        self.network: NetworkDriver | None = None  # started by launch() when config.network
        self.token = uuid.uuid4().hex
        self._snapshots = 0
        self._backing: Path = config.image.rootfs
        #: When the guest's wall clock was last set to the host's (monotonic), None: never.
        self._clock_set_at: float | None = None

    # -- lifecycle -----------------------------------------------------------

    def _set_state(
        self, new: Runstate, *, only_from: Collection[Runstate] = tuple(Runstate)
    ) -> Runstate:
        """Move to ``new`` and return the state left: the only place the state changes.

        StateError unless :data:`VM_TRANSITIONS` allows the move and the VM
        is in one of ``only_from``; both are checked under the lock, in one
        step with the move, so two threads never both leave a state.
        """
        with self._lock:
            old = self._state
            if old not in only_from:
                raise StateError(old, only_from, action=f"{self.name} moving to {new.value!r}")
            self._state = transition(VM_TRANSITIONS, old, new)
        if new is not old:
            log.debug("%s: %s -> %s", self.name, old.value, new.value)
        return old

    @classmethod
    def launch(
        cls,
        config: VMConfig,
        *,
        name: str = "vm",
        loadvm_disk: Path | None = None,
        loadvm_tag: str | None = None,
        backing: Path | None = None,
        in_place: bool = False,
    ) -> VM:
        """Boot a VM and return it once its agent answers. Raises VMLaunchError.

        With ``loadvm_disk``/``loadvm_tag``, the disk is a copy of that qcow2 and
        QEMU starts from its internal snapshot instead of booting. With
        ``backing``, the overlay sits on that qcow2 (a checkpoint) instead of
        the image's root disk. With ``in_place``, QEMU runs on ``loadvm_disk``
        itself (linked from the VM's folder, never copied or removed): the
        caller must own that file alone until the VM is closed.
        """
        vm = cls(config, name=name)
        if backing is not None:
            vm._backing = backing
        _LIVE.add(vm)
        try:
            vm._start(loadvm_disk, loadvm_tag, in_place=in_place)
        except BaseException:
            vm.close()
            raise
        return vm

    def _start(
        self, loadvm_disk: Path | None, loadvm_tag: str | None, *, in_place: bool = False
    ) -> None:
        """Pre-launch (folder, disk, network), spawn QEMU, post-launch (agent ready)."""
        started = time.monotonic()
        self._set_state(Runstate.BOOTING)
        qemu_binary = require_tool("qemu-system-x86_64")
        self.rundir = rundir = new_rundir()
        disk = rundir / "disk.qcow2"
        if loadvm_disk is not None and in_place:
            disk.symlink_to(loadvm_disk.resolve())
        elif loadvm_disk is not None:
            copy_disk(loadvm_disk, disk)
        else:
            create_overlay(disk, self._backing)
        initrd = boot_initrd(self.config)
        net_socket = self.config.net_socket
        if net_socket is None and self.config.network:
            # QEMU connects to this socket as it starts: it must listen first.
            self.network = start_network(rundir / "net.sock", mtu=self.config.mtu, name=self.name)
            self.http = self.network.recorder
            net_socket = self.network.socket_path
        spec = machine_spec(
            self.config,
            qemu=qemu_binary,
            kernel=self.config.image.kernel,
            initrd=initrd,
            disk=disk,
            rundir=rundir,
            net_socket=net_socket,
            loadvm=loadvm_tag,
        )
        self._qemu = qemu = QemuProcess(spec, name=self.name)
        log.info(
            "%s: starting QEMU (%s, %d MiB)", self.name, self.config.accel, self.config.memory_mib
        )
        self._channel = qemu.start(
            die_with_parent=self.config.die_with_parent,
            deadline=started + self.config.boot_timeout,
            boot_timeout=self.config.boot_timeout,
            restored=loadvm_tag is not None,
        )
        self._set_state(Runstate.RUNNING)
        self.boot_seconds = time.monotonic() - started
        if loadvm_tag is None:  # a restore's sync already brought entropy and the clock
            self._refresh_guest()
        else:
            self._clock_set_at = time.monotonic()
        log.info("%s: ready in %.2f s", self.name, self.boot_seconds)

    @require(Runstate.CREATED, Runstate.BOOTING, Runstate.RUNNING)
    def add_close_hook(self, hook: Callable[[], object], *, after_stop: bool = False) -> None:
        """Run ``hook`` when the VM closes: before QEMU stops, or with ``after_stop`` once it has.

        Either way before the VM's runtime folder is removed.
        """
        (self._after_stop_hooks if after_stop else self._close_hooks).append(hook)

    def close(self) -> None:
        """Stop the VM and remove everything it created. Safe to call more than once."""
        if self._set_state(Runstate.CLOSED) is Runstate.CLOSED:
            return
        _LIVE.discard(self)
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: close hook failed", self.name)
        self._disconnect(stop_qemu=True)
        hooks, self._after_stop_hooks = self._after_stop_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: close hook failed", self.name)
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def detach(self) -> Path:
        """Stop managing this VM but leave QEMU running; return its runtime folder.

        For debugging (``--gondolin-keep-vm``): the host's agent, QMP and
        network connections close (the guest's link goes down), the agent
        socket accepts a new client (``gondolin attach``), and the folder
        stays until the next run's reaper. QEMU outlives this process only if
        launched with ``VMConfig(die_with_parent=False)``. Raises VMError
        unless the VM is running.
        """
        try:
            self._set_state(Runstate.CLOSED, only_from=(Runstate.RUNNING,))
        except StateError as exc:
            raise VMError(f"{self.name} is not running; only a running VM can be detached") from exc
        rundir = self.rundir
        assert rundir is not None, "a VM that reached RUNNING has its folder"
        _LIVE.discard(self)
        self._close_hooks, self._after_stop_hooks = [], []
        self._disconnect(stop_qemu=False)
        return rundir

    def _disconnect(self, *, stop_qemu: bool) -> None:
        """Close the agent channel, stop QEMU (or only let go of QMP), close the network."""
        if self._channel is not None:
            self._channel.close()
        if self._qemu is not None:
            if stop_qemu:
                self._qemu.stop()
            else:
                self._qemu.release()
        if self.network is not None:  # after QEMU: it never sees its link drop
            self.network.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} {self._state.value} pid={self.pid}>"

    # -- what the VM is doing ----------------------------------------------------

    def qemu_log(self) -> str:
        """QEMU's own stderr so far (empty if unavailable)."""
        return qemu_log_tail(self.rundir)

    def console_log(self) -> str:
        """The tail of the guest's serial console."""
        return console_tail(self.rundir)

    @property
    def alive(self) -> bool:
        """True while the VM is running and its QEMU process has not exited."""
        return self._state is Runstate.RUNNING and self._qemu is not None and self._qemu.running

    def exited(self, grace: float = 0.0) -> bool:
        """Whether QEMU has exited, waiting up to ``grace`` s once the agent connection is gone.

        A guest that panics or powers off takes QEMU down a moment after its
        agent connection drops, so "connection lost" alone does not tell a
        dying VM from a live one. While the connection is up there is no wait.
        """
        if self._qemu is None:
            return True
        connected = self._channel is not None and not self._channel.closed
        return self._qemu.exited(0.0 if connected else grace)

    @property
    def pid(self) -> int | None:
        return self._qemu.pid if self._qemu is not None else None

    @property
    def command(self) -> list[str]:
        return list(self._qemu.argv) if self._qemu is not None else []

    # -- network -------------------------------------------------------------------

    @require(Runstate.RUNNING)
    def configure_network(
        self, policy: NetworkPolicy | None = None, *, open_cassette: CassetteOpener | None = None
    ) -> Recorder:
        """Mediate the guest's traffic by ``policy`` from now on (default: deny all).

        Host-side only: no reboot, no restore. ``vm.http`` becomes a fresh
        recorder (redacting the policy's secrets) and is returned; the
        secrets' placeholders go into the environment of later ``exec``
        calls. With ``open_cassette``, allowed requests are replayed from or
        recorded into the cassette it opens (given the secret store, so the
        cassette redacts what the guest sees as placeholders). Raises VMError
        if the VM has no network of its own.
        """
        if self.network is None:
            raise VMError(f"{self.name} has no network driver (VMConfig.network is off)")
        self.http = recorder = apply_policy(self.network, policy, open_cassette)
        return recorder

    @require(Runstate.RUNNING)
    def forward(self, guest_port: int, host_port: int = 0) -> int:
        """Listen on the host's ``127.0.0.1:host_port`` (0: a free port); return the port.

        Each connection to it is opened into the guest's ``guest_port``
        (the host dials the guest through its network stack) and relayed as
        a raw stream, recorded in ``vm.http.tcp_flows``. The port closes with
        the VM and on every restore (the guest's past servers are gone).
        Raises ConfigError for a bad port, NetworkPolicyError if it cannot be
        bound, VMError if the VM has no network of its own.
        """
        if self.network is None:
            raise VMError(f"{self.name} has no network driver (VMConfig.network is off)")
        return self.network.forward(guest_port, host_port)

    # -- disk-only checkpoints (internal snapshots: the InternalSnapshots base) ----

    def export_disk(self, target: Path, metadata: dict[str, object]) -> None:
        """Copy this VM's current disk (guest view, minus the image) to ``target`` with metadata."""
        if self.rundir is None:
            raise SnapshotError(f"{self.name} has no disk")
        ckpt.export_disk(self.rundir / "disk.qcow2", self._backing, target, metadata)

    @require(*LAUNCHED)
    def checkpoint(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Sync and stop the VM, keep its disk as checkpoint ``path``; the VM is closed afterwards.

        Disk only (Gondolin semantics): RAM, processes and tmpfs paths are not kept.
        """
        target = Path(path)
        channel = self._require_channel()
        try:
            channel.exec(
                ["sync"],
                input=None,
                env=None,
                cwd=None,
                timeout=CHECKPOINT_SYNC_TIMEOUT,
                max_output=4096,
            )
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise SnapshotError(f"{self.name}: sync before checkpoint failed: {exc}") from exc
        qemu = self._monitor()
        qemu.cmd("stop")
        # Exit QEMU so every qcow2 metadata cache is on disk before we read the file.
        qemu.stop()
        try:
            self.export_disk(target, checkpoint_metadata(self.config))
        finally:
            self.close()
        return Checkpoint.load(target, config=self.config)


class Checkpoint:
    """A disk-only checkpoint file; :meth:`resume` boots new VMs from it."""

    def __init__(
        self, path: Path, metadata: dict[str, object], config: VMConfig | None = None
    ) -> None:
        self.path = path
        self.metadata = metadata
        self._config = config

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, config: VMConfig | None = None) -> Checkpoint:
        """Open checkpoint ``path`` (raises SnapshotError if it is not one)."""
        p = Path(path).resolve()
        return cls(p, ckpt.read_trailer(p), config)

    @property
    def build_id(self) -> str:
        return str(self.metadata.get("image_build_id"))

    def resume(
        self,
        *,
        memory: object = None,
        accel: str | None = None,
        image: str | None = None,
        name: str = "resumed",
    ) -> VM:
        """Boot a new VM whose disk starts as this checkpoint's. Each resume gets its own overlay."""
        config = resume_config(
            self.path, self.metadata, self._config, memory=memory, accel=accel, image=image
        )
        ckpt.ensure_backing(self.path, config.image.rootfs)
        return VM.launch(config, name=name, backing=self.path)
