"""pytest-gondolin's exception classes, on the guest side of the package.

The tree is drawn, with what each error carries, in the docstring of
:mod:`pytest_gondolin.errors`, which re-exports every name here. The
classes live here, standard library only, so the guest has the same ones:
a test module or conftest the guest imports may name them, and there
``pytest_gondolin.errors`` is this module.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from collections.abc import Iterable, Sequence


def tail_lines(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, joined with ``\\n`` (no trailing newline).

    Here, where error messages quote tails, because the guest half imports
    nothing of the host's; :mod:`pytest_gondolin.logtail` re-exports it.
    """
    if lines <= 0:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class GondolinError(Exception):
    """Root of every exception pytest-gondolin raises."""


class ConfigError(GondolinError):
    """A user-supplied option, marker argument or policy is invalid."""


class CacheDirError(ConfigError):
    """The cache folder cannot be created, or something a VM needs cannot be written to it.

    ``path`` is the cache folder (what ``GONDOLIN_CACHE_DIR`` sets),
    ``problem`` what is wrong with it, ``need`` what had to be written there
    (empty when the folder itself is the problem). Only VMs need the cache:
    tests without one run.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, *, need: str = "") -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.need = need
        where = f", and {need}" if need else ""
        super().__init__(
            f"the pytest-gondolin cache folder {self.path} {problem}{where}; "
            "set GONDOLIN_CACHE_DIR to a folder this user can write"
        )


class HostToolMissing(GondolinError):
    """A program the host needs is not installed."""

    def __init__(self, tool: str, package: str, purpose: str) -> None:
        self.tool = tool
        self.package = package
        self.purpose = purpose
        super().__init__(
            f"{tool!r} is needed to {purpose} but was not found on PATH; "
            f"install it with: sudo apt-get install {package}  "
            f"(macOS: brew install {'qemu' if 'qemu' in package else package})"
        )


class ImageError(GondolinError):
    """Building, locating or validating a guest image failed."""


class StateError(GondolinError):
    """An object was asked to do something its current state does not allow.

    ``state`` is the state it was in, ``required`` the states that would
    have allowed it (see :mod:`pytest_gondolin.statemachine`). This is a
    bug in the caller, not a failure of the guest.
    """

    def __init__(
        self, state: enum.Enum, required: enum.Enum | Iterable[enum.Enum], *, action: str = ""
    ) -> None:
        self.state = state
        self.required = (required,) if isinstance(required, enum.Enum) else tuple(required)
        self.action = action
        what = action or "this"
        if self.required:
            allowed = " or ".join(repr(r.value) for r in self.required)
            message = f"{what} needs state {allowed}, but the state is {state.value!r}"
        else:
            message = f"{what} is allowed in no state (the state is {state.value!r})"
        super().__init__(message)


class HostOnlyError(GondolinError):
    """A host-side object was used inside the guest.

    The guest has every public name of :mod:`pytest_gondolin`, so one module
    can hold sandboxed tests and host-side VM tests; ``VM``, ``Checkpoint``
    and the like are stand-ins there (:mod:`pytest_gondolin.guest.public`),
    and making one raises this. ``name`` is what was used, ``role`` what it
    does on the host.
    """

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        super().__init__(
            f"{name} is host-side (it {role}) and cannot be used inside the guest, where "
            "this @pytest.mark.sandboxed test runs; use it from a test that is not sandboxed"
        )


class VMError(GondolinError):
    """Something went wrong with a VM."""


#: Lines of QEMU stderr / console an error message quotes.
MESSAGE_TAIL_LINES = 40
#: Lines of a failed command's stdout / stderr an ExecError quotes.
EXEC_TAIL_LINES = 20


class VMLaunchError(VMError):
    """QEMU could not be started or the guest never became ready."""

    def __init__(
        self,
        reason: str,
        *,
        command: Sequence[str] = (),
        exitcode: int | None = None,
        stderr: str = "",
        console: str = "",
    ) -> None:
        self.reason = reason
        self.command = list(command)
        self.exitcode = exitcode
        self.stderr = stderr
        self.console = console
        parts = [f"VM failed to start: {reason}"]
        if exitcode is not None:
            parts.append(f"QEMU exit code: {exitcode}")
        if self.command:
            parts.append("QEMU command line:\n  " + " ".join(self.command))
        if stderr.strip():
            parts.append("QEMU stderr (tail):\n" + tail_lines(stderr, MESSAGE_TAIL_LINES))
        if console.strip():
            parts.append("guest console (tail):\n" + tail_lines(console, MESSAGE_TAIL_LINES))
        super().__init__("\n".join(parts))


class VMCrashed(VMError):
    """QEMU exited while the VM was in use."""

    def __init__(self, reason: str, *, exitcode: int | None = None, console: str = "") -> None:
        self.reason = reason
        self.exitcode = exitcode
        self.console = console
        msg = f"VM crashed: {reason}"
        if exitcode is not None:
            msg += f" (QEMU exit code {exitcode})"
        if console.strip():
            msg += "\nguest console (tail):\n" + tail_lines(console, MESSAGE_TAIL_LINES)
        super().__init__(msg)


class AgentError(VMError):
    """The guest agent reported an error or misbehaved."""


class AgentTimeout(AgentError, TimeoutError):
    """The agent did not answer within the deadline (the channel itself may still work)."""


class AgentRequestError(AgentError):
    """The agent refused or failed a request; ``errno`` is set when it was an OS error."""

    def __init__(self, request: str, message: str, errno: int | None) -> None:
        self.request = request
        self.message = message
        self.errno = errno
        suffix = f" (errno {errno})" if errno is not None else ""
        super().__init__(f"{request} failed in the guest: {message}{suffix}")


class GuestFileError(AgentRequestError, OSError):
    """``read_file`` / ``write_file`` failed in the guest; an ``OSError`` about the caller's path.

    ``errno`` and ``strerror`` are the guest's, ``filename`` is the guest
    path the caller passed, ``request`` the operation. Built by
    :func:`guest_file_error`, which picks the subclass for the errno.
    """

    def __init__(self, errno: int, strerror: str, filename: str, *, request: str = "") -> None:
        # The OSError signature, so copies (pickle, copy) rebuild the same error.
        OSError.__init__(self, errno, strerror, filename)
        self.request = request
        self.message = strerror

    def __str__(self) -> str:
        operation = f"{self.request} in the guest" if self.request else "in the guest"
        return f"{operation}: {OSError.__str__(self)}"


class GuestFileNotFoundError(GuestFileError, FileNotFoundError):
    """The guest path (or a folder on the way to it) does not exist (ENOENT)."""


class GuestFileExistsError(GuestFileError, FileExistsError):
    """Something already exists where the guest had to create a file (EEXIST)."""


class GuestPermissionError(GuestFileError, PermissionError):
    """The guest refused access to the path (EACCES, EPERM)."""


class GuestIsADirectoryError(GuestFileError, IsADirectoryError):
    """The guest path is a folder where a file was expected (EISDIR)."""


class GuestNotADirectoryError(GuestFileError, NotADirectoryError):
    """A part of the guest path that must be a folder is not one (ENOTDIR)."""


#: The guest is Linux; these errno values are the same on every host we run on.
_GUEST_FILE_ERRORS: dict[int, type[GuestFileError]] = {
    _errno.ENOENT: GuestFileNotFoundError,
    _errno.EEXIST: GuestFileExistsError,
    _errno.EACCES: GuestPermissionError,
    _errno.EPERM: GuestPermissionError,
    _errno.EISDIR: GuestIsADirectoryError,
    _errno.ENOTDIR: GuestNotADirectoryError,
}


def guest_file_error(request: str, path: str, errno: int | None, message: str) -> AgentRequestError:
    """The error for the agent's ``error`` answer to a file request about ``path``.

    A :class:`GuestFileError` subclass chosen by ``errno`` as ``OSError``
    chooses its own (any other errno: ``GuestFileError`` itself), naming
    ``path``; without an errno the agent failed for a reason that is not
    about the file, and this is a plain :class:`AgentRequestError`.
    """
    if errno is None:
        return AgentRequestError(request, message, errno)
    cls = _GUEST_FILE_ERRORS.get(errno, GuestFileError)
    return cls(errno, message, path, request=request)


class WireProtocolError(GondolinError):
    """A message on one of the host <-> guest wires broke that wire's protocol.

    The base of :class:`AgentProtocolError` and :class:`WorkerProtocolError`;
    catch it to treat "the other side spoke garbage" alike for both.
    """


class AgentProtocolError(WireProtocolError, AgentError):
    """A frame or message violated the agent protocol.

    Raised for bytes from the guest (hostile by assumption) as well as for
    malformed requests built on the host.
    """


class WorkerProtocolError(WireProtocolError):
    """A line from (or a command for) the in-guest test worker violated its protocol.

    The worker is hostile by assumption: every line it sends is bounded and
    checked (:mod:`pytest_gondolin.sandbox.messages`).
    """


class ExecError(VMError):
    """A command run with ``check=True`` exited non-zero."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        parts = [message]
        if stdout.strip():
            parts.append("stdout (tail):\n" + tail_lines(stdout, EXEC_TAIL_LINES))
        if stderr.strip():
            parts.append("stderr (tail):\n" + tail_lines(stderr, EXEC_TAIL_LINES))
        super().__init__("\n".join(parts))


class ExecTimeout(ExecError, TimeoutError):
    """A guest command ran past its timeout; its process group was killed."""


class SnapshotError(VMError):
    """Saving, restoring or checkpointing a VM failed."""


class NetworkPolicyError(GondolinError):
    """The host's network mediation refused a request or could not apply a policy."""
