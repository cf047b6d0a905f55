"""A prepared guest worker: VMs that hold a collected pytest session and take turns.

Per guest key (image, memory, CPUs) the session prepares one
:class:`GuestWorker`:

1. a VM from the cached ready snapshot with its layers (``vm/layers.py``):
   the system packages, then the host's Python environment
   (:mod:`.host_environment`, or pytest) and the requirements, each layer
   keyed by its content, so an unchanged environment is not copied again;
2. the project tree (:mod:`.project_files`) copied in, at its host path;
3. the test worker started there (:mod:`pytest_gondolin.guest.worker`); it
   collects the files holding sandboxed items and waits for commands;
4. an internal snapshot :data:`WORKER_TAG` saved *after* collection, so no
   test pays for Python start-up or collection again;
5. with :data:`PREFETCH_LANES` > 1, clones of that VM started from the
   snapshot (no second collection): the *lanes*, which take turns through a
   :class:`~pytest_gondolin.vm.pool.RestorePool`, the same one behind the
   ``vm`` fixture, so one is restored in the background while a test runs
   in another.

Each run takes a lane restored to that snapshot (RAM + devices + disk: the
worker is back to "collected, waiting", even if the previous test killed
it; fresh entropy and the host's clock), applies the test's network
(:func:`~pytest_gondolin.network_setup.apply_network`), runs the item and
returns a :class:`~.outcome.RunOutcome` carrying the host's verdicts. If
every lane's QEMU died, the session prepares a new worker.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pytest_gondolin
import pytest_gondolin.sandbox.coverage as coverage
import pytest_gondolin.sandbox.host_environment as host_environment
import pytest_gondolin.sandbox.host_python as host_python
import pytest_gondolin.sandbox.interpreter_pack as interpreter_pack
import pytest_gondolin.sandbox.project_files as project_files
from pytest_gondolin.errors import ConfigError, GondolinError, VMError
from pytest_gondolin.fixtures import GuestKey, VMFactory
from pytest_gondolin.guest.hostpath import HOST_PATH_ENV
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
from pytest_gondolin.netpolicy.http.cassette_values import CassetteError
from pytest_gondolin.network_setup import apply_network
from pytest_gondolin.paths import cache_dir
from pytest_gondolin.sandbox.arguments import (
    GuestSources,
    guest_args,
    plugin_in_guest,
    worker_args,
)
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.messages import Collected
from pytest_gondolin.sandbox.options import SandboxOptions
from pytest_gondolin.sandbox.outcome import Failure, HostFailure, RunOutcome
from pytest_gondolin.sandbox.queries import answer_query
from pytest_gondolin.sandbox.transports import VMTransport
from pytest_gondolin.vm.commands import GUEST_ENV
from pytest_gondolin.vm.disk_backed import back_with_disk
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.layers import Layer, TarItem, launch_layered, tar_layer
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.pool import RestorePool

__all__ = ["DEFAULT_RUN_TIMEOUT", "PREFETCH_LANES", "WORKER_TAG", "GuestWorker"]

log = logging.getLogger(__name__)

WORKER_TAG: Final = "gondolin-worker"
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
#: Unpacking the project, pytest and requirements in the guest (TCG, big trees).
UNPACK_TIMEOUT: Final = 300.0
#: The guest worker's entry module: the host's sys.path first, then the worker.
HOSTPATH_MODULE: Final = "pytest_gondolin.guest.hostpath"
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


def _cassette_verdict(player: CassettePlayer) -> HostFailure | None:
    """Save what was recorded; a request the cassette could not answer fails the test."""
    try:
        player.save()
        player.check(allow_unused=True)
    except CassetteError as exc:
        return HostFailure("cassette", f"cassette: {exc}")
    return None


def _distributions_of(package: str) -> list[str]:
    """The installed distributions that provide the top-level ``package`` (on the host)."""
    return list(importlib.metadata.packages_distributions().get(package, ()))


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
        self.environment: host_environment.HostEnvironment | None = None
        #: The host's interpreter carried into the guest (None: the image's python3).
        self.interpreter: host_python.HostInterpreter | None = None
        #: Which Python runs the worker, its version and ABI (set by prepare).
        self.python: host_python.Choice | None = None

    # -- preparing -------------------------------------------------------------

    def prepare(self) -> Collected:
        """Boot, copy the project in, start the worker, snapshot it, clone the lanes.

        Returns what the worker collected. Raises GondolinError when any step
        fails (the caller closes this worker).
        """
        started = time.monotonic()
        vmconfig = self.factory.vm_config(self.key)
        self.factory.count += 1
        name = f"sandbox{self.factory.count}"
        self.interpreter = self._interpreter(vmconfig)
        layers = [
            *self.factory.base_layers(self.key),
            *self._interpreter_layers(),
            self._environment_layer(),
        ]
        vm = launch_layered(vmconfig, layers, name=name, progress=self.factory.progress)
        self.factory.adopt(vm)
        self.vm = vm
        self._copy_project(vm)
        say = self.factory.progress
        say(f"{name}: starting the guest test worker (pytest start-up and collection)")
        proc = vm.spawn(
            self._worker_argv(),
            env=self._worker_env(),
            cwd=str(self.config.invocation_params.dir),
            max_output=WORKER_MAX_OUTPUT,
        )
        first = _lane(vm, VMTransport(vm, proc))
        self.collected = collected = first.client.start(WORKER_START_TIMEOUT)
        # sync: the unpacked tree must not be dirty in the snapshot, or every
        # restore would replay its writeback (kernel work in each test's time).
        # The page cache holds the sources pytest and the project were imported
        # from; the worker has them in memory now. Dropped, the snapshot is
        # smaller and every restore loads less (together: 173 -> 136 ms a test).
        vm.exec(["sh", "-c", "sync && echo 1 > /proc/sys/vm/drop_caches"], check=True)
        vm.save_internal(WORKER_TAG)
        lanes = [first]
        for _ in range(1, PREFETCH_LANES):
            try:
                lanes.append(self._clone(first, vmconfig))
            except GondolinError as exc:
                log.warning(
                    "no prefetch clone of %s (tests run one restore at a time): %s", name, exc
                )
                break
        # No launch: a lane costs a whole preparation; when every lane died,
        # the session prepares a new worker.
        self._lanes = RestorePool[_Lane](None, self._restore, size=len(lanes), name="sandbox")
        for lane in lanes:
            self._lanes.add(lane)
        say(
            f"{name}: worker ready with {len(collected.nodeids)} items in {time.monotonic() - started:.1f} s"
            + (f" ({len(lanes)} VMs take turns)" if len(lanes) > 1 else "")
        )
        return collected

    def _environment_items(self) -> list[TarItem]:
        """What the guest imports besides the project: the host's environment (or pytest), requirements.

        Tar items with content keys: the layer they make is cached as a ready
        snapshot (``vm/layers.py``), so a session whose items are unchanged
        copies none of them.
        """
        settings = self.factory.settings
        env = self._host_environment()
        items: list[TarItem] = []
        requirements = list(settings.requirements)
        if env is not None:
            items += host_environment.layer_items(env, cache_dir() / "host-environment")
            requirements += self._fallback_requirements(env)
        if env is None or not env.carries("pytest"):
            shipped = project_files.dependency_closure(
                project_files.SHIPPED_DISTRIBUTIONS, self._python_version()
            )
            key = ",".join(
                f"{d.metadata['Name']}=={d.version}@{d.locate_file('')}" for d in shipped
            )
            version = self._python_version()
            items.append(
                TarItem(
                    f"shipped:{version}:{key}",
                    lambda: project_files.pack_distributions(python_version=version),
                )
            )
        if requirements:
            folder = project_files.requirements_dir(
                requirements, progress=self.factory.progress, python_version=self._python_version()
            )
            items.append(
                TarItem(
                    f"requirements:{folder.name}",
                    lambda: project_files.pack_folder(folder, project_files.GUEST_REQUIREMENTS),
                )
            )
        return items

    def _interpreter(self, vmconfig: VMConfig) -> host_python.HostInterpreter | None:
        """The host's Python when the guest can run it; ConfigError when no Python there matches."""
        choice = host_python.decide(
            vmconfig, cache_dir() / "host-python", progress=self.factory.progress
        )
        if choice.refusal is not None:
            host_environment.report_once([f"pytest-gondolin: {choice.refusal}"])
            raise ConfigError(choice.refusal)
        self.python = choice
        return choice.interpreter

    def _interpreter_layers(self) -> list[Layer]:
        """The host's interpreter as a layer of its own (it changes less often than the environment)."""
        if self.interpreter is None:
            return []
        items = interpreter_pack.layer_items(self.interpreter, cache_dir() / "host-python")
        return [tar_layer("host-python", items)]

    def _environment_layer(self) -> Layer:
        return tar_layer("host-environment", self._environment_items())

    def _copy_project(self, vm: VM) -> None:
        """The project tree and editable sources outside it, in the guest (the rest is a layer)."""
        rootdir = Path(self.config.rootpath)
        say = self.factory.progress
        started = time.monotonic()
        env = self._host_environment()
        say(f"{vm.name}: copying the project tree ({rootdir}) into the guest")
        tars = [project_files.pack_project(rootdir)]
        if env is not None:
            tars += [project_files.pack_project(Path(source)) for source in env.sources]
        if self.interpreter is not None and self.interpreter.venv:
            tars.append(interpreter_pack.pack_venv(self.interpreter))  # the layer has the rest
        packed = time.monotonic()
        # /var/tmp: a tmpfs of half the guest's memory (the project is capped far below).
        back_with_disk(vm, tars)  # a project under /tmp or /root goes to the guest's disk
        names = [f"/var/tmp/gondolin-{i}.tar" for i in range(len(tars))]
        for name, data in zip(names, tars, strict=True):
            vm.write_file(name, data)
        written = time.monotonic()
        vm.exec(
            " && ".join(f"tar -xf {n} -C / && rm {n}" for n in names),
            check=True,
            timeout=UNPACK_TIMEOUT,
        )
        vm.exec(["mkdir", "-p", str(self.config.invocation_params.dir)], check=True)
        log.info(
            "%s: %.1f MiB copied in: packed %.2f s, written %.2f s, unpacked %.2f s",
            vm.name,
            sum(map(len, tars)) / 2**20,
            packed - started,
            written - packed,
            time.monotonic() - written,
        )

    def _host_environment(self) -> host_environment.HostEnvironment | None:
        """What of the host's environment the guest gets (None: carrying it is off)."""
        settings = self.factory.settings
        if not settings.host_environment:
            self.environment = None
            return None
        if self.environment is None:
            self.environment = host_environment.scan(
                Path(self.config.rootpath),
                guest_soabi=self.python.soabi if self.python else host_environment.GUEST_SOABI,
                limit=settings.host_environment_limit,
            )
        return self.environment

    def _python_version(self) -> str:
        """The version of the Python that runs the worker in the guest (``3.11.2``)."""
        return self.python.version if self.python else project_files.IMAGE_PYTHON

    def _fallback_requirements(self, env: host_environment.HostEnvironment) -> list[str]:
        """Wheels for the distributions the guest cannot load as the host has them.

        Fetched with the configured requirements when pip finds them all; if
        not, the session says once which distributions the guest lacks and why,
        and goes on without them.
        """
        notes = list(env.notes)
        pins = [m.pin for m in env.missing]
        if pins:
            try:
                project_files.requirements_dir(
                    [*self.factory.settings.requirements, *pins],
                    progress=self.factory.progress,
                    python_version=self._python_version(),
                )
            except ConfigError as exc:
                notes += [f"{m.name} {m.version}: {m.reason}" for m in env.missing]
                notes.append(f"pip found no wheel for the guest either: {str(exc)[-500:]}")
                pins = []
        if notes:
            host_environment.report_once(
                ["pytest-gondolin: not all of the host's environment is importable in the guest:"]
                + [f"  {n}" for n in notes]
            )
        return pins

    def _worker_env(self) -> dict[str, str]:
        env = self.environment if self.factory.settings.host_environment else None
        pythonpath = ["/run/gondolin/py", project_files.GUEST_REQUIREMENTS]
        if env is None or not env.carries("pytest"):
            pythonpath.insert(0, project_files.GUEST_SITE)
        extra: dict[str, str] = {}
        if env is not None:
            # The host's own sys.path, in its order (guest/hostpath.py).
            extra[HOST_PATH_ENV] = env.host_path()
        else:
            src = Path(self.config.rootpath) / "src"
            if src.is_dir():
                pythonpath.append(str(src))
        return {
            **GUEST_ENV,
            "PYTHONPATH": ":".join(pythonpath),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "GONDOLIN_GUEST": "1",
            **extra,
            # pytest-cov's settings when it measures this session (sandbox/coverage.py).
            **coverage.worker_env(self.config),
        }

    def _worker_argv(self) -> list[str]:
        sources = self._guest_sources()
        args = guest_args(
            worker_args(self.config),
            lambda name: plugin_in_guest(
                self.config, name, sources, distributions_of=_distributions_of
            ),
        )
        if args.dropped_plugins:
            host_environment.report_once(
                [
                    "pytest-gondolin: plugins not importable in the guest, not loaded there: "
                    + ", ".join(f"-p {name}" for name in args.dropped_plugins)
                ]
            )
        python = self.interpreter.executable if self.interpreter is not None else "python3"
        return [python, "-s", "-m", HOSTPATH_MODULE, *args.args, "-p", "gondolin", *self.paths]

    def _guest_sources(self) -> GuestSources:
        """What the guest imports from, after :meth:`_copy_project`."""
        folders = [
            # Always in the guest: pytest (carried or packed) and this package.
            Path(pytest.__file__).resolve().parent,
            Path(pytest.__file__).resolve().parent.parent / "_pytest",
            Path(pytest_gondolin.__file__).resolve().parent,
        ]
        names = {canonicalize_name(n) for n in project_files.SHIPPED_DISTRIBUTIONS}
        # Validated as PEP 508 when the settings were built (config.py).
        names |= {
            canonicalize_name(Requirement(r).name) for r in self.factory.settings.requirements
        }
        env = self.environment if self.factory.settings.host_environment else None
        if env is not None:
            folders += [Path(source).resolve() for source in env.sources]
            names |= {canonicalize_name(d.name) for d in env.carried}
        return GuestSources(Path(self.config.rootpath).resolve(), tuple(folders), frozenset(names))

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

    def run(self, nodeid: str, options: SandboxOptions) -> RunOutcome | Failure:
        """Run the item on a fresh VM (restored in the background, or now) with its options.

        The test's network (``options.policy`` and ``options.cassette``) is
        applied on the host before the run; a cassette miss comes back as
        the outcome's ``host_failure``, a VM that died during the run in its
        ``failure``. A bare :class:`~.outcome.Failure` means the item never ran.
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
        try:
            player = apply_network(
                lane.vm,
                options.policy,
                cassette=options.cassette,
                record_mode=self.factory.settings.record_mode,
            )
            outcome = lane.client.run(
                nodeid,
                seed=int.from_bytes(secrets.token_bytes(8), "big"),
                timeout=options.timeout or DEFAULT_RUN_TIMEOUT,
                env=lane.vm.secret_env(),
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
        host_failure = _cassette_verdict(player) if player is not None else None
        failure = outcome.failure
        if failure is not None and (not lane.vm.alive or lane.vm.exited(grace=VM_EXIT_GRACE)):
            failure = self._vm_died(lane.vm, failure)
        # A dead lane is not restored; the next take() closes and drops it.
        self._lanes.give_back(lane)
        return dataclasses.replace(outcome, failure=failure, host_failure=host_failure)

    @staticmethod
    def _vm_died(vm: VM, failure: Failure) -> Failure:
        """``failure`` of a run whose VM died with it: said so, with the console's tail."""
        console = vm.console_log()
        detail = failure.detail + (
            "\n--- guest console (tail) ---\n" + console[-CONSOLE_TAIL_CHARS:] if console else ""
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
