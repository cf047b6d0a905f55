"""What a running VM does in its guest: commands and files, over the agent channel.

:class:`GuestOperations` is a base of :class:`~pytest_gondolin.vm.machine.VM`
and holds its guest API: ``exec``, ``spawn``, ``attach``, ``read_file``,
``write_file`` (and ``secret_env``, the placeholders every ``exec`` gets), and
the guest's wall clock (``refresh_clock``).
Each call goes over the VM's :class:`~pytest_gondolin.vm.channel.AgentChannel`;
a failure while QEMU exits under it becomes
:class:`~pytest_gondolin.errors.VMCrashed`. The VM's lifecycle, network and
checkpoints stay in :mod:`~pytest_gondolin.vm.machine`, which sets the
attributes declared here; its internal snapshots are the base between the
two (:mod:`~pytest_gondolin.vm.internal_snapshots`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from pytest_gondolin.errors import AgentError, AgentRequestError, ExecTimeout, VMError
from pytest_gondolin.statemachine import require
from pytest_gondolin.vm.agent_process import AgentProcess
from pytest_gondolin.vm.channel import DEFAULT_MAX_OUTPUT, AgentChannel
from pytest_gondolin.vm.commands import ExecResult, command_argv, command_env, exec_result
from pytest_gondolin.vm.guest_network import secret_env
from pytest_gondolin.vm.qemu_process import QemuProcess
from pytest_gondolin.vm.runstate import LAUNCHED, Runstate

if TYPE_CHECKING:  # annotations only: guest_network loads the stack when a guest needs it
    from pytest_gondolin.netpolicy.driver import NetworkDriver

__all__ = ["CLOCK_MAX_AGE", "MAX_READ_FILE", "GuestOperations"]

#: Largest file read_file() returns.
MAX_READ_FILE = 1024 * 1024 * 1024
#: A guest clock set this long ago is set again before a VM is handed out
#: (:meth:`GuestOperations.refresh_clock`): a guest clock off by 1% is then 10 ms off.
CLOCK_MAX_AGE = 1.0


class GuestOperations:
    """The guest API of a :class:`~pytest_gondolin.vm.machine.VM` (see the module docstring)."""

    # Set by VM: its name, lifecycle state, agent channel, QEMU child and network driver.
    name: str
    _state: Runstate
    _channel: AgentChannel | None
    _qemu: QemuProcess | None
    network: NetworkDriver | None
    #: When the host last set the guest's wall clock (``time.monotonic()``).
    _clock_set_at: float | None

    @property
    def state(self) -> Runstate:
        return self._state

    def secret_env(self) -> dict[str, str]:
        """``{NAME: placeholder}`` for the current policy's secrets (empty without secrets)."""
        return secret_env(self.network)

    def _refresh_guest(self) -> None:
        """Give a freshly booted guest the host's wall clock and fresh entropy."""
        ch = self._require_channel()
        ch.add_entropy(os.urandom(64))
        ch.set_clock(time.time_ns())
        self._clock_set_at = time.monotonic()

    @require(Runstate.RUNNING)
    def refresh_clock(self, max_age: float = CLOCK_MAX_AGE) -> bool:
        """Set the guest's wall clock to the host's unless it was set under ``max_age`` s ago.

        Returns whether it was set. A guest keeps its own time between the
        host's settings, at the rate its kernel calibrated at boot; under TCG
        that rate can be off (the calibration is against emulated timers),
        so a VM that waited running after its restore (in a
        :class:`~pytest_gondolin.vm.pool.RestorePool`) gets the host's time
        again when it is handed out. Raises VMError if the agent does not answer.
        """
        set_at = self._clock_set_at
        if set_at is not None and time.monotonic() - set_at < max_age:
            return False
        try:
            self._require_channel().set_clock(time.time_ns())
        except (TimeoutError, VMError) as exc:
            self._crash_check(exc)
            raise VMError(f"{self.name}: setting the guest clock failed: {exc}") from exc
        self._clock_set_at = time.monotonic()
        return True

    @contextlib.contextmanager
    def _crash_checked(self) -> Iterator[None]:
        """An agent call: its own refusal passes as is; any other failure is checked for a crashed QEMU."""
        try:
            yield
        except AgentRequestError:
            raise  # the agent answered: the VM is up, no crash to look for
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise

    def _require_channel(self) -> AgentChannel:
        if self._state is Runstate.CLOSED:
            raise VMError(f"{self.name} is closed")
        if self._channel is None:
            raise VMError(f"{self.name} is not running")
        return self._channel

    def _crash_check(self, exc: BaseException) -> None:
        """Raise VMCrashed (from ``exc``) if QEMU exited under the failed operation."""
        crashed = self._qemu.crash_error(exc) if self._qemu is not None else None
        if crashed is not None:
            raise crashed from exc

    @require(*LAUNCHED)
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
        command_environment = command_env(env, self.secret_env())
        argv = command_argv(cmd)
        data = input.encode() if isinstance(input, str) else input
        if timeout is not None and timeout <= 0:
            raise ValueError(f"exec: timeout must be positive, got {timeout!r}")
        channel = self._require_channel()
        try:
            raw = channel.exec(
                argv,
                input=data,
                env=command_environment,
                cwd=cwd,
                timeout=timeout,
                max_output=max_output,
            )
        except ExecTimeout:
            raise
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise
        result = exec_result(raw, argv, timeout)
        if check:
            result.check_returncode()
        return result

    @require(*LAUNCHED)
    def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically; parents created).

        Raises :class:`~pytest_gondolin.errors.GuestFileError` if the guest
        cannot: an ``OSError`` (``PermissionError``, ``NotADirectoryError``, ...)
        whose ``filename`` is ``path``.
        """
        blob = data.encode() if isinstance(data, str) else bytes(data)
        channel = self._require_channel()
        try:
            channel.write_file(path, blob, mode=mode)
        except AgentRequestError:
            raise  # the agent answered: the VM is up, no crash to look for
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise

    @require(*LAUNCHED)
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

    @require(*LAUNCHED)
    def attach(
        self, process: AgentProcess, *, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> AgentProcess:
        """Attach to ``process``, started in the VM this one was cloned from (see AgentChannel.attach)."""
        return self._require_channel().attach(process, max_output=max_output)

    @require(*LAUNCHED)
    def bind_folders(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Bind each ``(disk folder, folder)`` pair's disk folder over its folder, in the agent.

        For :mod:`~pytest_gondolin.vm.disk_backed` (which owns the rules and
        the shell fallback). Raises AgentRequestError (errno ENOTEMPTY) when
        a folder holds files, before anything is bound.
        """
        channel = self._require_channel()
        with self._crash_checked():
            channel.bind(list(pairs))

    @require(*LAUNCHED)
    def unpack_tar(self, path: str, *, folder: str, timeout: float) -> None:
        """Unpack the guest's tar file ``path`` at ``/`` in the agent, remove it, make ``folder``.

        For a small tree (``sandbox/worker_setup.py``; ``guest/unpack.py``
        says why). Raises AgentRequestError when the agent could not.
        """
        channel = self._require_channel()
        with self._crash_checked():
            channel.unpack(path, folder, timeout=timeout)

    @require(*LAUNCHED)
    def read_file(self, path: str, *, max_size: int = MAX_READ_FILE) -> bytes:
        """Return the contents of the regular file ``path`` in the guest.

        Raises :class:`~pytest_gondolin.errors.GuestFileError` if the guest
        cannot: an ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``,
        ...; EFBIG past ``max_size``) whose ``filename`` is ``path``.
        """
        channel = self._require_channel()
        try:
            return channel.read_file(path, max_size=max_size)
        except AgentRequestError:
            raise  # the agent answered: the VM is up, no crash to look for
        except (AgentError, VMError) as exc:
            self._crash_check(exc)
            raise
