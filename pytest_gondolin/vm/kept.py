"""VMs kept running after a failing test (``--gondolin-keep-vm``), for ``gondolin attach``.

Keeping a VM detaches it from the pytest process (:meth:`VM.detach`) and
writes :data:`~pytest_gondolin.vm.reaper.KEPT_MARKER` into its runtime
folder: who kept it, for which test, with what image. The folder is
``<runtime>/<owner pid>-<id>``; ``id`` (8 hex digits) names the VM on the
command line. Nothing else changes: once the owner is gone the VM is an
orphan like any other, so the next pytest run's reaper removes it ("clean
up on the next run"); the CLI reaps with ``spare_kept=True``.

The marker lives in a private (0700) folder, but it is still parsed as
untrusted input: bounded size, every field checked.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import ConfigError, VMError
from pytest_gondolin.vm import reaper
from pytest_gondolin.vm.channel import AgentChannel
from pytest_gondolin.vm.machine import VM

#: A marker is a few hundred bytes; anything larger is not ours.
MAX_MARKER_BYTES = 64 * 1024
#: The agent answers a sync in milliseconds; 15 s covers a loaded TCG host.
ATTACH_SYNC_TIMEOUT = 15.0
#: After SIGKILL a QEMU is gone within milliseconds; bound the wait anyway.
KILL_WAIT = 5.0


@dataclass(frozen=True)
class VMFolder:
    """One VM runtime folder, kept or not."""

    id: str
    rundir: Path
    owner_pid: int
    qemu_pid: int | None
    #: Set for kept VMs: the contents of the marker.
    kept: KeptInfo | None

    @property
    def agent_socket(self) -> Path:
        return self.rundir / "agent.sock"

    @property
    def running(self) -> bool:
        """True if the folder's QEMU is alive and runs this folder."""
        return self.qemu_pid is not None and _qemu_runs(self.qemu_pid, self.rundir)

    @property
    def owner_alive(self) -> bool:
        return reaper.pid_alive(self.owner_pid)


