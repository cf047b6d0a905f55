"""The guest worker's start-up, cached across runs: a started worker, and a collected one.

Two cached states of a sandboxed session's first VM, so that a re-run skips
what an earlier run already did:

* **started**: a layer (``vm/layers.py``) over the environment layers whose
  function starts the guest test worker in waiting mode
  (:data:`~pytest_gondolin.guest.worker.WAIT_ENV`): Python is up, pytest
  and its built-in plugins are imported, nothing of the project has been
  read. Its key is the worker's start-up command line and environment; the
  layer stack around it adds the image, the guest's packages and the
  host's interpreter and environment. The project files are not part of
  it: a run copies its tree in, then sends the ``go`` carrying its
  arguments, working folder and per-run environment, and the worker
  collects. Guarantees are the layers' (a lock per key, temporary file and
  rename, a corrupt file rebuilt, a read-only cache used and not written,
  least recently used files evicted).
* **collected**: the VM right after collection (the session's worker
  snapshot), cached under ``<cache>/worker-snapshots/<key>.qcow2`` where
  the key adds the content of every copied tree (file names, modes and
  bytes; not modification times) and the ``go``. An exact re-run restores
  it and runs its first test at once. Same guarantees: copied (the one
  copy the session makes anyway, for its other lanes) under a lock (held
  long by another writer, the write is skipped: it is only a cache) to a
  temporary name and renamed, a file that does not load is removed and the
  session starts the worker as above, a read-only cache is used and not
  written, at most ``collected_files.MAX_COLLECTED`` files are kept (least recently
  used go first).

The worker's process must outlive the snapshot: the guest's agent keeps it
running under its request id, so the host only needs that id and its pid to
attach again (``AgentChannel.attach``, as for a clone). Both are written in
the guest (:data:`STATE_FILE`) before each snapshot and read back, checked,
after a restore: they travel with the snapshot, so they can never belong to
another one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from pytest_gondolin.errors import AgentError, GondolinError, VMError
from pytest_gondolin.guest.startup import plugins_to_preload
from pytest_gondolin.guest.worker import MAX_WORKER_LINE, WAIT_ENV, WAITING_LINE, encode_line
from pytest_gondolin.sandbox.collected_files import (
    collected_path,
    remove_collected,
    store_collected,
)
from pytest_gondolin.sandbox.messages import Collected, parse_message
from pytest_gondolin.sandbox.transports import VMTransport
from pytest_gondolin.vm.agent_calls import ExecCall
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.disk_backed import back_with_disk
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.layers import Layer
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.overlay import copy_disk

__all__ = [
    "STATE_FILE",
    "Phases",
    "StartedWorker",
    "TreeMembers",
    "collected_key",
    "keep_snapshot",
    "members_of",
    "preload_modules",
    "restore_collected",
    "runnable_here",
    "started_worker_layer",
    "tree_digest",
    "tree_members",
    "uncollected",
]

log = logging.getLogger(__name__)

#: In the guest: the waiting (or collected) worker's request id, pid and what it collected.
STATE_FILE: Final = "/var/tmp/gondolin-worker.json"
#: Where :attr:`StartedWorker.files` is put before it is unpacked (a tmpfs).
FILES_TAR: Final = "/var/tmp/gondolin-worker-files.tar"
#: Largest state file read back: the collected line plus a little.
MAX_STATE_BYTES: Final = MAX_WORKER_LINE + 64 * 1024
#: Python start-up and importing pytest under TCG take a few seconds; a loaded CI host more.
WAIT_TIMEOUT: Final = 300.0
#: The ``-p`` name of the worker's own plugin (``sandbox/guest_worker.py``).
GUEST_PLUGIN: Final = "gondolin"
#: Part of every key: a change in what these states hold makes new ones.
CACHE_FORMAT: Final = "worker-cache 1"
#: Agent request ids and guest pids are positive and below these.
_MAX_ID: Final = 1 << 32
_MAX_PID: Final = 1 << 22


class Phases:
    """How long each step of a preparation took (a log line; ``bench/rerun.py`` reads it)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self._marks.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._marks)


