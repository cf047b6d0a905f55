"""A prepared guest worker: VMs that hold a collected pytest session and take turns.

Per guest key (image, memory, CPUs) the session prepares one
:class:`GuestWorker` (what it is made of, decided on the host: its Python,
environment and arguments, is :mod:`.worker_setup`'s):

1. a VM from the cached ready snapshot with its layers (``vm/layers.py``):
   the system packages, then the host's Python environment
   (:mod:`.host_environment`, or pytest) and the requirements, each layer
   keyed by its content, so an unchanged environment is not copied again;
   on top, the test worker (:mod:`pytest_gondolin.guest.worker`) started
   and waiting for its go (:mod:`.worker_cache`), also a cached layer;
2. the project tree (:mod:`.project_files`) copied in, at its host path;
3. the go: the worker collects the files holding sandboxed items and waits
   for commands;
4. an internal snapshot :data:`WORKER_TAG` saved *after* collection, so no
   test pays for Python start-up or collection again; its disk is copied
   into the cache, keyed by the tree's content and the worker's arguments,
   so a re-run with nothing changed restores it instead of steps 1-4 (a
   session with one test copies nothing: its VM runs on the cached file in
   place, and a new one is kept when the VM closes: :mod:`.worker_disk`);
5. with :data:`PREFETCH_LANES` > 1 and more than one test for this guest,
   clones of that VM started from the snapshot in the background once the
   first test has its VM (no second collection): the *lanes*, which take
   turns through a :class:`~pytest_gondolin.vm.pool.RestorePool`, the same
   one behind the ``vm`` fixture, so one is restored in the background
   while a test runs in another.

Each run takes a lane restored to that snapshot (RAM + devices + disk: the
worker is back to "collected, waiting", even if the previous test killed
it; fresh entropy and the host's clock), applies the test's network
(:func:`~pytest_gondolin.network_setup.apply_network`), runs the item and
returns a :class:`~.outcome.RunOutcome` carrying the host's verdicts. If
every lane's QEMU died, the session prepares a new worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Final

import pytest

import pytest_gondolin.sandbox.collected_files as collected_files
import pytest_gondolin.sandbox.collecting as collecting
import pytest_gondolin.sandbox.configured as configured
import pytest_gondolin.sandbox.coverage as coverage
import pytest_gondolin.sandbox.guest_plugins as guest_plugins
import pytest_gondolin.sandbox.interpreter_pack as interpreter_pack
import pytest_gondolin.sandbox.startup_tree as startup_tree
import pytest_gondolin.sandbox.worker_cache as worker_cache
import pytest_gondolin.sandbox.worker_disk as worker_disk
from pytest_gondolin.errors import GondolinError, VMError
from pytest_gondolin.fixtures import GuestKey, VMFactory
from pytest_gondolin.guest.startup import PRELOAD_ENV
from pytest_gondolin.logtail import console_excerpt
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
from pytest_gondolin.netpolicy.http.cassette_values import CassetteError
from pytest_gondolin.network_setup import apply_network
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.debugger import terminal_debugger
from pytest_gondolin.sandbox.isolation import LaneLedger, run_env
from pytest_gondolin.sandbox.messages import Collected
from pytest_gondolin.sandbox.options import SandboxOptions
from pytest_gondolin.sandbox.outcome import Failure, HostFailure, RunOutcome, out_of_memory
from pytest_gondolin.sandbox.queries import answer_query
from pytest_gondolin.sandbox.transports import VMTransport
from pytest_gondolin.sandbox.worker_setup import WorkerSetup
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.identity import VMConfig, state_key
from pytest_gondolin.vm.layers import launch_layered, layer_config, stack_digest
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.pool import RestorePool

__all__ = ["DEFAULT_RUN_TIMEOUT", "PREFETCH_LANES", "WORKER_TAG", "GuestWorker"]

log = logging.getLogger(__name__)

WORKER_TAG: Final = "gondolin-worker"
#: A lane's guest clock is set to the host's when the lane is taken if it was
#: set longer ago than this (s): a guest's clock rate under TCG is within ~1%
#: of the host's, and setting it costs a round trip (~6 ms).
LANE_CLOCK_MAX_AGE: Final = 10.0
#: VMs per worker taking turns: while a test runs in one, the other is
#: restored in the background. Two cover the restore (~0.2 s under TCG);
#: with one CPU there is nothing to overlap.
PREFETCH_LANES: Final = 2 if (os.cpu_count() or 1) > 1 else 1
#: The worker's output stream is long-lived (every report of the session);
#: each run's volume is bounded by the client instead.
WORKER_MAX_OUTPUT: Final = 1 << 50
#: Python start-up plus collection in the guest: ~5 s under TCG for a small
#: project; 300 s leaves room for big suites on a loaded CI host.
WORKER_START_TIMEOUT: Final = 300.0
#: A sandboxed test without its own timeout still may not hang the session forever.
DEFAULT_RUN_TIMEOUT: Final = 3600.0
#: How long a VM whose agent connection dropped gets to show it is dying (a
#: panicked guest takes QEMU down within milliseconds; this is ample).
VM_EXIT_GRACE: Final = 2.0
#: Console bytes quoted when a run's VM died.
CONSOLE_TAIL_CHARS: Final = 3000


@dataclasses.dataclass(eq=False)
class _Lane:
    """One VM running the worker; a worker's lanes take turns (``vm/pool.py``)."""

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