@dataclass(frozen=True)
class KeptInfo:
    """What the marker of a kept VM records."""

    nodeid: str
    name: str
    created: float
    image: str
    accel: str
    memory_mib: int

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "name": self.name,
            "created": self.created,
            "image": self.image,
            "accel": self.accel,
            "memory_mib": self.memory_mib,
        }

    @classmethod
    def parse(cls, raw: bytes) -> KeptInfo:
        """Parse a marker; raises ConfigError for anything that is not one."""
        if len(raw) > MAX_MARKER_BYTES:
            raise ConfigError(f"kept-VM marker is larger than {MAX_MARKER_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"kept-VM marker is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("kept-VM marker is not a JSON object")

        def text(key: str) -> str:
            value = data.get(key)
            if not isinstance(value, str) or len(value) > 4096:
                raise ConfigError(f"kept-VM marker: {key!r} must be a string, got {value!r:.80}")
            return value

        created = data.get("created")
        memory = data.get("memory_mib")
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise ConfigError(f"kept-VM marker: 'created' must be a number, got {created!r:.80}")
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ConfigError(
                f"kept-VM marker: 'memory_mib' must be an integer, got {memory!r:.80}"
            )
        return cls(
            nodeid=text("nodeid"),
            name=text("name"),
            created=float(created),
            image=text("image"),
            accel=text("accel"),
            memory_mib=memory,
        )


def vm_id(rundir: Path) -> str:
    """The short id of a VM folder (the part after ``<owner pid>-``)."""
    return rundir.name.split("-", 1)[-1]


def keep(vm: VM, *, nodeid: str) -> VMFolder:
    """Detach ``vm`` from this process, leave it running and mark it kept; return its folder.

    Raises VMError if the VM is not running. The VM survives this process
    only if it was launched with ``VMConfig(die_with_parent=False)``.
    """
    info = KeptInfo(
        nodeid=nodeid,
        name=vm.name,
        created=time.time(),
        image=f"{vm.config.image.name}-{vm.config.image.build_id}",
        accel=vm.config.accel,
        memory_mib=vm.config.memory_mib,
    )
    rundir = vm.detach()
    tmp = rundir / f".{reaper.KEPT_MARKER}.tmp"
    try:
        tmp.write_text(json.dumps(info.to_json(), indent=1))
        tmp.replace(rundir / reaper.KEPT_MARKER)
    except OSError as exc:
        raise VMError(f"cannot mark {rundir} as kept: {exc}") from exc
    folder = read_folder(rundir)
    assert folder is not None
    return folder


def read_folder(rundir: Path) -> VMFolder | None:
    """Describe the runtime folder ``rundir``; None if it is not a VM folder."""
    owner_text, sep, ident = rundir.name.partition("-")
    if not sep or not owner_text.isdigit() or not ident:
        return None
    if paths.owned_dir_problem(rundir) is not None:
        return None  # a symlink or someone else's folder: never looked into
    try:
        qemu_pid: int | None = int((rundir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        qemu_pid = None
    kept: KeptInfo | None = None
    marker = rundir / reaper.KEPT_MARKER
    if marker.exists():
        try:
            with marker.open("rb") as fh:
                kept = KeptInfo.parse(fh.read(MAX_MARKER_BYTES + 1))
        except (OSError, ConfigError):
            # Still a kept VM (the marker exists); show what we can.
            kept = KeptInfo("?", "?", 0.0, "?", "?", 0)
    return VMFolder(ident, rundir, int(owner_text), qemu_pid, kept)


def list_folders(*, kept_only: bool = True) -> list[VMFolder]:
    """VM runtime folders of this user, oldest first; by default only kept ones."""
    found: list[VMFolder] = []
    for rundir in reaper.vm_folders():
        folder = read_folder(rundir)
        if folder is None or (kept_only and folder.kept is None):
            continue
        found.append(folder)
    found.sort(key=lambda f: f.kept.created if f.kept else 0.0)
    return found


def find(ident: str) -> VMFolder:
    """The kept VM whose id starts with ``ident``. Raises ConfigError if none or several match."""
    if not ident or not all(c in "0123456789abcdef" for c in ident.lower()):
        raise ConfigError(f"{ident!r} is not a VM id (8 hex digits, as `gondolin ps` shows)")
    matches = [f for f in list_folders() if f.id.startswith(ident.lower())]
    if not matches:
        raise ConfigError(f"no kept VM with id {ident!r}; `gondolin ps` lists the kept VMs")
    if len(matches) > 1:
        ids = ", ".join(f.id for f in matches)
        raise ConfigError(f"id {ident!r} is ambiguous: it matches {ids}")
    return matches[0]


def kill(folder: VMFolder) -> bool:
    """Stop a kept VM's QEMU and remove its folder. Returns True if a QEMU was running.

    Raises VMError if the QEMU is still alive after :data:`KILL_WAIT`.
    """
    pid = reaper.stop_qemu(folder.rundir)
    if pid is None and folder.running:
        raise VMError(f"could not stop QEMU {folder.qemu_pid} of kept VM {folder.id}")
    if pid is not None:
        deadline = time.monotonic() + KILL_WAIT
        while reaper.pid_alive(pid) and _qemu_runs(pid, folder.rundir):
            if time.monotonic() > deadline:
                raise VMError(f"QEMU {pid} of {folder.id} did not exit after SIGKILL")
            time.sleep(0.02)
    shutil.rmtree(folder.rundir, ignore_errors=True)
    return pid is not None


def connect(folder: VMFolder, *, timeout: float = ATTACH_SYNC_TIMEOUT) -> AgentChannel:
    """Open an agent channel to a kept VM, resynchronised and ready for commands.

    Raises VMError if the VM is not running or its agent does not answer
    (QEMU serves one client per socket: another ``gondolin attach`` may hold it).
    """
    if not folder.running:
        raise VMError(
            f"kept VM {folder.id} is not running any more; `gondolin kill {folder.id}` removes it"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(folder.agent_socket))
    except OSError as exc:
        sock.close()
        raise VMError(f"cannot connect to {folder.agent_socket}: {exc}") from exc
    channel = AgentChannel(sock, name=f"attach-{folder.id}")
    try:
        # The previous client (pytest) may have left a half-sent frame: sync drops it.
        channel.sync(timeout=timeout)
    except (TimeoutError, VMError) as exc:
        channel.close()
        raise VMError(
            f"the agent of kept VM {folder.id} did not answer within {timeout:g} s "
            f"(is another `gondolin attach {folder.id}` connected?): {exc}"
        ) from exc
    return channel

    return True


def _qemu_runs(pid: int, rundir: Path) -> bool:
    """True if process ``pid`` is alive and its command line names ``rundir`` (no recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(rundir).encode() in cmdline
