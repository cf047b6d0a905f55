"""``Secret``: a real credential and the hosts it may be sent to, as a plain value.

A test module builds ``Secret`` values for its host-side tests
(``vm_factory(secrets={"TOKEN": Secret(value=..., hosts=[...])})``), often
at its top level; the guest imports the same module to collect its
sandboxed tests, so the class lives on the guest side of the package
(standard library only) and means the same on both sides. What the host
does with a secret -- placeholders, substitution, redaction -- is
:mod:`pytest_gondolin.netpolicy.http.secrets`.

``hosts`` entries use the ``allow_hosts`` grammar; that grammar belongs to
the host's policy (:mod:`pytest_gondolin.netpolicy.http.rules`), which
checks every entry when a secret is put on a VM (the marker at collection,
``vm_factory`` before anything boots) and names it as
``secrets['NAME'].hosts[i]``. Built here, a secret is checked for what
needs no grammar: a printable value, a non-empty list of non-empty strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pytest_gondolin.guest.errors import ConfigError

__all__ = ["Secret"]


@dataclass(frozen=True)
class Secret:
    """A real credential and the hosts it may be sent to.

    ``value`` must be a non-empty printable string (no CR/LF/NUL: it ends up
    in HTTP headers); ``hosts`` is a non-empty list of host patterns with
    the ``allow_hosts`` grammar (kept as a tuple). The value is kept out of
    ``repr``. Raises :class:`ConfigError` naming the bad field.
    """

    value: str
    hosts: Sequence[str]

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ConfigError("Secret.value: expected a non-empty string")
        if not self.value.isprintable():
            raise ConfigError(
                "Secret.value: contains control characters (CR, LF, NUL, ...), "
                "which cannot be sent in an HTTP header"
            )
        if isinstance(self.hosts, str | bytes) or not isinstance(self.hosts, Sequence):
            raise ConfigError(f"Secret.hosts: expected a list of host names, got {self.hosts!r}")
        if not self.hosts:
            raise ConfigError("Secret.hosts: empty; the secret could never be sent anywhere")
        for i, text in enumerate(self.hosts):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"Secret.hosts[{i}]: expected a host name string, got {text!r}")
        object.__setattr__(self, "hosts", tuple(self.hosts))

    def __repr__(self) -> str:
        return f"Secret(value=<redacted>, hosts={list(self.hosts)!r})"

    @classmethod
    def from_env(
        cls, name: str, hosts: Sequence[str], *, environ: Mapping[str, str] | None = None
    ) -> Secret:
        """A secret whose value is the host environment variable ``name``.

        This is what a plain host list in the ``sandboxed`` marker stands for.
        Raises :class:`ConfigError` if the variable is unset or empty.
        """
        env = os.environ if environ is None else environ
        value = env.get(name)
        if not value:
            raise ConfigError(
                f"secrets[{name!r}]: the host environment variable {name} is not set; "
                f"set it or pass Secret(value=..., hosts=...)"
            )
        try:
            return cls(value=value, hosts=hosts)
        except ConfigError as exc:
            raise ConfigError(f"secrets[{name!r}]: {exc}") from None