def _lane(vm: VM, transport: VMTransport) -> _Lane:
    """A lane whose client answers the running test's traffic queries from ``vm``."""
    client = WorkerClient(transport)
    client.on_query = lambda kind, args: answer_query(vm.http, kind, args)
    return _Lane(vm, transport, client)


def _out_of_memory(vm: VM, failure: Failure) -> Failure:
    """``failure`` of a crashed run, saying so when the guest's kernel ran out of memory."""
    try:
        vmstat = vm.read_file("/proc/vmstat", max_size=_VMSTAT_MAX_BYTES)
    except GondolinError as exc:  # the VM is going: the crash says enough
        log.debug("%s: no /proc/vmstat after a crash: %s", vm.name, exc)
        return failure
    text = vmstat.decode("ascii", "replace")
    return out_of_memory(failure, text, vm.config.memory_mib)


#: ``/proc/vmstat`` is ~5 KiB on Linux 6.1.
_VMSTAT_MAX_BYTES: Final = 64 * 1024


def _cassette_verdict(player: CassettePlayer) -> HostFailure | None:
    """Save what was recorded; a request the cassette could not answer fails the test."""
    try:
        player.save()
        player.check(allow_unused=True)
    except CassetteError as exc:
        return HostFailure("cassette", f"cassette: {exc}")
    return None


