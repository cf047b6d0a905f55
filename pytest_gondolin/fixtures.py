"""The ``vm``, ``session_vm``, ``vm_factory`` fixtures and the factory behind them.

The factory owns every VM it builds and closes them all at session end
(Firecracker's test framework pattern). The ``vm`` fixture does not boot
per test: per option set, VMs started from the ready snapshot take turns
(``vm/pool.py``); the one a test used is put back to that snapshot in the
background while the next test runs in another.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import pytest_gondolin.config as cfg
import pytest_gondolin.paths as paths
from pytest_gondolin.errors import CacheDirError, ConfigError, GondolinError
from pytest_gondolin.image.store import Image, ensure_image
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
from pytest_gondolin.netpolicy.http.cassette_paths import resolve_cassette_option
from pytest_gondolin.netpolicy.http.cassette_values import CassetteError
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.tcp_services import merge_tcp_services
from pytest_gondolin.network_setup import apply_network
from pytest_gondolin.vm.accel import AccelChoice, choose_accel
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.layers import Layer, launch_layered
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.pool import RestorePool
from pytest_gondolin.vm.warm import CLEAN_TAG

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.secrets import Secret

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: VMs per option set behind the ``vm`` fixture: with two, a test never waits
#: for the previous test's restore. One core: a background restore would
#: only compete with the running test.
VM_POOL_SIZE = 2 if (os.cpu_count() or 1) > 1 else 1


@dataclass(frozen=True)
class GuestKey:
    """The options that change the guest itself (and so need their own boot)."""

    image: str
    memory_mib: int
    cpus: int
    #: Debian packages over the image: the session's (``gondolin_system_packages``)
    #: and those a marker or ``vm_factory`` added, sorted.
    system_packages: tuple[str, ...] = ()

    @classmethod
    def from_options(
        cls,
        settings: cfg.Settings,
        *,
        memory: Any = None,
        cpus: Any = None,
        image: Any = None,
        system_packages: Any = None,
        source: str = "vm_factory",
    ) -> GuestKey:
        """The session's defaults with ``memory``/``cpus``/``image`` given by ``source`` on top,
        and ``system_packages`` added to the session's.

        Raises ConfigError naming ``source``, the argument and the bad value.
        """
        memory_mib = (
            settings.memory_mib
            if memory is None
            else cfg.parse_memory(memory, f"{source}(memory=...)")
        )
        ncpus = (
            settings.cpus
            if cpus is None
            else cfg.parse_number(
                cpus, f"{source}(cpus=...)", kind=int, low=1, high=64, what="cpus"
            )
        )
        if image is not None and not isinstance(image, str):
            raise ConfigError(f"{source}(image=...): must be a string, got {image!r}")
        added = cfg.parse_system_packages(system_packages, f"{source}(system_packages=...)")
        packages = tuple(sorted({*settings.system_packages, *added}))
        return cls(image or settings.image, memory_mib, ncpus, packages)


def _restore(vm: VM) -> None:
    vm.load_internal(CLEAN_TAG)


def _warm_up(vm: VM) -> None:
    """Run one shell in a just-restored guest, in the background before it is handed out.

    ``loadvm`` drops QEMU's translated code, so under TCG a test's first
    ``exec`` after a restore costs ~0.24 s instead of ~0.1 s; this pays for
    it while no test waits. The guest is left as the snapshot plus one
    finished ``sh -c true``: no file, process or setting of it remains.
    """
    try:
        vm.exec(["sh", "-c", "true"], timeout=60)
    except GondolinError as exc:
        # Only an optimisation (an image without sh, say): the VM is still
        # clean; a VM that died is dropped by the pool before it is handed out.
        log.debug("warm-up of %s skipped: %s", vm.name, exc)


class VMFactory:
    """Builds VMs with options; closes all of them at session end."""

    def __init__(self, settings: cfg.Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self._lock = threading.RLock()
        self._vms: list[VM] = []
        self._images: dict[str, Image] = {}
        self._accel: AccelChoice | None = None
        self._pools: dict[GuestKey, RestorePool[VM]] = {}
        self._players: list[CassettePlayer] = []
        #: Layer key -> why building it failed: every later VM fails with it at once.
        self._layer_errors: dict[str, GondolinError] = {}
        self.count = 0

    # -- option handling ---------------------------------------------------

    @property
    def accel(self) -> AccelChoice:
        with self._lock:
            if self._accel is None:
                self._accel = choose_accel(self.settings.accel)
                if self._accel.name == "tcg" and self.settings.accel == "auto":
                    self.progress(f"using TCG (software emulation): {self._accel.reason}")
            return self._accel

    def image(self, name: str | None = None) -> Image:
        name = name or self.settings.image
        with self._lock:
            if name not in self._images:
                self._images[name] = ensure_image(name, progress=self.progress)
            return self._images[name]

    def guest_key(
        self,
        *,
        memory: Any = None,
        cpus: Any = None,
        image: str | None = None,
        system_packages: Any = None,
        source: str = "vm_factory",
    ) -> GuestKey:
        return GuestKey.from_options(
            self.settings,
            memory=memory,
            cpus=cpus,
            image=image,
            system_packages=system_packages,
            source=source,
        )

    def vm_config(self, key: GuestKey) -> VMConfig:
        return VMConfig(
            image=self.image(key.image),
            accel=self.accel.name,
            memory_mib=key.memory_mib,
            cpus=key.cpus,
            boot_timeout=self.settings.boot_timeout,
            # A VM kept for debugging must outlive pytest (--gondolin-keep-vm).
            die_with_parent=not self.settings.keep_vm,
        )

    def base_layers(self, key: GuestKey) -> list[Layer]:
        """The layers every VM for ``key`` gets over the image: the system packages, if any
        (the session's and the key's own)."""
        packages = tuple(sorted({*self.settings.system_packages, *key.system_packages}))
        if not packages:
            return []
        # Here: the layer builder pulls in the network stack, needed only with packages.
        from pytest_gondolin.image.system_packages import system_packages_layer

        layer = system_packages_layer(self.image(key.image), packages)
        self._raise_if_failed(layer)
        return [dataclasses.replace(layer, apply=functools.partial(self._apply_once, layer))]

    def _raise_if_failed(self, layer: Layer) -> None:
        with self._lock:
            failed = self._layer_errors.get(layer.key)
        if failed is not None:
            raise copy.copy(failed)  # the same message, without the first traceback

    def _apply_once(self, layer: Layer, vm: VM) -> None:
        """Apply ``layer``; if it fails, remember why, so the session tries it only once."""
        self._raise_if_failed(layer)
        try:
            layer.apply(vm)
        except GondolinError as exc:
            with self._lock:
                self._layer_errors[layer.key] = exc
            raise

    # -- building VMs ----------------------------------------------------------

    def __call__(
        self,
        *,
        memory: Any = None,
        cpus: Any = None,
        image: str | None = None,
        allow_hosts: Sequence[str] = (),
        block_internal: bool = True,
        resolve: Mapping[str, str] | None = None,
        upstream_ca: str | os.PathLike[str] | None = None,
        secrets: Mapping[str, Secret | Sequence[str]] | None = None,
        cassette: str | os.PathLike[str] | None = None,
        tcp: Mapping[str, str] | None = None,
        system_packages: str | Sequence[str] | None = None,
        **unknown: Any,
    ) -> VM:
        """Boot a new VM with these options. It is closed at session end (or by ``vm.close()``).

        The network options (DESIGN.md) build the VM's own policy, applied
        on the host: ``allow_hosts`` (default none: deny all egress),
        ``block_internal``, ``resolve``, ``upstream_ca`` and ``secrets``
        (``NAME -> Secret``, or a host list meaning the host's env var
        ``NAME``; the guest's ``exec`` environment gets placeholders) and
        ``tcp`` (``{"name:port": "addr:port"}``: raw TCP services).
        ``cassette`` (a YAML path, relative to the working directory) replays
        and records allowed requests per ``--gondolin-record-mode``; it is
        saved when the VM closes. ``system_packages`` (Debian package names)
        are installed over the image besides the session's
        ``gondolin_system_packages``, in a layer cached per package set.
        Raises ConfigError for a bad option before anything boots.
        """
        if unknown:
            raise ConfigError(f"vm_factory: unknown option(s): {', '.join(sorted(unknown))}")
        key = self.guest_key(memory=memory, cpus=cpus, image=image, system_packages=system_packages)
        try:
            policy = NetworkPolicy.from_options(
                allow_hosts=allow_hosts,
                block_internal=block_internal,
                resolve=resolve,
                upstream_ca=upstream_ca,
                secrets=secrets,
                tcp=merge_tcp_services(dict(self.settings.tcp), tcp),
            )
        except ConfigError as exc:
            raise ConfigError(f"vm_factory: {exc}") from None
        cassette_path = None
        if cassette is not None:
            if isinstance(cassette, bool):
                raise ConfigError(
                    "vm_factory(cassette=...): give a file path (True needs a test to name it)"
                )
            cassette_path = resolve_cassette_option(cassette, where="vm_factory(cassette=...)")
        vm = self._boot(key)
        player = apply_network(
            vm, policy, cassette=cassette_path, record_mode=self.settings.record_mode
        )
        if player is not None:
            vm.add_close_hook(player.save)
            with self._lock:
                self._players.append(player)
        return vm

    def cassette_misses(self) -> list[str]:
        """Requests that missed a ``vm_factory(cassette=...)`` cassette since the last call.

        Each message is what a sandboxed test's cassette miss fails with; a
        miss is returned once, so it fails only the test that was running.
        """
        with self._lock:
            players = list(self._players)
        messages = []
        for player in players:
            try:
                player.check(allow_unused=True)
            except CassetteError as exc:
                messages.append(f"cassette: {exc}")
        return messages

    def _boot(self, key: GuestKey) -> VM:
        config = self.vm_config(key)
        with self._lock:
            self.count += 1
            name = f"vm{self.count}"
        self.progress(
            f"booting {name} ({config.accel}, {key.memory_mib} MiB, image {config.image.name}-{config.image.build_id})"
        )
        started = time.monotonic()
        layers = self.base_layers(key)
        if layers:  # the packages' layer is cached as a ready snapshot: start from it
            vm = launch_layered(config, layers, name=name, progress=self.progress)
        else:
            vm = VM.launch(config, name=name)
        self.progress(f"{name} ready in {time.monotonic() - started:.1f} s")
        with self._lock:
            self._vms.append(vm)
        return vm

    def clean_vm(self, key: GuestKey) -> VM:
        """Return a VM for ``key`` in its clean state (the ready snapshot), in use until :meth:`recycle`.

        The first call starts the VM from the cached ready snapshot (or boots
        and caches it); a second VM then starts in the background.
        """
        return self._pool(key).take()

    def recycle(self, vm: VM) -> None:
        """The test that used ``vm`` (from :meth:`clean_vm`) is over: make it clean again."""
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.give_back(vm)

    def _pool(self, key: GuestKey) -> RestorePool[VM]:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                config = self.vm_config(key)
                layers = self.base_layers(key)
                pool = RestorePool[VM](
                    lambda: self._launch_clean(config, layers),
                    _restore,
                    size=VM_POOL_SIZE,
                    name="vm",
                    on_new=self.adopt,
                    on_drop=self._forget,
                    warm=_warm_up,
                    # A VM restored in the background kept running (and its clock
                    # its own pace) while it waited: it gets the host's time again.
                    on_take=VM.refresh_clock,
                )
                self._pools[key] = pool
            return pool

    def _launch_clean(self, config: VMConfig, layers: Sequence[Layer]) -> VM:
        with self._lock:
            self.count += 1
            name = f"vm{self.count}"
        return launch_layered(config, layers, name=name, progress=self.progress)

    def _forget(self, vm: VM) -> None:
        with self._lock:
            self._vms = [v for v in self._vms if v is not vm]

    def release(self, vm: VM) -> None:
        """Stop owning ``vm`` (it is not closed at session end, never handed out again)."""
        self._forget(vm)
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.discard(vm)

    def adopt(self, vm: VM) -> None:
        """Take ownership of ``vm``: it is closed with the factory."""
        with self._lock:
            self._vms.append(vm)

    def close_all(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        with self._lock:
            vms, self._vms = self._vms, []
        for vm in reversed(vms):
            try:
                vm.close()
            except Exception:
                log.exception("closing %r failed", vm)


FACTORY_KEY = pytest.StashKey[VMFactory]()
SETTINGS_KEY = pytest.StashKey[cfg.Settings]()


def get_factory(config: pytest.Config) -> VMFactory:
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is None:
        factory = VMFactory(config.stash[SETTINGS_KEY], progress=_terminal_progress(config))
        config.stash[FACTORY_KEY] = factory
    return factory


def _terminal_progress(config: pytest.Config) -> Progress:
    """Progress lines on the terminal even while output is captured."""

    def show(msg: str) -> None:
        log.info("%s", msg)
        if threading.current_thread() is not threading.main_thread():
            return  # a background start: the terminal and capturing belong to the test
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or config.get_verbosity() < 0:
            return
        if capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(f"gondolin: {msg}")
        else:
            reporter.write_line(f"gondolin: {msg}")

    return show


@pytest.fixture(scope="session")
def vm_factory(pytestconfig: pytest.Config) -> Iterator[VMFactory]:
    """Session-scoped factory: ``vm_factory(memory="1G", ...)`` boots a VM it closes at session end.

    Every VM needs the cache folder: without one, each test that asks for
    a VM fails at setup with the one message naming it; other tests run.
    """
    problem: str | None = None
    try:
        paths.cache_dir()
    except CacheDirError as exc:
        problem = str(exc)
    if problem is not None:  # outside the except: the message alone, not its chain
        pytest.fail(problem, pytrace=False)
    factory = get_factory(pytestconfig)
    yield factory
    factory.close_all()


@pytest.fixture(scope="session")
def session_vm(vm_factory: VMFactory) -> VM:
    """One VM for the whole session, never restored: state carries over between tests."""
    return vm_factory()


@pytest.fixture
def vm(vm_factory: VMFactory, request: pytest.FixtureRequest) -> Iterator[VM]:
    """A VM put back to a clean snapshot (RAM, devices, disk) before this test."""
    problem: str | None = None
    try:
        machine = vm_factory.clean_vm(vm_factory.guest_key(source="vm fixture"))
    except GondolinError as exc:
        problem = str(exc)
    if problem is not None:  # outside the except: the message alone, not its chain
        pytest.fail(problem, pytrace=False)
    if machine.network is not None:
        # The template is shared between tests: each starts deny-all with an empty vm.http.
        machine.configure_network()
    request.node.stash[ACTIVE_VM_KEY] = machine
    yield machine
    vm_factory.recycle(machine)


ACTIVE_VM_KEY = pytest.StashKey[VM]()
