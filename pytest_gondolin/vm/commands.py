"""A guest command as the caller gives it and as the agent runs it, and what it did.

Pure values and functions (no VM needed): :func:`command_argv` turns
``vm.exec``'s ``cmd`` into an argv, :func:`command_env` adds the network
policy's secret placeholders to its environment, and :func:`exec_result`
turns the agent's answer into an :class:`ExecResult` (or ExecTimeout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pytest_gondolin.errors import ExecError, ExecTimeout
from pytest_gondolin.vm.agent_calls import RawExecResult

__all__ = ["GUEST_ENV", "ExecResult", "command_argv", "command_env", "exec_result"]

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


def command_argv(cmd: str | Sequence[str]) -> list[str]:
    """The argv for ``cmd``: a ``str`` runs under ``/bin/sh -c``; ValueError for an empty argv."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("exec: empty argv")
    return argv


def command_env(
    env: Mapping[str, str] | None, placeholders: Mapping[str, str]
) -> dict[str, str] | None:
    """The environment a command gets (None: the agent's own).

    With secret ``placeholders``, each is set on top of ``env`` (or of
    :data:`GUEST_ENV` without one); a name ``env`` sets wins.
    """
    if placeholders:
        return {**(GUEST_ENV if env is None else {}), **placeholders, **(env or {})}
    return dict(env) if env is not None else None


def exec_result(raw: RawExecResult, argv: Sequence[str], timeout: float | None) -> ExecResult:
    """The :class:`ExecResult` of ``raw``; ExecTimeout if the guest killed it at ``timeout``."""
    result = ExecResult(raw.returncode, raw.stdout, raw.stderr, raw.truncated, tuple(argv))
    if raw.timed_out:
        raise ExecTimeout(
            f"guest command {list(argv)!r} timed out after {timeout} s; its process group was killed",
            argv=list(argv),
            returncode=raw.returncode,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result