class GuestWorker:
    """A prepared guest worker for one guest key, restored before each item."""

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
        #: The guest's Python, the host environment carried, the worker's arguments.
        self.setup = WorkerSetup(factory, config, paths)
        # Set by prepare: what lanes are cloned from (sandbox/worker_cache.py).
        self._vmconfig: VMConfig | None = None
        self._lane_source = Path()
        self._worker_proc: AgentProcess | None = None
        self._clone_failed: str | None = None
        #: When a lane is restored after process-isolated tests (sandbox/isolation.py).
        self._isolation = LaneLedger(factory.settings.isolation_restore_every)

    # -- preparing -------------------------------------------------------------

    def prepare(self) -> Collected:
        """Start the worker (or restore it cached), collect, snapshot it; lanes follow in the background.

        A run whose tree and arguments match a cached collected worker
        restores it (``worker_cache.py``); otherwise the VM starts from the
        cached started-worker layer, the tree is copied in and the worker
        collects after its go. Returns what the worker collected. Raises
        GondolinError when any step fails (the caller closes this worker).
        """
        started = time.monotonic()
        vmconfig = self.factory.vm_config(self.key)
        self.factory.count += 1
        name = f"sandbox{self.factory.count}"
        say = self.factory.progress
        phases = worker_cache.Phases()
        self.setup.choose_interpreter(vmconfig)
        phases.mark("host python")
        # First: the worker's environment and arguments depend on what is carried.
        self.setup.scan_environment()
        session_args = self.setup.session_args()
        worker = worker_cache.StartedWorker(
            self.setup.start_argv(),
            {
                **self.setup.start_env(),
                PRELOAD_ENV: ",".join(worker_cache.preload_modules(session_args)),
            },
            WORKER_MAX_OUTPUT,
            files=startup_tree.join_tars(
                # The venv's own files (tiny): its python must be there to start.
                interpreter_pack.pack_venv(self.setup.interpreter)
                if self.setup.interpreter is not None and self.setup.interpreter.venv
                else b"",
                # pytest's own dependencies installed editable from the project (pluggy's tree).
                startup_tree.pack_startup_tree(
                    Path(self.config.rootpath), python_version=self.setup.python_version()
                ),
            ),
        )
        layers = [
            *self.factory.base_layers(self.key),
            *self.setup.interpreter_layers(),
            self.setup.environment_layer(),
            worker_cache.started_worker_layer(worker),
        ]
        # Every VM of this stack (clones, cached workers) has the environment's image in its slot.
        vmconfig = layer_config(vmconfig, layers)
        phases.mark("environment scan")
        tars = self.setup.project_tars()
        members = worker_cache.members_of(tars)  # hashed once: the key, the configured record
        go: dict[str, Any] = {
            "argv": session_args,
            "cwd": str(self.config.invocation_params.dir),
            # pytest-cov's settings when it measures this session (sandbox/coverage.py).
            "env": coverage.worker_env(self.config),
        }
        key = worker_cache.collected_key(
            stack_digest(state_key(vmconfig), layers),
            worker_cache.tree_digest(members),
            {**go, "argv": guest_plugins.key_args(session_args)},
        )
        phases.mark("pack and digest")
        # One test: one VM, no copy for others; the cached file is used in place
        # (sandbox/worker_disk.py) and a new one kept when the VM closes.
        one_test = worker_disk.one_test_session(self.config, self.paths)
        taken = worker_disk.take_collected(key) if one_test else None
        keep_taken = {"ok": True}
        restored = worker_cache.restore_collected(
            vmconfig,
            key,
            WORKER_TAG,
            name=name,
            argv=worker.argv,
            max_output=WORKER_MAX_OUTPUT,
            say=say,
            taken=taken,
            on_launch=None
            if taken is None
            else lambda vm: worker_disk.give_back(vm, taken, key, saved=lambda: keep_taken["ok"]),
        )
        missing = (
            worker_cache.uncollected(self.config, self.paths, restored[2]) if restored else None
        )
        if restored is not None and missing is not None:
            # Collected under another run's seed (its key leaves pytest-randomly's
            # out), and the collection drew from it: not this run's items.
            say(f"{name}: the cached collected worker lacks {missing}: collecting again")
            keep_taken["ok"] = False
            restored[0].close()
            collected_files.remove_collected(collected_files.collected_path(key))
            restored = None
        if restored is not None:
            vm, transport, collected = restored
            self.factory.adopt(vm)
            self.vm = vm
            first = _lane(vm, transport)
            first.client.adopt(collected)
            self._lane_source = taken or collected_files.collected_path(key)
            phases.mark("restore collected")
        else:
            # One test after an edit: the started (or configured) worker loaded in
            # place from the previous tree's file, not from a copy of the layer's
            # (worker_disk.py, configured.py).
            files = configured.tree_files(members) if one_test else None
            reused = (
                worker_disk.restore_started(vmconfig, key, worker, name=name, say=say, files=files)
                if one_test
                else None
            )
            if reused is not None:
                vm, transport = reused.vm, reused.transport
                self.factory.adopt(vm)
                phases.mark(
                    "restore configured in place"
                    if reused.record is not None
                    else "restore started in place"
                )
            else:
                vm = launch_layered(vmconfig, layers, name=name, progress=say)
                self.factory.adopt(vm)
                transport = worker.attach(vm)
                phases.mark("restore started")
            self.vm = vm
            first = _lane(vm, transport)
            self.setup.copy_project(vm, tars)
            phases.mark("copy")
            say(f"{name}: collecting in the started guest test worker")
            collected, record = collecting.collect(
                first.client,
                first.transport,
                WORKER_TAG,
                go,
                phases,
                reused,
                files,
                timeout=WORKER_START_TIMEOUT,
            )
            phases.mark("collect")
            # The worker wrote back and dropped the page cache before its collected line.
            worker_cache.write_state(vm, first.transport.proc, collected)
            vm.save_internal(WORKER_TAG)
            phases.mark("save")
            if reused is not None:
                reused.saved(record)  # the file is given back as this tree's when the VM closes
            elif one_test:
                worker_disk.keep_at_close(vm, key, lambda: record)
            else:
                self._lane_source = worker_cache.keep_snapshot(vm, key)
                phases.mark("keep snapshot")
        self.collected = collected
        self._vmconfig = vmconfig
        self._worker_proc = first.transport.proc
        # The other lanes are clones of this snapshot, started in the background
        # once the first test has its VM (RestorePool._fill): no test waits for
        # one. A session with one test here has nothing to overlap.
        runnable = worker_cache.runnable_here(self.config, collected)
        lanes = PREFETCH_LANES if runnable > 1 and not one_test else 1
        self._lanes = RestorePool[_Lane](
            self._clone if lanes > 1 else None,
            self._restore,
            size=lanes,
            name="sandbox",
            # A lane waits running after its restore (or, in process mode,
            # runs test after test): the host's time again when it is taken.
            on_take=lambda lane: lane.vm.refresh_clock(max_age=LANE_CLOCK_MAX_AGE),
        )
        self._lanes.add(first)
        log.info("%s: start-up phases: %s", name, phases)
        say(
            f"{name}: worker ready with {len(collected.nodeids)} items in {time.monotonic() - started:.1f} s"
            + (f" ({lanes} VMs take turns)" if lanes > 1 else "")
        )
        return collected

    def _clone(self) -> _Lane:
        """Another lane, started from the worker snapshot (no boot, no second collection).

        Runs in the pool's thread. Any failure is a VMError (the pool then
        goes on with the lanes it has); after one, no clone is tried again.
        """
        assert self._worker_proc is not None and self._vmconfig is not None
        assert self.collected is not None
        if self._clone_failed is not None:
            raise VMError(f"no clone of the worker: {self._clone_failed}")
        self.factory.count += 1
        try:
            vm = VM.launch(
                self._vmconfig,
                name=f"sandbox{self.factory.count}",
                loadvm_disk=self._lane_source,
                loadvm_tag=WORKER_TAG,
            )
        except (GondolinError, OSError) as exc:
            self._clone_failed = str(exc)
            log.warning(
                "no prefetch clone of the worker (tests run one restore at a time): %s", exc
            )
            raise VMError(str(exc)) from exc
        self.factory.adopt(vm)
        proc = vm.attach(self._worker_proc, max_output=WORKER_MAX_OUTPUT)
        clone = _lane(vm, VMTransport(vm, proc))
        clone.client.adopt(self.collected)
        return clone

    @property
    def alive(self) -> bool:
        return self._lanes is not None and any(lane.alive for lane in self._lanes.vms)

    # -- running -----------------------------------------------------------------

    def _restore(self, lane: _Lane) -> None:
        lane.vm.load_internal(WORKER_TAG, preserve=[lane.transport.proc])
        lane.transport.rewind()
        lane.client.rewind()
        self._isolation.restored(lane)

    def _settle(self, lane: _Lane) -> bool:
        """After a process run: whether ``lane`` is clean (the worker's verdict), network reset."""
        return self._isolation.settle(lane.vm, lane.transport.recv_line, seal=lane.client.seal)

    def run(self, nodeid: str, options: SandboxOptions) -> RunOutcome | Failure:
        """Run the item on a fresh VM (restored in the background, or now) with its options.

        The test's network (``options.policy`` and ``options.cassette``) is
        applied on the host before the run; a cassette miss comes back as
        the outcome's ``host_failure``, a VM that died during the run in its
        ``failure``. A bare :class:`~.outcome.Failure` means the item never ran.

        ``options.isolation == "process"``: the worker forks the test into
        fresh namespaces, and the VM is given back without a restore unless
        the run failed or the lane is due one (:class:`~.isolation.LaneLedger`);
        the worker's verdict on kernel state, which follows the run, is read
        before the lane's next test (:meth:`_settle`, in the pool); a ``vm``
        run never gets a VM that ran process-isolated tests since its last restore.
        """
        started = time.monotonic()
        try:
            if self._lanes is None:
                raise VMError("the guest worker is not prepared")
            lane = self._lanes.take()
        except GondolinError as exc:
            return Failure.from_exception(exc, duration=time.monotonic() - started)
        self.vm = lane.vm
        restored = time.monotonic()
        ledger, on_query = self._isolation, lane.client.on_query
        try:
            # After a process run the pool settled the lane (its network reset, as
            # a restore would): another process run takes it as it is.
            if ledger.since_restore(lane) and options.isolation != "process":
                self._restore(lane)
            player = apply_network(
                lane.vm,
                options.policy,
                cassette=options.cassette,
                record_mode=self.factory.settings.record_mode,
            )
            # --pdb with a terminal: a failure enters pdb in the guest (sandbox/debugger.py).
            lane.client.debugger = terminal_debugger(self.config)
            lane.client.on_query = ledger.answering(lane, on_query)
            outcome = lane.client.run(
                nodeid,
                seed=int.from_bytes(secrets.token_bytes(8), "big"),
                timeout=options.timeout or DEFAULT_RUN_TIMEOUT,
                env={
                    **run_env(options.isolation, lane.vm.secret_env()),
                    **guest_plugins.run_seed_env(self.config),
                },
            )
        except GondolinError as exc:
            # A worker that broke protocol was killed; the next restore revives it.
            self._lanes.give_back(lane)
            return Failure.from_exception(exc, duration=time.monotonic() - started)
        finally:
            lane.client.on_query = on_query
        log.debug(
            "%s on %s: waited %.0f ms for a fresh VM, run %.0f ms",
            nodeid,
            lane.vm.name,
            (restored - started) * 1000,
            (time.monotonic() - restored) * 1000,
        )
        host_failure = _cassette_verdict(player) if player is not None else None
        failure = outcome.failure
        if failure is not None and (not lane.vm.alive or lane.vm.exited(grace=VM_EXIT_GRACE)):
            failure = self._vm_died(lane.vm, failure)
        elif failure is not None and failure.kind == "crash":
            failure = _out_of_memory(lane.vm, failure)
        # A dead lane is not restored; the next take() closes and drops it.
        restore = ledger.after_run(lane, options.isolation, failed=failure is not None)
        if restore is None:
            # The worker's verdict on the test follows its done: read (and the
            # network reset) while the next test runs on another lane.
            self._lanes.give_back(lane, settle=self._settle)
        else:
            self._lanes.give_back(lane)
        return dataclasses.replace(outcome, failure=failure, host_failure=host_failure)

    @staticmethod
    def _vm_died(vm: VM, failure: Failure) -> Failure:
        """``failure`` of a run whose VM died with it: said so, with the console's tail."""
        console = vm.console_log()
        detail = failure.detail + (
            "\n--- guest console (tail) ---\n" + console_excerpt(console, CONSOLE_TAIL_CHARS)
            if console
            else ""
        )
        return dataclasses.replace(
            failure, headline=failure.headline + " (the VM died)", detail=detail
        )

    def close(self) -> None:
        """Close every lane and the VMs; idempotent."""
        if self._lanes is not None:
            self._lanes.close()
        if self.vm is not None:
            self.vm.close()
