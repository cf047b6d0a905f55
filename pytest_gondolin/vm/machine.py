"""A running guest: the QEMU child process, its QMP monitor and agent channel.

Lifecycle (guarded by :class:`Runstate`)::

    CREATED --launch()--> BOOTING --agent ready--> RUNNING --close()--> CLOSED
                               \\--failure--> CLOSED (VMLaunchError)

``close()`` is soft then hard (QMP ``quit``, SIGTERM, SIGKILL), idempotent,
and always removes the runtime folder. QEMU runs in its own session (Ctrl-C
reaches pytest, which then closes VMs in order) under ``setpriv
--pdeathsig KILL`` so it cannot outlive the process that launched it.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_gondolin import hosttools, paths
from pytest_gondolin.errors import (
    AgentError,
    ExecError,
    ExecTimeout,
    SnapshotError,
    VMCrashed,
    VMError,
    VMLaunchError,
)
from pytest_gondolin.image.store import Image
from pytest_gondolin.logtail import read_tail_text
from pytest_gondolin.vm import checkpoint as ckpt
from pytest_gondolin.vm import payload, reaper
from pytest_gondolin.vm.accel import qemu_version
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.channel import AgentChannel
from pytest_gondolin.vm.qemu import MachineSpec, command_line, privilege_drop_args
from pytest_gondolin.vm.qmp import QMP

if TYPE_CHECKING:  # imported lazily at launch: the plugin's start-up stays cheap
    from pytest_gondolin.netpolicy.cassette import CassettePlayer
    from pytest_gondolin.netpolicy.driver import NetworkDriver
    from pytest_gondolin.netpolicy.policy import NetworkPolicy
    from pytest_gondolin.netpolicy.recorder import Recorder

log = logging.getLogger(__name__)

#: Cold boot is ~5 s under TCG here; 120 s (Gondolin's bound) covers a
#: loaded CI host running two guests on two cores.
BOOT_TIMEOUT = 120.0
#: Soft shutdown: how long QEMU gets to exit after QMP quit / SIGTERM.
SHUTDOWN_GRACE = 3.0
#: Exec output kept per command (stdout + stderr); more is dropped and flagged.
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
#: Largest file read_file() returns.
MAX_READ_FILE = 1024 * 1024 * 1024
#: The environment guest commands get when the caller gives none (sysinit sets the same).
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "NODE_EXTRA_CA_CERTS": "/etc/ssl/certs/ca-certificates.crt",
}
#: How many console bytes error messages quote.
CONSOLE_TAIL_BYTES = 8192


class Runstate(enum.Enum):
    CREATED = "created"
    BOOTING = "booting"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class ExecResult:
    """What a guest command did. ``stdout``/``stderr`` are decoded with replacement."""

    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    truncated: bool = False
    argv: tuple[str, ...] = ()

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check_returncode(self) -> ExecResult:
        """Return self, or raise ExecError if the command exited non-zero."""
        if self.returncode != 0:
            raise ExecError(
                f"guest command {list(self.argv)!r} exited with {self.returncode}",
                argv=self.argv,
                returncode=self.returncode,
                stdout=self.stdout,
                stderr=self.stderr,
            )
        return self


@dataclass(frozen=True)
class VMConfig:
    """The options that decide what guest is booted."""

    image: Image
    accel: str = "tcg"
    memory_mib: int = 256
    cpus: int = 1
    boot_timeout: float = BOOT_TIMEOUT
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    #: An externally served ``-netdev stream`` socket; overrides ``network``.
    net_socket: Path | None = None
    #: virtio-net's largest MTU: ~2x the download throughput of 1500 under
    #: TCG here (fewer frames per byte for the emulated guest and for the
    #: host's Python stack); the MSS both sides use follows from it.
    mtu: int = 65520
    #: Give the guest eth0 served by a NetworkDriver of its own (default policy:
    #: deny all egress; see :meth:`VM.configure_network`). The CA the guest
    #: trusts goes into the boot payload.
    network: bool = True
    #: QEMU gets SIGKILL when the launching thread's process dies (``setpriv
    #: --pdeathsig``). Off only for VMs that may be kept for debugging
    #: (``--gondolin-keep-vm``); the next run's reaper removes those.
    die_with_parent: bool = True


@dataclass(frozen=True)
class Snapshot:
    """A full-VM snapshot (RAM, devices, disk) held inside one VM's overlay."""

    vm_token: str
    tag: str
    created: float


