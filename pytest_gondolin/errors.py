"""Exceptions raised by pytest-gondolin.

Every error the plugin raises derives from :class:`GondolinError`; nothing
from ``OSError``, ``h11`` or ``qemu.qmp`` escapes the public API unwrapped.
Errors carry the data needed to act on them (a command line, a console
tail, the policy rule that decided).

::

    GondolinError
     ├── ConfigError              a bad option, marker argument or policy (names the value)
     ├── HostToolMissing          a host program is absent (names the package to install)
     ├── ImageError               building, finding or validating a guest image failed
     ├── StateError               a method was called in a state that does not allow it
     │                            (carries the state and the required ones: a caller's bug)
     ├── VMError                  anything about a running (or dead) VM
     │    ├── VMLaunchError       QEMU exited or the agent never answered during boot
     │    ├── VMCrashed           QEMU died after boot (carries exit code, console tail)
     │    ├── AgentError          the guest agent reported a failure or misbehaved
     │    │    ├── AgentTimeout        the agent did not answer within the deadline
     │    │    ├── AgentRequestError   the agent refused or failed one request (errno)
     │    │    └── AgentProtocolError  *
     │    ├── ExecError           a guest command failed (check=True) ...
     │    │    └── ExecTimeout    ... or ran past its timeout and was killed
     │    └── SnapshotError       saving / restoring / checkpointing failed
     ├── WireProtocolError        a message on a host <-> guest wire broke its protocol
     │    ├── AgentProtocolError  * a bad agent frame or request (either side); also an AgentError
     │    └── WorkerProtocolError a bad line from (or for) the in-guest test worker
     └── NetworkPolicyError       the host's network mediation refused or failed

``AgentProtocolError`` sits under both ``AgentError`` (the agent is who
broke it) and ``WireProtocolError`` (what broke). ``WorkerProtocolError``
is not an ``AgentError``: the test worker's line protocol has nothing to do
with the agent's frames, even though its lines ride on an agent process.
The guest-side codec (:mod:`pytest_gondolin.guest.protocol`, stdlib only)
raises its own ``FrameError``; the host maps it to
``AgentProtocolError`` at the boundary.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

from pytest_gondolin.logtail import tail_lines


class GondolinError(Exception):
    """Root of every exception pytest-gondolin raises."""


class ConfigError(GondolinError):
    """A user-supplied option, marker argument or policy is invalid."""


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
