"""Exceptions raised by pytest-gondolin.

Every error the plugin raises derives from :class:`GondolinError`; nothing
from ``OSError``, ``h11`` or ``qemu.qmp`` escapes the public API unwrapped.
Errors carry the data needed to act on them (a command line, a console
tail, the policy rule that decided).

::

    GondolinError
     ├── ConfigError            a bad option, marker argument or policy (names the value)
     ├── HostToolMissing        a host program is absent (names the package to install)
     ├── ImageError             building, finding or validating a guest image failed
     ├── VMError                anything about a running (or dead) VM
     │    ├── VMLaunchError     QEMU exited or the agent never answered during boot
     │    ├── VMCrashed         QEMU died after boot (carries exit code, console tail)
     │    ├── AgentError        the guest agent broke protocol or reported a failure
     │    │    └── ProtocolError  a malformed frame or message (from either side)
     │    ├── ExecError         a guest command failed (check=True) ...
     │    │    └── ExecTimeout  ... or ran past its timeout and was killed
     │    └── SnapshotError     saving / restoring / checkpointing failed
     └── NetworkPolicyError     the host's network mediation refused or failed
"""

from __future__ import annotations

from collections.abc import Sequence


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


class VMError(GondolinError):
    """Something went wrong with a VM."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


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
            parts.append("QEMU stderr (tail):\n" + _tail(stderr))
        if console.strip():
            parts.append("guest console (tail):\n" + _tail(console))
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
            msg += "\nguest console (tail):\n" + _tail(console)
        super().__init__(msg)


class AgentError(VMError):
    """The guest agent reported an error or misbehaved."""


class ProtocolError(AgentError):
    """A frame or message violated the agent protocol.

    Raised for bytes from the guest (hostile by assumption) as well as for
    malformed requests built on the host.
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
            parts.append("stdout (tail):\n" + _tail(stdout, 20))
        if stderr.strip():
            parts.append("stderr (tail):\n" + _tail(stderr, 20))
        super().__init__("\n".join(parts))


class ExecTimeout(ExecError, TimeoutError):
    """A guest command ran past its timeout; its process group was killed."""


class SnapshotError(VMError):
    """Saving, restoring or checkpointing a VM failed."""


class NetworkPolicyError(GondolinError):
    """The host's network mediation refused a request or could not apply a policy."""