class _Detached:
    """The link of a process handle used only to name a process to ``VM.attach``."""

    name = "detached"

    @property
    def condition(self) -> object:
        raise VMError("a detached process handle has no channel")

    def send_stdin(self, call: ExecCall, data: bytes, deadline: float | None) -> None:
        raise VMError("a detached process handle has no channel")

    def send_stdin_eof(self, call: ExecCall, deadline: float | None) -> None:
        raise VMError("a detached process handle has no channel")

    def send_signal(self, call: ExecCall, signal: int) -> None:
        raise VMError("a detached process handle has no channel")

    def abandon(self, call: ExecCall) -> None:
        pass


def _named_process(req_id: int, pid: int, argv: list[str]) -> AgentProcess:
    """A handle naming the guest process ``pid`` run under agent request ``req_id`` (for attach)."""
    call = ExecCall(0, streaming=True, pid=pid)
    call.id = req_id
    return AgentProcess(_Detached(), call, argv)  # type: ignore[arg-type]


@dataclass(eq=False)
class StartedWorker:
    """The started-worker layer's worker: how it is started, and its process once known."""

    argv: list[str]
    env: dict[str, str]
    max_output: int
    #: A tar unpacked at ``/`` before the worker starts (the host's venv: its interpreter).
    files: bytes = field(default=b"", repr=False)
    #: Set when this run started the worker (the layer was built, not restored).
    proc: AgentProcess | None = field(default=None, repr=False)
    transport: VMTransport | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        files = tree_digest([self.files]) if self.files else ""
        text = json.dumps([CACHE_FORMAT, self.argv, sorted(self.env.items()), files])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def start(self, vm: VM) -> None:
        """Start the worker in waiting mode in ``vm``; return once it waits for its go."""
        if self.files:
            back_with_disk(vm, [self.files])  # a venv under /tmp or /root goes to the guest's disk
            vm.write_file(FILES_TAR, self.files)
            vm.exec(f"tar -xf {FILES_TAR} -C / && rm {FILES_TAR}", check=True, timeout=WAIT_TIMEOUT)
        proc = vm.spawn(
            self.argv, env={**self.env, WAIT_ENV: "1"}, cwd="/", max_output=self.max_output
        )
        transport = VMTransport(vm, proc)
        try:
            line = transport.recv_line(WAIT_TIMEOUT)
        except TimeoutError:
            transport.kill()
            raise AgentError(
                f"the guest test worker did not start within {WAIT_TIMEOUT:g} s\n"
                f"worker stderr (tail):\n{transport.stderr_tail()[-3000:]}"
            ) from None
        if line != WAITING_LINE:
            transport.kill()
            raise AgentError(
                f"the guest test worker did not reach its go: said {(line or b'')[:200]!r}\n"
                f"worker stderr (tail):\n{transport.stderr_tail()[-3000:]}"
            )
        write_state(vm, proc)
        self.proc, self.transport = proc, transport

    def attach(self, vm: VM) -> VMTransport:
        """The waiting worker's stdin and stdout in ``vm`` (started here, or restored with it)."""
        if self.transport is not None and self.transport.vm is vm:
            return self.transport
        req_id, pid, _ = read_state(vm, self.argv)
        proc = vm.attach(_named_process(req_id, pid, self.argv), max_output=self.max_output)
        return VMTransport(vm, proc)


def started_worker_layer(worker: StartedWorker) -> Layer:
    """The layer whose function starts ``worker`` and leaves it waiting for its go."""
    return Layer("started-worker", worker.key, worker.start)


def write_state(vm: VM, proc: AgentProcess, collected: Collected | None = None) -> None:
    """Record in the guest which process is the worker (and what it collected), for a later restore.

    One agent write to :data:`STATE_FILE` (a tmpfs: nothing to write back),
    no shell: spawning ``sh``, ``cat`` and ``sync`` cost ~0.17 s under TCG.
    The collected worker itself wrote back what collection wrote and dropped
    the guest's page cache before it sent its ``collected`` line
    (``guest/startup.py``: ``drop_page_cache``), so the snapshot taken next
    holds none: every restore of it loads less (measured: 173 -> 136 ms a test).
    """
    state: dict[str, object] = {"id": proc.call.id, "pid": proc.pid}
    if collected is not None:
        line = encode_line(
            {"t": "collected", "nodeids": list(collected.nodeids), "errors": list(collected.errors)}
        )
        state["collected"] = line.decode("ascii")
    vm.write_file(STATE_FILE, json.dumps(state).encode(), mode=0o600)


