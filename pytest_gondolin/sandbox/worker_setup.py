"""What a guest worker is made of, decided on the host: its Python, environment and arguments.

A :class:`~.guest_worker.GuestWorker` prepares its first VM from these
(``GuestWorker.prepare``): which Python runs the worker
(:mod:`.host_python`: the host's own interpreter carried in, or the
image's), what of the host's environment goes with it
(:mod:`.host_environment`, or pytest and the configured requirements), as
cached layers (``vm/layers.py``); how the worker starts (command line and
environment, fixed for a given environment); its pytest arguments (sent
with its go); and the project tree packed and copied in.
"""

from __future__ import annotations

import functools
import io
import logging
import shlex
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import pytest_gondolin
import pytest_gondolin.sandbox.cached_reads as cached_reads
import pytest_gondolin.sandbox.environment_image as environment_image
import pytest_gondolin.sandbox.host_environment as host_environment
import pytest_gondolin.sandbox.host_python as host_python
import pytest_gondolin.sandbox.interpreter_pack as interpreter_pack
import pytest_gondolin.sandbox.project_files as project_files
from pytest_gondolin.errors import AgentRequestError, ConfigError
from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.guest.hostpath import HOST_PATH_ENV
from pytest_gondolin.paths import cache_dir
from pytest_gondolin.sandbox.arguments import (
    GuestSources,
    guest_args,
    plugin_in_guest,
    worker_args,
)
from pytest_gondolin.sandbox.plugin_options import plugin_options
from pytest_gondolin.vm.commands import GUEST_ENV
from pytest_gondolin.vm.disk_backed import bind_folders, folders_to_back
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.layers import Layer, TarItem, tar_layer
from pytest_gondolin.vm.machine import VM

__all__ = ["HOSTPATH_MODULE", "UNPACK_TIMEOUT", "WorkerSetup"]

log = logging.getLogger(__name__)

#: Unpacking the project, pytest and requirements in the guest (TCG, big trees).
UNPACK_TIMEOUT: Final = 300.0
#: A tree of at most this many files and bytes is unpacked by the agent, not by
#: ``tar`` (about 2 ms a file under TCG against ``tar``'s 0.5 ms plus ~0.2 s to start it).
SMALL_TREE_MEMBERS: Final = 64
SMALL_TREE_BYTES: Final = 4 << 20
#: The cache folder of :mod:`.cached_reads`' answers.
HOST_READS: Final = "host-reads"
#: Where such a tree is written first (a tmpfs), until the agent has unpacked it.
SMALL_TREE_TAR: Final = "/var/tmp/gondolin-tree.tar"
#: The guest worker's entry module: the host's sys.path first, then the worker.
HOSTPATH_MODULE: Final = "pytest_gondolin.guest.hostpath"


def _distributions_of(package: str) -> list[str]:
    """The installed distributions that provide the top-level ``package`` (on the host)."""
    return list(_packages_distributions().get(package, ()))


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    """``importlib.metadata.packages_distributions()``, read once a process.

    A session asks once per ``-p`` plugin, and the host's installed
    distributions do not change under a running session; across runs the
    answer is reused while nothing it read changed (:mod:`.cached_reads`).
    """
    return cached_reads.packages_distributions(cache_dir() / HOST_READS)


def _small_tree(tars: list[bytes]) -> bool:
    """Whether ``tars`` are few files and bytes enough for the agent to unpack (``guest/unpack.py``)."""
    if sum(map(len, tars)) > SMALL_TREE_BYTES:
        return False
    members = 0
    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members += sum(1 for _ in tar)
    return members <= SMALL_TREE_MEMBERS


def _agent_unpacked(vm: VM, data: bytes, folder: str) -> bool:
    """Unpack ``data`` in the guest's agent, then make ``folder``; False if the agent could not."""
    try:
        vm.write_file(SMALL_TREE_TAR, data, mode=0o600)
        vm.unpack_tar(SMALL_TREE_TAR, folder=folder, timeout=UNPACK_TIMEOUT)
    except AgentRequestError as exc:
        log.debug("%s: the agent did not unpack the tree (%s); tar does", vm.name, exc)
        return False
    return True


