"""Running ``@pytest.mark.sandboxed`` items in a guest test worker.

Per guest key (image, memory, CPUs) the session prepares one *sandbox*:

1. a VM from the cached ready snapshot (or a cold boot, see ``vm/warm.py``);
2. the project tree and the host's pytest copied in (``guestfiles.py``);
3. the test worker started there; it collects the files holding sandboxed
   items and waits for commands;
4. an internal snapshot ``WORKER_TAG`` saved *after* collection, so no test
   pays for Python start-up or collection again.

Each item then restores that snapshot (RAM + devices + disk: the worker is
back to "collected, waiting", even if the previous test killed it), gets
fresh entropy and the host's clock, runs, and its reports are replayed on
the host. If QEMU itself died, the next item prepares a new sandbox.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import pytest_gondolin.guestfiles as guestfiles
from pytest_gondolin.errors import (
    AgentError,
    AgentTimeout,
    ConfigError,
    GondolinError,
    NetworkPolicyError,
    VMError,
)
from pytest_gondolin.fixtures import GuestKey, VMFactory
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer, open_cassette
from pytest_gondolin.netpolicy.http.cassette_values import CassetteError
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.runner import MAX_WORKER_LINE, WorkerClient, worker_args
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.commands import GUEST_ENV
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.pool import RestorePool
from pytest_gondolin.vm.warm import launch_clean
from pytest_gondolin.worker_messages import Collected, Failure, RunOutcome

log = logging.getLogger(__name__)

WORKER_TAG = "gondolin-worker"
#: VMs per sandbox taking turns: while a test runs in one, the other is
#: restored in the background. Two cover the restore (~0.2 s under TCG);
#: with one CPU there is nothing to overlap.
PREFETCH_LANES = 2 if (os.cpu_count() or 1) > 1 else 1
#: The worker's output stream is long-lived (every report of the session);
#: each run's volume is bounded by the runner instead.
WORKER_MAX_OUTPUT = 1 << 50
#: Python start-up plus collection in the guest: ~5 s under TCG for a small
#: project; 300 s leaves room for big suites on a loaded CI host.
WORKER_START_TIMEOUT = 300.0
#: A sandboxed test without its own timeout still may not hang the session forever.
DEFAULT_RUN_TIMEOUT = 3600.0
#: How long a VM whose agent connection dropped gets to show it is dying (a
#: panicked guest takes QEMU down within milliseconds; this is ample).
VM_EXIT_GRACE = 2.0
#: Worker stderr kept for crash reports.
STDERR_TAIL_BYTES = 16 * 1024


class VMTransport:
    """The worker's stdin/stdout over the agent channel (a :class:`~pytest_gondolin.runner.WorkerTransport`)."""

    def __init__(self, vm: VM, proc: AgentProcess) -> None:
        self.vm = vm
        self.proc = proc
        self._buf = bytearray()
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0

    def rewind(self) -> None:
        """Forget buffered output and the stderr tail: the guest was restored to a snapshot."""
        self._buf.clear()
        self._stderr.clear()
        self._stderr_size = 0

    def send(self, data: bytes) -> None:
        self.proc.write_stdin(data)

    def _take(self, chunk: tuple[str, bytes]) -> None:
        """Route one output chunk: stdout to the line buffer, stderr to the bounded tail."""
        stream, data = chunk
        if stream == "stdout":
            self._buf += data
            return
        self._stderr.append(data)
        self._stderr_size += len(data)
        while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr) > 1:
            self._stderr_size -= len(self._stderr.popleft())

    def _pop(self, size: int) -> bytes:
        line = bytes(self._buf[:size])
        del self._buf[:size]
        return line

    def recv_line(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                return self._pop(nl + 1)
            if len(self._buf) > MAX_WORKER_LINE:
                return self._pop(len(self._buf))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from the guest worker within {timeout:g} s")
            try:
                chunk = self.proc.read(remaining)
            except AgentTimeout as exc:
                raise TimeoutError(str(exc)) from exc
            if chunk is None:
                return self._pop(len(self._buf)) if self._buf else None
            self._take(chunk)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except (AgentError, VMError):
            return None

    def interrupt(self) -> None:
        try:
            self.vm.exec(["kill", "-USR1", str(self.proc.pid)], timeout=10)
        except GondolinError as exc:
            log.debug("could not ask the worker for a stack dump: %s", exc)

    def kill(self) -> None:
        try:
            self.proc.kill(signal.SIGKILL)
        except GondolinError as exc:
            log.debug("could not kill the worker: %s", exc)

    def stderr_tail(self) -> str:
        # Take in what already arrived (without waiting), so a report has the latest stderr.
        while True:
            try:
                chunk = self.proc.read(0)
            except (AgentError, VMError):
                break
            if chunk is None:
                break
            self._take(chunk)
        return b"".join(self._stderr).decode(errors="replace")


def _guest_args(args: list[str]) -> list[str]:
    """Drop ``-p NAME`` plugin loads: host plugins (xdist, cov, ...) are not installed in
    the guest. ``-p no:NAME`` (disabling) is kept; conftest plugins load there anyway."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "-p" and i + 1 < len(args) and not args[i + 1].startswith("no:"):
            skip = True
            continue
        out.append(arg)
    return out


def _finish_cassette(player: CassettePlayer, outcome: RunOutcome) -> RunOutcome:
    """Save what was recorded; a request the cassette could not answer fails the test."""
    try:
        player.save()
        player.check(allow_unused=True)
    except CassetteError as exc:
        return _fail_call(outcome, f"cassette: {exc}")
    return outcome


def _fail_call(outcome: RunOutcome, message: str) -> RunOutcome:
    """Make the call report fail with ``message`` (or, if it already failed, show it as a section).

    Reports are the serialized dicts the worker sent, already validated.
    """
    reports = []
    done = False
    for report in outcome.reports:
        if not done and report.get("when") == "call":
            if report.get("outcome") == "passed":
                report = {**report, "outcome": "failed", "longrepr": message}
            else:
                report = {
                    **report,
                    "sections": [*report.get("sections", []), ["gondolin: cassette", message]],
                }
            done = True
        reports.append(report)
    if not done:
        return outcome
    return dataclasses.replace(outcome, reports=tuple(reports))


@dataclasses.dataclass(eq=False)
class _Lane:
    """One VM running the worker; the sandbox's VMs take turns (``vm/pool.py``)."""

    vm: VM
    transport: VMTransport
    client: WorkerClient

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def alive(self) -> bool:
        return self.vm.alive

    def close(self) -> None:
        self.vm.close()


class Sandbox:
    """A prepared guest worker, restored before each item.

    With :data:`PREFETCH_LANES` > 1 the sandbox keeps clones of the prepared
    VM (started from its snapshot, no second collection) and restores one in
    the background while a test runs in another, so a test rarely waits for
    a restore. The lanes take turns through a :class:`RestorePool`, the same
    one behind the ``vm`` fixture.
    """

    def __init__(
        self, factory: VMFactory, config: pytest.Config, key: GuestKey, paths: list[str]
    ) -> None:
        self.factory = factory
        self.config = config
        self.key = key
        self.paths = paths
        self.vm: VM | None = None  # the VM that ran (or runs) the latest test
        self.collected: Collected | None = None
        self._lanes: RestorePool[_Lane] | None = None

    # -- preparing -------------------------------------------------------------

    def prepare(self) -> Collected:
        started = time.monotonic()
        vmconfig = self.factory.vm_config(self.key)
        self.factory.count += 1
        name = f"sandbox{self.factory.count}"
        vm = launch_clean(vmconfig, name=name, progress=self.factory.progress)
        self.factory.adopt(vm)
        self.vm = vm
        rootdir = Path(self.config.rootpath)
        say = self.factory.progress
        say(f"{name}: copying the project tree ({rootdir}) and pytest into the guest")
        vm.write_file("/tmp/gondolin-project.tar", guestfiles.pack_project(rootdir))
        vm.write_file("/tmp/gondolin-libs.tar", guestfiles.pack_distributions())
        requirements = self.factory.settings.requirements
        if requirements:
            folder = guestfiles.requirements_dir(requirements, progress=say)
            vm.write_file(
                "/tmp/gondolin-reqs.tar",
                guestfiles.pack_folder(folder, guestfiles.GUEST_REQUIREMENTS),
            )
            vm.exec(
                "tar -xf /tmp/gondolin-reqs.tar -C / && rm /tmp/gondolin-reqs.tar",
                check=True,
                timeout=300,
            )
        vm.exec(
            "tar -xf /tmp/gondolin-project.tar -C / && tar -xf /tmp/gondolin-libs.tar -C / "
            "&& rm /tmp/gondolin-project.tar /tmp/gondolin-libs.tar",
            check=True,
            timeout=300,
        )
        invocation = str(self.config.invocation_params.dir)
        vm.exec(["mkdir", "-p", invocation], check=True)
        pythonpath = [guestfiles.GUEST_SITE, "/run/gondolin/py", guestfiles.GUEST_REQUIREMENTS]
        if (rootdir / "src").is_dir():
            pythonpath.append(str(rootdir / "src"))
        env = {
            **GUEST_ENV,
            "PYTHONPATH": ":".join(pythonpath),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "GONDOLIN_GUEST": "1",
        }
        args = [
            "python3",
            "-s",
            "-m",
            "pytest_gondolin.guest.worker",
            *_guest_args(worker_args(self.config)),
            "-p",
            "gondolin",
            *self.paths,
        ]
        say(f"{name}: starting the guest test worker (pytest start-up and collection)")
        proc = vm.spawn(args, env=env, cwd=invocation, max_output=WORKER_MAX_OUTPUT)
        transport = VMTransport(vm, proc)
        client = WorkerClient(transport)
        client.on_query = self._on_query
        self.collected = collected = client.start(WORKER_START_TIMEOUT)
        # sync: the unpacked tree must not be dirty in the snapshot, or every
        # restore would replay its writeback (kernel work in each test's time).
        # The page cache holds the sources pytest and the project were imported
        # from; the worker has them in memory now. Dropped, the snapshot is
        # smaller and every restore loads less (together: 173 -> 136 ms a test).
        vm.exec(["sh", "-c", "sync && echo 1 > /proc/sys/vm/drop_caches"], check=True)
        vm.save_internal(WORKER_TAG)
        lanes = [_Lane(vm, transport, client)]
        for _ in range(1, PREFETCH_LANES):
            try:
                lanes.append(self._clone(lanes[0], vmconfig))
            except GondolinError as exc:
                log.warning(
                    "no prefetch clone of %s (tests run one restore at a time): %s", name, exc
                )
                break
        # No launch: a lane costs a whole preparation; when every lane died,
        # sandboxes.py prepares a new sandbox.
        self._lanes = RestorePool[_Lane](None, self._restore, size=len(lanes), name="sandbox")
        for lane in lanes:
            self._lanes.add(lane)
        say(
            f"{name}: worker ready with {len(collected.nodeids)} items in {time.monotonic() - started:.1f} s"
            + (f" ({len(lanes)} VMs take turns)" if len(lanes) > 1 else "")
        )
        return collected

    def _clone(self, lane: _Lane, vmconfig: VMConfig) -> _Lane:
        """A second VM started from ``lane``'s worker snapshot: no boot, no second collection."""
        assert self.collected is not None and lane.vm.rundir is not None
        self.factory.count += 1
        lane.vm.pause()  # its disk holds the snapshot; it must not change while copied
        try:
            vm = VM.launch(
                vmconfig,
                name=f"sandbox{self.factory.count}",
                loadvm_disk=lane.vm.rundir / "disk.qcow2",
                loadvm_tag=WORKER_TAG,
            )
        finally:
            lane.vm.resume()
        self.factory.adopt(vm)
        proc = vm.attach(lane.transport.proc, max_output=WORKER_MAX_OUTPUT)
        transport = VMTransport(vm, proc)
        client = WorkerClient(transport)
        client.on_query = self._on_query
        client.adopt(self.collected)
        return _Lane(vm, transport, client)

    @property
    def alive(self) -> bool:
        return self._lanes is not None and any(lane.alive for lane in self._lanes.vms)

    # -- running -----------------------------------------------------------------

    def _restore(self, lane: _Lane) -> None:
        lane.vm.load_internal(WORKER_TAG, preserve=[lane.transport.proc])
        lane.transport.rewind()
        lane.client.rewind()

    def run(
        self,
        nodeid: str,
        *,
        timeout: float | None,
        network: Mapping[str, Any] | None = None,
        cassette: Path | None = None,
    ) -> RunOutcome | Failure:
        """Run the item on a fresh VM (restored in the background, or now), with this test's
        network options applied on the host."""
        started = time.monotonic()
        try:
            if self._lanes is None:
                raise VMError("the sandbox is not prepared")
            lane = self._lanes.take()
        except GondolinError as exc:
            return Failure.from_exception(exc, duration=time.monotonic() - started)
        self.vm = lane.vm
        restored = time.monotonic()
        try:
            player = self._configure_network(network or {}, cassette)
        except GondolinError as exc:
            self._lanes.give_back(lane)
            return Failure.from_exception(exc, duration=time.monotonic() - started)
        seed = int.from_bytes(secrets.token_bytes(8), "big")
        try:
            outcome = lane.client.run(
                nodeid, seed=seed, timeout=timeout or DEFAULT_RUN_TIMEOUT, env=lane.vm.secret_env()
            )
        except GondolinError as exc:
            # A worker that broke protocol was killed; the next restore revives it.
            self._lanes.give_back(lane)
            return Failure.from_exception(exc, duration=time.monotonic() - started)
        log.debug(
            "%s on %s: waited %.0f ms for a fresh VM, run %.0f ms",
            nodeid,
            lane.vm.name,
            (restored - started) * 1000,
            (time.monotonic() - restored) * 1000,
        )
        if player is not None:
            outcome = _finish_cassette(player, outcome)
        if outcome.failure is not None and (
            not lane.vm.alive or lane.vm.exited(grace=VM_EXIT_GRACE)
        ):
            console = lane.vm.console_log()
            failure = outcome.failure
            detail = failure.detail + (
                "\n--- guest console (tail) ---\n" + console[-3000:] if console else ""
            )
            outcome = RunOutcome(
                outcome.nodeid,
                outcome.reports,
                outcome.warnings,
                Failure(
                    failure.kind, failure.headline + " (the VM died)", detail, failure.duration
                ),
                outcome.duration,
            )
        # A dead lane is not restored; the next take() closes and drops it.
        self._lanes.give_back(lane)
        return outcome

    def _configure_network(
        self, network: Mapping[str, Any], cassette: Path | None
    ) -> CassettePlayer | None:
        """Apply this test's policy (and cassette) on the host; no guest change, no reboot."""
        assert self.vm is not None
        policy = NetworkPolicy.from_options(**{k: v for k, v in network.items() if k != "cassette"})
        if self.vm.network is None:
            return None
        recorder = self.vm.configure_network(policy)
        if cassette is None:
            return None
        driver = self.vm.network
        player = open_cassette(
            cassette, self.factory.settings.record_mode, secret_store=driver.secrets
        )
        driver.configure(policy, driver.secrets, recorder, player)
        return player

    def _on_query(self, kind: str, args: dict[str, Any]) -> Any:
        """Answer the running test's questions about its traffic (the ``http_traffic`` fixture)."""
        recorder = getattr(self.vm, "http", None)
        if kind != "http":
            raise ConfigError(f"unknown query {kind!r}")
        if recorder is None:
            raise NetworkPolicyError("this VM has no network recorder")
        op = args.get("op")
        if op == "list":
            return [exchange.to_dict() for exchange in recorder.requests]
        if op == "clear":
            recorder.clear()
            return None
        if op == "stub":
            try:
                body = base64.b64decode(str(args.get("body", "")), validate=True)
                payload = json.loads(args["json"]) if args.get("json") is not None else None
                recorder.stub(
                    str(args["method"]),
                    str(args["url"]),
                    status=int(args.get("status", 200)),
                    body=body,
                    json=payload,
                    headers=dict(args.get("headers") or {}),
                )
            # RecursionError: a deeply nested json= (the guest chooses it) must
            # fail this query, not escape into pytest as an internal error.
            except (KeyError, TypeError, ValueError, RecursionError) as exc:
                raise ConfigError(f"bad stub from the guest: {str(exc)[:200]}") from exc
            return None
        raise ConfigError(f"unknown http query op {op!r}")

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.close()
        if self.vm is not None:
            self.vm.close()