def read_state(vm: VM, argv: Sequence[str]) -> tuple[int, int, Collected | None]:
    """The worker's request id, pid and collection, read back from a restored guest.

    Everything read from the guest is checked; VMError names what is wrong.
    """
    try:
        raw = vm.read_file(STATE_FILE, max_size=MAX_STATE_BYTES)
        state = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:
        raise VMError(f"{vm.name}: no usable worker state in {STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict):
        raise VMError(f"{vm.name}: {STATE_FILE} is not a JSON object")
    req_id, pid = state.get("id"), state.get("pid")
    if not (
        type(req_id) is int and 0 < req_id < _MAX_ID and type(pid) is int and 0 < pid < _MAX_PID
    ):
        raise VMError(
            f"{vm.name}: {STATE_FILE} names no valid worker: id={str(req_id)[:40]}, pid={str(pid)[:40]}"
        )
    collected: Collected | None = None
    line = state.get("collected")
    if line is not None:
        if not isinstance(line, str):
            raise VMError(f"{vm.name}: {STATE_FILE}: 'collected' is not a string")
        try:
            message = parse_message(line.encode("utf-8", "surrogatepass"))
        except GondolinError as exc:
            raise VMError(f"{vm.name}: {STATE_FILE}: bad collected line: {exc}") from exc
        if not isinstance(message, Collected):
            raise VMError(f"{vm.name}: {STATE_FILE}: 'collected' holds a {type(message).__name__}")
        collected = message
    log.debug("%s: worker %r is request %d, pid %d", vm.name, list(argv)[:4], req_id, pid)
    return req_id, pid, collected


def preload_modules(session_args: Sequence[str]) -> list[str]:
    """The modules the worker's ``-p`` plugins load: an entry point's module, or the name itself.

    The guest carries the host's distributions, so their entry points are
    the host's; ``gondolin`` is this package's own guest plugin, not the
    host's entry point, and is loaded with the worker anyway.
    """
    entry_points = {ep.name: ep.module for ep in importlib.metadata.entry_points(group="pytest11")}
    names = [n for n in plugins_to_preload(session_args) if n != GUEST_PLUGIN]
    modules = [entry_points.get(name, name) for name in names]
    return [m for m in modules if m.replace(".", "").replace("_", "").isalnum()]


def send_go(
    transport: VMTransport,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    *,
    pause: bool = False,
) -> None:
    """Start the waiting worker's session: its arguments, working folder and per-run environment.

    ``pause``: the worker stops once configured (``sandbox/configured.py``).
    """
    go = {"t": "go", "argv": list(argv), "cwd": cwd, "env": dict(env), "pause": pause}
    transport.send(encode_line(go))


# -- the collected state ---------------------------------------------------------


def tree_members(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    """Each member of the tar ``data``: its name, type and what it unpacks to, not its times.

    The type is tar's one-character code; the third item digests the
    member's type, mode, link target and (a regular file's) bytes.
    """
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            header = [member.name, member.type.decode("latin-1"), member.mode, member.linkname]
            digest = hashlib.sha256(json.dumps(header).encode() + b"\n")
            if member.isfile():
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has content
                digest.update(hashlib.sha256(source.read()).digest())
            yield member.name, member.type.decode("latin-1"), digest.digest()


#: Each tar's members, as :func:`tree_members` gives them: read once, used for
#: the collected key (:func:`tree_digest`) and the configured record.
TreeMembers = list[list[tuple[str, str, bytes]]]


def members_of(tars: Sequence[bytes]) -> TreeMembers:
    """Every member of each of ``tars`` (:func:`tree_members`), each tar's in a list."""
    return [list(tree_members(data)) for data in tars]


def tree_digest(tars: Sequence[bytes] | TreeMembers) -> str:
    """A digest of what ``tars`` unpack to: names, types, modes, link targets and bytes, not times.

    ``tars`` may be given as their :func:`members_of` already.
    """
    digest = hashlib.sha256()
    for data in tars:
        for _, _, member in tree_members(data) if isinstance(data, bytes) else data:
            digest.update(member)
        digest.update(b"\0end of tar\0")
    return digest.hexdigest()


def collected_key(stack: str, tree: str, go: Mapping[str, object]) -> str:
    """``<lineage>-<digest>``: the layer stack (``vm/layers.stack_digest``) and go, then the tree.

    ``sandbox/worker_disk.py`` starts a lineage's new tree from a previous one's file.
    """
    family = hashlib.sha256(json.dumps([CACHE_FORMAT, stack, go], sort_keys=True).encode())
    tree_part = hashlib.sha256(json.dumps([family.hexdigest(), tree]).encode())
    return f"{family.hexdigest()[:16]}-{tree_part.hexdigest()[:32]}"


def restore_collected(
    config: VMConfig,
    key: str,
    tag: str,
    *,
    name: str,
    argv: Sequence[str],
    max_output: int,
    say: Callable[[str], None],
    taken: Path | None = None,
    on_launch: Callable[[VM], None] | None = None,
) -> tuple[VM, VMTransport, Collected] | None:
    """A VM restored from the cached collected state ``key``, its worker and what it collected.

    None when there is none, or it does not load (it is then removed when
    the cache can be written, and the session starts the worker itself).
    With ``taken`` (``sandbox/worker_disk.py``: the cached file, moved aside
    for this process), QEMU runs on that file in place instead of a copy;
    ``on_launch`` is given the VM as soon as QEMU runs.
    """
    cached = taken if taken is not None else collected_path(key)
    if not cached.exists():
        return None
    started = time.monotonic()
    try:
        vm = VM.launch(
            config, name=name, loadvm_disk=cached, loadvm_tag=tag, in_place=taken is not None
        )
    except FileNotFoundError:
        return None  # evicted by another process since exists()
    except VMError as exc:
        log.warning("cached worker snapshot %s did not load (%s); starting the worker", cached, exc)
        remove_collected(cached)
        return None
    if on_launch is not None:
        on_launch(vm)
    try:
        req_id, pid, collected = read_state(vm, argv)
        if collected is None:
            raise VMError(f"{vm.name}: {STATE_FILE} holds no collection")
        proc = vm.attach(_named_process(req_id, pid, list(argv)), max_output=max_output)
    except GondolinError as exc:
        remove_collected(cached)  # first: a VM running on it in place must not give it back
        vm.close()
        log.warning(
            "cached worker snapshot %s is not usable (%s); starting the worker", cached, exc
        )
        return None
    try:
        os.utime(cached)  # least recently used goes first
    except OSError:
        pass
    say(
        f"{name}: restored the cached collected worker ({len(collected.nodeids)} items) "
        f"in {time.monotonic() - started:.2f} s"
    )
    return vm, VMTransport(vm, proc), collected


def keep_snapshot(vm: VM, key: str) -> Path:
    """A copy of ``vm``'s disk, which holds its worker snapshot: cached for later runs as ``key``.

    The same copy is the source of the session's other VMs (clones): the
    cached file, or a private copy in the VM's folder when the cache cannot
    be written.
    """
    assert vm.rundir is not None, "a running VM has its folder"
    vm.pause()  # its disk must not change while copied
    try:
        disk = vm.rundir / "disk.qcow2"
        source = store_collected(disk, key)
        if source is None:
            source = vm.rundir / "worker-snapshot.qcow2"
            copy_disk(disk, source)
    finally:
        vm.resume()
    return source


def uncollected(config: pytest.Config, paths: Sequence[str], collected: Collected) -> str | None:
    """An item of the session in ``paths`` that a restored worker's ``collected`` lacks, if any.

    None too when that collection had errors (collecting again would meet them again).
    """
    session = config.pluginmanager.get_plugin("session")
    items = getattr(session, "items", None)
    if not isinstance(items, list) or collected.errors:
        return None
    ids, wanted = set(collected.nodeids), set(paths)
    for item in items:
        nodeid = getattr(item, "nodeid", None)
        if str(getattr(item, "path", "")) in wanted and nodeid not in ids:
            return str(nodeid)
    return None


def runnable_here(config: pytest.Config, collected: Collected) -> int:
    """How many of the session's items a worker that collected ``collected`` could run (at most)."""
    session = config.pluginmanager.get_plugin("session")
    items = getattr(session, "items", None)
    if not isinstance(items, list):
        return len(collected.nodeids)
    ids = set(collected.nodeids)
    return sum(1 for item in items if getattr(item, "nodeid", None) in ids)