class WorkerSetup:
    """The host-side decisions behind one guest worker (set as ``prepare`` makes them)."""

    def __init__(self, factory: VMFactory, config: pytest.Config, paths: list[str]) -> None:
        self.factory = factory
        self.config = config
        #: The files holding the worker's items (the last of its pytest arguments).
        self.paths = paths
        #: What of the host's environment the guest gets (None: not carried, or not scanned yet).
        self.environment: host_environment.HostEnvironment | None = None
        #: The host's interpreter carried into the guest (None: the image's python3).
        self.interpreter: host_python.HostInterpreter | None = None
        #: Which Python runs the worker, its version and ABI (set by :meth:`choose_interpreter`).
        self.python: host_python.Choice | None = None

    def _environment_items(self, *, carried: bool = True) -> list[TarItem]:
        """What the guest imports besides the project: the host's environment (or pytest), requirements.

        Tar items with content keys: the layer they make is cached as a ready
        snapshot (``vm/layers.py``), so a session whose items are unchanged
        copies none of them. ``carried=False``: without the host's distributions
        (an image brings them: ``sandbox/environment_image.py``).
        """
        settings = self.factory.settings
        env = self.scan_environment()
        items: list[TarItem] = []
        requirements = list(settings.requirements)
        if env is not None:
            if carried:
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

    def choose_interpreter(self, vmconfig: VMConfig) -> host_python.HostInterpreter | None:
        """The host's Python when the guest can run it (also :attr:`interpreter`); ConfigError when no Python there matches."""
        choice = host_python.decide(
            vmconfig, cache_dir() / "host-python", progress=self.factory.progress
        )
        if choice.refusal is not None:
            host_environment.report_once([f"pytest-gondolin: {choice.refusal}"])
            raise ConfigError(choice.refusal)
        self.python = choice
        self.interpreter = choice.interpreter
        return choice.interpreter

    def interpreter_layers(self) -> list[Layer]:
        """The host's interpreter as a layer of its own (it changes less often than the environment)."""
        if self.interpreter is None:
            return []
        items = interpreter_pack.layer_items(self.interpreter, cache_dir() / "host-python")
        return [tar_layer("host-python", items)]

    def environment_layer(self) -> Layer:
        """The host's environment: a file-system image the guest mounts, or else a tar layer."""
        env = self.scan_environment()
        image = (
            environment_image.prepare(env, cache_dir() / "host-environment")
            if env is not None
            else None
        )
        if env is None or image is None:
            return tar_layer("host-environment", self._environment_items())
        items = self._environment_items(carried=False)
        fallback = host_environment.layer_items(env, cache_dir() / "host-environment")
        return environment_image.image_layer("host-environment", image, items, fallback=fallback)

    def project_tars(self) -> list[bytes]:
        """The project tree and editable sources outside it, packed (the rest is a layer).

        With Hypothesis's Unicode tables too, where the tests use Hypothesis
        (:func:`.cached_reads.hypothesis_tables`).
        """
        env = self.scan_environment()
        tars = [project_files.pack_project(Path(self.config.rootpath))]
        if env is not None:
            tars += [project_files.pack_project(Path(source)) for source in env.sources]
        tables = cached_reads.hypothesis_tables(cache_dir() / HOST_READS)
        return [*tars, tables] if tables else tars

    def copy_project(self, vm: VM, tars: list[bytes]) -> None:
        """Unpack ``tars`` (:meth:`project_tars`) in the guest, on its disk.

        The agent binds the disk folders; it unpacks a small tree itself
        (``guest/unpack.py``), a larger one goes to ``tar`` (each process
        started costs ~0.1 s under TCG). The tree is written back and the
        page cache dropped by the worker after collection, before its
        snapshot (``guest/worker.py``), not here.
        """
        say = self.factory.progress
        say(f"{vm.name}: copying the project tree ({self.config.rootpath}) into the guest")
        started = time.monotonic()
        # A project under /tmp or /root goes to the guest's disk (vm/disk_backed.py).
        folders = folders_to_back(tars)
        bind_folders(vm, folders)
        here = str(self.config.invocation_params.dir)
        data = b"".join(tars)
        if not (_small_tree(tars) and _agent_unpacked(vm, data, here)):
            # The tars streamed to tar's stdin, nothing staged in guest memory.
            # --ignore-zeros: several tars joined.
            quoted = shlex.quote(here)
            vm.exec(
                [
                    "sh",
                    "-c",
                    f"tar --ignore-zeros -xf - -C / && {{ [ -d {quoted} ] || mkdir -p {quoted}; }}",
                ],
                input=data,
                check=True,
                timeout=UNPACK_TIMEOUT,
            )
        log.info(
            "%s: %.1f MiB copied in (%d disk-backed folders) in %.2f s",
            vm.name,
            len(data) / 2**20,
            len(folders),
            time.monotonic() - started,
        )

    def scan_environment(self) -> host_environment.HostEnvironment | None:
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
                cache=cache_dir() / "host-environment",
            )
        return self.environment

    def _python_version(self) -> str:
        """The version of the Python that runs the worker in the guest (``3.11.2``)."""
        return self.python.version if self.python else project_files.IMAGE_PYTHON

    def python_version(self) -> str:
        """The version of the Python that runs the worker in the guest (set by :meth:`choose_interpreter`)."""
        return self._python_version()

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

    def start_env(self) -> dict[str, str]:
        """The worker's environment at start-up: fixed for a given environment (per-run parts go with the go)."""
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
        }

    def start_argv(self) -> list[str]:
        """How the worker starts: the interpreter and the module that sets up the host's path."""
        python = self.interpreter.executable if self.interpreter is not None else "python3"
        return [python, "-s", "-m", HOSTPATH_MODULE]

    def session_args(self) -> list[str]:
        """The worker's pytest arguments, sent with its go."""
        sources = self._guest_sources()
        args = guest_args(
            worker_args(self.config),
            lambda name: plugin_in_guest(
                self.config, name, sources, distributions_of=_distributions_of
            ),
            plugin_options(self.config),
        )
        if args.dropped_plugins:
            host_environment.report_once(
                [
                    "pytest-gondolin: plugins not importable in the guest, not loaded there: "
                    + ", ".join(f"-p {name}" for name in args.dropped_plugins)
                ]
            )
        return [*args.args, "-p", "gondolin", *self.paths]

    def _guest_sources(self) -> GuestSources:
        """What the guest imports from, after :meth:`copy_project`."""
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