_LIVE: weakref.WeakSet[VM] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    """Safety net: no QEMU outlives the interpreter, even if a caller forgot close()."""
    for vm in list(_LIVE):
        vm.close()


def boot_initrd(config: VMConfig) -> Path:
    """The initrd (image base + per-boot payload) a VM with ``config`` boots."""
    files = {**config.extra_files, "mtu": str(config.mtu).encode()}
    if config.network and config.net_socket is None and "ca.pem" not in files:
        from pytest_gondolin.netpolicy.driver import default_ca

        files["ca.pem"] = default_ca().ca_pem  # one CA per cache dir: stable payload
    return payload.combined_initrd(
        config.image.initrd,
        payload.build_payload(files),
        paths.cache_dir() / "boot",
    )


def state_key(config: VMConfig) -> str:
    """A digest of everything that shapes a booted guest's RAM and devices.

    Two VMs with equal keys boot into interchangeable states, so a saved
    ready-state snapshot of one can stand in for a cold boot of the other.
    """
    qemu = hosttools.require("qemu-system-x86_64")
    parts = {
        "image": config.image.build_id,
        "initrd": boot_initrd(config).name,
        "accel": config.accel,
        "memory": config.memory_mib,
        "cpus": config.cpus,
        "net": _has_network(config),
        "mtu": config.mtu,
        "qemu": qemu_version(qemu),
        "cmdline": command_line(
            MachineSpec(
                qemu="q",
                accel=config.accel,
                kernel=Path("k"),
                initrd=Path("i"),
                disk=Path("d"),
                rundir=Path("r"),
                memory_mib=config.memory_mib,
                cpus=config.cpus,
                net_socket=Path("n") if _has_network(config) else None,
                mtu=config.mtu,
            )
        ),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _has_network(config: VMConfig) -> bool:
    """Whether the guest gets a NIC (an external socket, or a driver of its own)."""
    return config.net_socket is not None or config.network


def _setpriv_prefix(die_with_parent: bool = True) -> list[str]:
    """``setpriv`` in front of QEMU: parent-death signal, and no capabilities (see qemu.py)."""
    setpriv = shutil.which("setpriv")
    options = (["--pdeathsig", "KILL"] if die_with_parent else []) + privilege_drop_args(
        os.geteuid()
    )
    return [setpriv, *options, "--"] if setpriv and options else []


class VM:
    """One guest. Use :meth:`launch` (or the fixtures) to get a running VM."""

    def __init__(self, config: VMConfig, *, name: str = "vm") -> None:
        self.config = config
        self.name = name
        self.state = Runstate.CREATED
        self.rundir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._channel: AgentChannel | None = None
        self._argv: list[str] = []
        self._lock = threading.Lock()
        self._close_hooks: list[Callable[[], object]] = []
        self.boot_seconds: float | None = None
        self.http: Recorder | None = None  # the network driver's recorder (vm.http)
        self.network: NetworkDriver | None = None  # started by launch() when config.network
        self.token = uuid.uuid4().hex
        self._snapshots = 0
        self._backing: Path = config.image.rootfs

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    def launch(
        cls,
        config: VMConfig,
        *,
        name: str = "vm",
        loadvm_disk: Path | None = None,
        loadvm_tag: str | None = None,
        backing: Path | None = None,
    ) -> VM:
        """Boot a VM and return it once its agent answers. Raises VMLaunchError.

        With ``loadvm_disk``/``loadvm_tag``, the disk is a copy of that qcow2 and
        QEMU starts from its internal snapshot instead of booting. With
        ``backing``, the overlay sits on that qcow2 (a checkpoint) instead of
        the image's root disk.
        """
        vm = cls(config, name=name)
        if backing is not None:
            vm._backing = backing
        _LIVE.add(vm)
        try:
            vm._start(loadvm_disk, loadvm_tag)
        except BaseException:
            vm.close()
            raise
        return vm

    def _start(self, loadvm_disk: Path | None, loadvm_tag: str | None) -> None:
        started = time.monotonic()
        self.state = Runstate.BOOTING
        qemu = hosttools.require("qemu-system-x86_64")
        qemu_img = hosttools.require("qemu-img")
        self.rundir = rundir = reaper.new_rundir()
        disk = rundir / "disk.qcow2"
        if loadvm_disk is not None:
            _copy_file(loadvm_disk, disk)
        else:
            res = subprocess.run(
                [
                    qemu_img,
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    str(self._backing),
                    str(disk),
                ],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if res.returncode != 0:
                raise VMLaunchError(
                    f"qemu-img create failed: {res.stderr.strip()}", command=res.args
                )
        initrd = boot_initrd(self.config)
        net_socket = self.config.net_socket
        if net_socket is None and self.config.network:
            # QEMU connects to this socket as it starts: it must listen first.
            self.network = self._start_network(rundir)
            net_socket = self.network.socket_path
        spec = MachineSpec(
            qemu=qemu,
            accel=self.config.accel,
            kernel=self.config.image.kernel,
            initrd=initrd,
            disk=disk,
            rundir=rundir,
            memory_mib=self.config.memory_mib,
            cpus=self.config.cpus,
            net_socket=net_socket,
            mtu=self.config.mtu,
            loadvm=loadvm_tag,
        )
        self._argv = argv = command_line(spec)
        log.info(
            "%s: starting QEMU (%s, %d MiB)", self.name, self.config.accel, self.config.memory_mib
        )
        with (rundir / "qemu.log").open("wb") as errlog:
            self._proc = subprocess.Popen(
                _setpriv_prefix(self.config.die_with_parent) + argv,
                stdin=subprocess.DEVNULL,
                stdout=errlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=rundir,
            )
        (rundir / "qemu.pid").write_text(f"{self._proc.pid}\n")
        deadline = started + self.config.boot_timeout
        self._wait_for_sockets(spec, deadline)
        self._qmp = QMP(f"gondolin-{rundir.name}")
        self._qmp.connect(str(spec.qmp_socket))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(spec.agent_socket))
        except OSError as exc:
            sock.close()
            raise self._launch_error(f"cannot connect to the agent socket: {exc}") from exc
        self._channel = AgentChannel(sock, name=self.name)
        if loadvm_tag is not None:
            self._resync(deadline)
        else:
            self._wait_ready(deadline)
        self.state = Runstate.RUNNING
        self.boot_seconds = time.monotonic() - started
        if loadvm_tag is None:  # a restore's sync already brought entropy and the clock
            self._refresh_guest()
        log.info("%s: ready in %.2f s", self.name, self.boot_seconds)

    def _start_network(self, rundir: Path) -> NetworkDriver:
        """Start this VM's network driver (deny-all policy) and attach its recorder as ``http``."""
        from pytest_gondolin.errors import NetworkPolicyError
        from pytest_gondolin.netpolicy.driver import NetworkDriver

        try:
            driver = NetworkDriver(rundir / "net.sock", mtu=self.config.mtu, name=self.name)
        except NetworkPolicyError as exc:
            raise VMLaunchError(f"cannot start the guest network: {exc}") from exc
        self.http = driver.recorder
        return driver

    def configure_network(
        self, policy: NetworkPolicy | None = None, *, cassette: CassettePlayer | None = None
    ) -> Recorder:
        """Mediate the guest's traffic by ``policy`` from now on (default: deny all).

        Host-side only: no reboot, no restore. ``vm.http`` becomes a fresh
        recorder (redacting the policy's secrets) and is returned; the
        secrets' placeholders go into the environment of later ``exec``
        calls. Raises VMError if the VM has no network of its own.
        """
        from pytest_gondolin.netpolicy.policy import NetworkPolicy
        from pytest_gondolin.netpolicy.recorder import Recorder
        from pytest_gondolin.netpolicy.secrets import SecretStore

        if self.network is None:
            raise VMError(f"{self.name} has no network driver (VMConfig.network is off)")
        policy = policy if policy is not None else NetworkPolicy()
        store = SecretStore(policy.secrets) if policy.secrets else None
        recorder = Recorder(redactor=store)
        self.network.configure(policy, store, recorder, cassette)
        self.http = recorder
        return recorder

    def secret_env(self) -> dict[str, str]:
        """``{NAME: placeholder}`` for the current policy's secrets (empty without secrets)."""
        store = self.network.secrets if self.network is not None else None
        return store.env() if store is not None else {}

    def _wait_for_sockets(self, spec: MachineSpec, deadline: float) -> None:
        while not (spec.qmp_socket.exists() and spec.agent_socket.exists()):
            self._raise_if_exited("QEMU exited before creating its sockets")
            if time.monotonic() > deadline:
                raise self._launch_error("QEMU did not create its sockets in time")
            time.sleep(0.005)

    def _wait_ready(self, deadline: float) -> None:
        assert self._channel is not None
        while True:
            self._raise_if_exited("QEMU exited during boot")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._launch_error(
                    f"the guest agent did not answer within {self.config.boot_timeout:.0f} s"
                )
            try:
                self._channel.wait_ready(timeout=min(0.25, remaining))
                return
            except (TimeoutError, VMError) as exc:
                if self._channel.closed:
                    self._raise_if_exited("QEMU exited during boot")
                    raise self._launch_error(f"agent channel closed during boot: {exc}") from exc

    def _resync(self, deadline: float) -> None:
        assert self._channel is not None
        try:
            self._channel.sync(
                timeout=max(1.0, deadline - time.monotonic()),
                entropy=os.urandom(64),
                clock_ns=time.time_ns(),
            )
        except (TimeoutError, VMError) as exc:
            self._raise_if_exited("QEMU exited while restoring")
            raise self._launch_error(f"the agent did not answer after restore: {exc}") from exc

    def _refresh_guest(self) -> None:
        """Give a freshly booted guest the host's wall clock and fresh entropy."""
        ch = self._require_channel()
        ch.add_entropy(os.urandom(64))
        ch.set_clock(time.time_ns())

    def _raise_if_exited(self, reason: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise self._launch_error(reason)

    def _launch_error(self, reason: str) -> VMLaunchError:
        code = self._proc.poll() if self._proc is not None else None
        return VMLaunchError(
            reason,
            command=self._argv,
            exitcode=code,
            stderr=self.qemu_log(),
            console=self.console_log(),
        )

    def qemu_log(self) -> str:
        """QEMU's own stderr so far (empty if unavailable)."""
        return read_tail_text(self.rundir / "qemu.log" if self.rundir else None, CONSOLE_TAIL_BYTES)

    def console_log(self) -> str:
        """The tail of the guest's serial console."""
        return read_tail_text(
            self.rundir / "console.log" if self.rundir else None, CONSOLE_TAIL_BYTES
        )

    @property
    def alive(self) -> bool:
        """True while the VM is running and its QEMU process has not exited."""
        return (
            self.state is Runstate.RUNNING and self._proc is not None and self._proc.poll() is None
        )

    def exited(self, grace: float = 0.0) -> bool:
        """Whether QEMU has exited, waiting up to ``grace`` s once the agent connection is gone.

        A guest that panics or powers off takes QEMU down a moment after its
        agent connection drops, so "connection lost" alone does not tell a
        dying VM from a live one. While the connection is up there is no wait.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        if grace <= 0 or (self._channel is not None and not self._channel.closed):
            return False
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def command(self) -> list[str]:
        return list(self._argv)

    def add_close_hook(self, hook: Callable[[], object]) -> None:
        """Run ``hook`` when the VM closes (before its runtime folder is removed)."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        """Stop the VM and remove everything it created. Safe to call more than once."""
        with self._lock:
            if self.state is Runstate.CLOSED:
                return
            self.state = Runstate.CLOSED
        _LIVE.discard(self)
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: close hook failed", self.name)
        if self._channel is not None:
            self._channel.close()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._qmp is not None:
                try:
                    self._qmp.cmd("quit", timeout=SHUTDOWN_GRACE)
                except VMError:
                    pass
            _stop_process(proc)
        if self._qmp is not None:
            self._qmp.close()
        if self.network is not None:  # after QEMU: it never sees its link drop
            self.network.close()
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
        with self._lock:
            if self.state is not Runstate.RUNNING or self.rundir is None:
                raise VMError(f"{self.name} is not running; only a running VM can be detached")
            self.state = Runstate.CLOSED
        _LIVE.discard(self)
        self._close_hooks = []
        if self._channel is not None:
            self._channel.close()
        if self._qmp is not None:
            self._qmp.close()
        if self.network is not None:
            self.network.close()
        return self.rundir

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state.value} pid={self.pid}>"

    # -- guest operations ----------------------------------------------------

    def _require_channel(self) -> AgentChannel:
        if self.state is Runstate.CLOSED:
            raise VMError(f"{self.name} is closed")
        if self._channel is None:
            raise VMError(f"{self.name} is not running")
        return self._channel

    def _crash_check(self, exc: BaseException) -> None:
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                return
            raise VMCrashed(
                f"QEMU exited during a guest operation ({exc})",
                exitcode=proc.returncode,
                console=self.console_log(),
            ) from exc

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        check: bool = False,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``cmd`` in the guest and wait for it.

        A ``str`` runs under ``/bin/sh -c``; a sequence is the argv. ``timeout``
        kills the command's whole process group and raises ExecTimeout;
        ``check=True`` raises ExecError on a non-zero exit.

        Secrets: when the network policy declares secrets, each ``NAME`` is
        set to its placeholder in the command's environment (the host swaps
        in the real value on the way to the secret's hosts). Without ``env``
        that is the default guest environment plus the placeholders; an
        explicit ``env`` wins for any name it sets.
        """
        placeholders = self.secret_env()
        if placeholders:
            env = {**(GUEST_ENV if env is None else {}), **placeholders, **(env or {})}
        if isinstance(cmd, str):
            argv = ["/bin/sh", "-c", cmd]
        else:
            argv = [str(a) for a in cmd]
            if not argv:
                raise ValueError("exec: empty argv")
        data = input.encode() if isinstance(input, str) else input
        if timeout is not None and timeout <= 0:
            raise ValueError(f"exec: timeout must be positive, got {timeout!r}")
        channel = self._require_channel()
        try:
            raw = channel.exec(
                argv,
                input=data,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                timeout=timeout,
                max_output=max_output,
            )
        except ExecTimeout:
            raise
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise
        result = ExecResult(raw.returncode, raw.stdout, raw.stderr, raw.truncated, tuple(argv))
        if raw.timed_out:
            raise ExecTimeout(
                f"guest command {argv!r} timed out after {timeout} s; its process group was killed",
                argv=argv,
                returncode=raw.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        if check:
            result.check_returncode()
        return result

    def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically; parents created)."""
        blob = data.encode() if isinstance(data, str) else bytes(data)
        channel = self._require_channel()
        try:
            channel.write_file(path, blob, mode=mode)
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> AgentProcess:
        """Start ``argv`` in the guest without waiting; stream its stdin and output."""
        channel = self._require_channel()
        try:
            return channel.spawn(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                max_output=max_output,
            )
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise

    def attach(
        self, process: AgentProcess, *, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> AgentProcess:
        """Attach to ``process``, started in the VM this one was cloned from (see AgentChannel.attach)."""
        return self._require_channel().attach(process, max_output=max_output)

    def read_file(self, path: str, *, max_size: int = MAX_READ_FILE) -> bytes:
        """Return the contents of ``path`` in the guest."""
        channel = self._require_channel()
        try:
            return channel.read_file(path, max_size=max_size)
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise

    # -- snapshots -------------------------------------------------------------

    def _hmp(self, command: str, timeout: float = 120.0) -> None:
        if self._qmp is None:
            raise VMError(f"{self.name} is not running")
        out = self._qmp.cmd("human-monitor-command", timeout=timeout, **{"command-line": command})
        if isinstance(out, str) and out.strip():
            raise SnapshotError(f"{command!r} failed: {out.strip()}")

    def save_internal(self, tag: str) -> None:
        """Save RAM, devices and disk as internal snapshot ``tag`` of the overlay."""
        self._require_channel()
        self._hmp(f"savevm {tag}")

    def load_internal(self, tag: str, *, preserve: Sequence[AgentProcess] = ()) -> None:
        """Put the VM back to internal snapshot ``tag`` and resynchronize the agent.

        ``preserve``: processes that were running when ``tag`` was saved; they stay attached.
        """
        channel = self._require_channel()
        # Paused across loadvm and the network reset (loadvm keeps the run
        # state it found), so no frame of the old or the restored guest
        # crosses the reset: nothing a test did on the network survives it.
        self.pause()
        self._hmp(f"loadvm {tag}")
        if self.network is not None:
            from pytest_gondolin.errors import NetworkPolicyError

            try:
                self.network.reset()
            except NetworkPolicyError as exc:
                raise SnapshotError(f"{self.name}: restoring {tag!r}: {exc}") from exc
            self.http = self.network.recorder
        self.resume()
        try:
            channel.sync(
                timeout=30.0, preserve=preserve, entropy=os.urandom(64), clock_ns=time.time_ns()
            )
        except (TimeoutError, VMError) as exc:
            self._crash_check(exc)
            raise SnapshotError(f"the agent did not answer after restoring {tag!r}: {exc}") from exc

    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``)."""
        if self._qmp is None:
            raise VMError(f"{self.name} is not running")
        self._qmp.cmd("stop")

    def resume(self) -> None:
        """Let the guest's vCPUs run again (QMP ``cont``)."""
        if self._qmp is None:
            raise VMError(f"{self.name} is not running")
        self._qmp.cmd("cont")

    def snapshot(self) -> Snapshot:
        """Save the whole VM (RAM, devices, disk); restore it with :meth:`restore`, any number of times."""
        self._snapshots += 1
        tag = f"snap-{self._snapshots}"
        self.save_internal(tag)
        return Snapshot(self.token, tag, time.time())

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM back exactly to ``snapshot``; the guest then gets fresh entropy and the host's clock."""
        if not isinstance(snapshot, Snapshot) or snapshot.vm_token != self.token:
            raise SnapshotError(
                f"{snapshot!r} was not taken of {self.name}; snapshots restore only into their own VM"
            )
        self.load_internal(snapshot.tag)

    def export_disk(self, target: Path, metadata: dict[str, object]) -> None:
        """Copy this VM's current disk (guest view, minus the image) to ``target`` with metadata."""
        if self.rundir is None:
            raise SnapshotError(f"{self.name} has no disk")
        ckpt.export_disk(self.rundir / "disk.qcow2", self._backing, target, metadata)

    def checkpoint(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Sync and stop the VM, keep its disk as checkpoint ``path``; the VM is closed afterwards.

        Disk only (Gondolin semantics): RAM, processes and tmpfs paths are not kept.
        """
        target = Path(path)
        channel = self._require_channel()
        try:
            channel.exec(["sync"], input=None, env=None, cwd=None, timeout=60.0, max_output=4096)
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise SnapshotError(f"{self.name}: sync before checkpoint failed: {exc}") from exc
        if self._qmp is not None:
            self._qmp.cmd("stop")
            # Exit QEMU so every qcow2 metadata cache is on disk before we read the file.
            try:
                self._qmp.cmd("quit", timeout=SHUTDOWN_GRACE)
            except VMError:
                pass
        if self._proc is not None:
            _stop_process(self._proc)
        try:
            meta: dict[str, object] = {
                "image_build_id": self.config.image.build_id,
                "image_name": self.config.image.name,
                "image_rootfs": str(self.config.image.rootfs),
                "memory_mib": self.config.memory_mib,
            }
            self.export_disk(target, meta)
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
        from pytest_gondolin.config import parse_memory
        from pytest_gondolin.image.store import ensure_image
        from pytest_gondolin.vm.accel import choose_accel

        config = self._config
        if config is None or image is not None:
            img = ensure_image(image) if image is not None else ensure_image()
            config = VMConfig(
                image=img,
                accel=choose_accel(accel or "auto").name,
                memory_mib=int(str(self.metadata.get("memory_mib", 256))),
            )
        if config.image.build_id != self.build_id:
            raise SnapshotError(
                f"checkpoint {self.path} was made from image build {self.build_id}, "
                f"but the VM would use image build {config.image.build_id}"
            )
        if memory is not None:
            config = dataclasses.replace(
                config, memory_mib=parse_memory(memory, "resume(memory=...)")
            )
        if accel is not None:
            config = dataclasses.replace(config, accel=choose_accel(accel).name)
        ckpt.ensure_backing(self.path, config.image.rootfs)
        return VM.launch(config, name=name, backing=self.path)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, reflinking where the filesystem allows."""
    cp = shutil.which("cp")
    if cp:
        res = subprocess.run(
            [cp, "--reflink=auto", "--sparse=always", str(src), str(dst)], capture_output=True
        )
        if res.returncode == 0:
            return
    shutil.copyfile(src, dst)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=SHUTDOWN_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue
