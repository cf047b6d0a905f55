"""Secrets: the guest holds placeholders, the host substitutes real values.

A test declares ``secrets={"GITHUB_TOKEN": Secret(value=..., hosts=["api.github.com"])}``
(:class:`Secret` is a plain value defined in :mod:`pytest_gondolin.guest.secret`,
so a test module holding one imports in the guest too; re-exported here).
The guest never sees the value: its environment gets a random placeholder

    ``GONDOLIN_SECRET_<NAME>_<32 lower-case hex digits>``

(``<NAME>`` is the secret's name as declared; the suffix is 128 random bits
from :func:`secrets.token_hex`, fresh per :class:`SecretStore`). When the
guest sends a request, :meth:`SecretStore.apply` replaces placeholders with
the real values **only in request header values** (including inside
``Authorization: Basic base64(user:pass)``, RFC 7617) and **only when the
destination matches one of the secret's hosts** (same patterns as
``allow_hosts``). A placeholder anywhere else — the URL, the body, a header
name, or any header going to another host — is refused with
:class:`SecretLeak`, whose message names the secret but never its value.

:meth:`SecretStore.redact` turns real values (and the Basic credentials
this store built from them) back into placeholders, for the guest, logs
and recordings: not only the value's bytes but every common faithful
encoding of it -- JSON, HTML and percent escapes, UTF-16, base64, hex --
listed in :mod:`.secret_forms`. It cannot see a value inside a compressed
body: :mod:`.mediation` asks the upstream for ``Accept-Encoding: identity``
(and no ranges) on every request carrying a value and decodes (or
refuses) a coded response before redacting it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets as _random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, overload

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.guest.secret import Secret
from pytest_gondolin.netpolicy.http.rules import HostPattern, normalize_host, parse_host_pattern
from pytest_gondolin.netpolicy.http.secret_forms import SecretForms

__all__ = [
    "CREDENTIAL_HEADERS",
    "PLACEHOLDER_PREFIX",
    "Secret",
    "SecretLeak",
    "SecretStore",
    "check_secret_name",
]

log = logging.getLogger(__name__)

PLACEHOLDER_PREFIX: Final = "GONDOLIN_SECRET_"
#: Random hex digits at the end of a placeholder (128 bits).
PLACEHOLDER_TOKEN_HEX: Final = 32
# An environment-variable-like name; bounded so placeholders stay short.
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_BASIC_RE: Final = re.compile(r"\s*(basic)\s+([A-Za-z0-9+/=]+)\s*", re.IGNORECASE)
#: Headers carrying RFC 7617 Basic credentials (lower case).
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization"})
# How many derived Basic tokens are remembered for redaction (bounded: the
# guest chooses the user names).
_MAX_DERIVED: Final = 1024


def check_secret_name(name: object, *, where: str) -> str:
    """Return ``name`` if it is a valid secret name, else raise :class:`ConfigError`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid secret name "
            "(letters, digits and '_', not starting with a digit, at most 64)"
        )
    return name


class SecretLeak(NetworkPolicyError):
    """A secret placeholder appeared where it must not be substituted.

    Carries ``name`` (the secret's name, never its value), ``where``
    (``"url"``, ``"body"``, ``"header name"``, ``"header 'X'"``) and ``host``.
    """

    def __init__(self, name: str, where: str, host: str, hosts: Sequence[str]) -> None:
        self.name = name
        self.where = where
        self.host = host
        super().__init__(
            f"secret {name} (placeholder) found in the request {where} to {host}; "
            f"placeholders are only substituted in header values sent to {list(hosts)!r}"
        )


@dataclass(frozen=True)
class _Entry:
    name: str
    value: str
    placeholder: str
    patterns: tuple[HostPattern, ...]
    hosts: tuple[str, ...]

    def allows(self, host: str, port: int | None) -> bool:
        return any(p.matches(host, port) for p in self.patterns)


class SecretStore:
    """Placeholders for the guest and substitution/redaction on the host.

    Thread-safe: :meth:`apply` runs on the network thread while
    :meth:`redact` may run anywhere.
    """

    def __init__(
        self,
        secrets: Mapping[str, Secret],
        *,
        token_hex: Callable[[int], str] = _random.token_hex,
    ) -> None:
        entries: list[_Entry] = []
        for name, secret in secrets.items():
            check_secret_name(name, where=f"secrets[{name!r}]")
            if not isinstance(secret, Secret):
                raise ConfigError(
                    f"secrets[{name!r}]: expected a Secret, got {type(secret).__name__}"
                )
            token = token_hex(PLACEHOLDER_TOKEN_HEX // 2)
            entries.append(
                _Entry(
                    name=name,
                    value=secret.value,
                    placeholder=f"{PLACEHOLDER_PREFIX}{name}_{token}",
                    patterns=tuple(
                        parse_host_pattern(h, where=f"secrets[{name!r}].hosts[{i}]")
                        for i, h in enumerate(secret.hosts)
                    ),
                    hosts=tuple(secret.hosts),
                )
            )
        self._entries: tuple[_Entry, ...] = tuple(entries)
        # Every encoding of every value, compiled once (longest value first).
        self._forms = SecretForms([(e.value, e.placeholder) for e in entries])
        self._lock = threading.Lock()
        # base64 token we built (real creds) -> the guest's token (placeholders)
        self._derived: OrderedDict[str, str] = OrderedDict()

    @property
    def names(self) -> tuple[str, ...]:
        """The secret names, in declaration order."""
        return tuple(e.name for e in self._entries)

    def names_for(self, host: str) -> tuple[str, ...]:
        """The secrets whose hosts include ``host`` on any port, in declaration order.

        Port-blind on purpose: one server may answer on several ports.
        """
        return tuple(
            e.name for e in self._entries if any(p.matches(host, p.port) for p in e.patterns)
        )

    def placeholder(self, name: str) -> str:
        """The placeholder standing for secret ``name`` (``KeyError`` if unknown)."""
        for entry in self._entries:
            if entry.name == name:
                return entry.placeholder
        raise KeyError(name)

    def env(self) -> dict[str, str]:
        """``{NAME: placeholder}``, to put in the guest's environment."""
        return {e.name: e.placeholder for e in self._entries}

    # ------------------------------------------------------------------ apply

    def _found(self, text: str) -> list[_Entry]:
        return [e for e in self._entries if e.placeholder in text]

    def apply(
        self,
        host: str,
        headers: Sequence[tuple[str, str]],
        url: str,
        body: bytes,
        *,
        port: int | None = None,
    ) -> tuple[list[tuple[str, str]], str]:
        """Substitute placeholders in header values for a request to ``host[:port]``.

        Returns the new header list (same order) and the URL (unchanged).
        Raises :class:`SecretLeak` if a placeholder is in the URL, the body,
        a header name, or in a header while ``host`` does not match that
        secret's hosts; nothing is substituted then. Header values the
        substitution makes unencodable as ISO-8859-1 raise
        :class:`NetworkPolicyError`.
        """
        try:
            dest = normalize_host(host)
        except NetworkPolicyError:
            dest = ""
        shown = host if port is None else f"{host}:{port}"
        for entry in self._found(url):
            raise SecretLeak(entry.name, "url", shown, entry.hosts)
        body_bytes = bytes(body)
        for entry in self._entries:
            if entry.placeholder.encode("ascii") in body_bytes:
                raise SecretLeak(entry.name, "body", shown, entry.hosts)
        out: list[tuple[str, str]] = []
        for name, value in headers:
            for entry in self._found(name):
                raise SecretLeak(entry.name, "header name", shown, entry.hosts)
            out.append((name, self._substitute_header(name, value, dest, port, shown)))
        return out, url

    def _check_allowed(
        self, found: list[_Entry], where: str, dest: str, port: int | None, shown: str
    ) -> None:
        for entry in found:
            if not dest or not entry.allows(dest, port):
                raise SecretLeak(entry.name, where, shown, entry.hosts)

    def _replace(self, text: str, found: list[_Entry]) -> str:
        for entry in found:
            text = text.replace(entry.placeholder, entry.value)
        return text

    def _substitute_header(
        self, name: str, value: str, dest: str, port: int | None, shown: str
    ) -> str:
        where = f"header {name!r}"
        found = self._found(value)
        if found:
            self._check_allowed(found, where, dest, port, shown)
            new = self._replace(value, found)
            try:
                new.encode("latin-1")
            except UnicodeEncodeError:
                names = ", ".join(e.name for e in found)
                raise NetworkPolicyError(
                    f"secret {names} cannot be sent in {where}: not ISO-8859-1 text"
                ) from None
            log.debug(
                "substituted secret(s) %s in %s for %s", [e.name for e in found], where, shown
            )
            return new
        if name.lower() in CREDENTIAL_HEADERS:
            return self._substitute_basic(value, where, dest, port, shown)
        return value

    def _substitute_basic(
        self, value: str, where: str, dest: str, port: int | None, shown: str
    ) -> str:
        match = _BASIC_RE.fullmatch(value)
        if match is None:
            return value
        token = match.group(2)
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return value
        # RFC 7617 §2.1: the charset is UTF-8 when declared; plenty of clients
        # send ISO-8859-1, which decodes any byte string, so fall back to it.
        charset = "utf-8"
        try:
            creds = raw.decode(charset)
        except UnicodeDecodeError:
            charset = "latin-1"
            creds = raw.decode(charset)
        found = self._found(creds)
        if not found:
            return value
        self._check_allowed(found, where + " (Basic credentials)", dest, port, shown)
        try:
            encoded = self._replace(creds, found).encode(charset)
        except UnicodeEncodeError:
            charset = "utf-8"
            encoded = self._replace(creds, found).encode(charset)
        new_token = base64.b64encode(encoded).decode("ascii")
        with self._lock:
            self._derived[new_token] = token
            self._derived.move_to_end(new_token)
            while len(self._derived) > _MAX_DERIVED:
                self._derived.popitem(last=False)
        log.debug(
            "substituted secret(s) %s in %s Basic credentials for %s",
            [e.name for e in found],
            where,
            shown,
        )
        return f"{match.group(1)} {new_token}"

    # ------------------------------------------------------------------ redact

    @overload
    def redact(self, data: str) -> str: ...

    @overload
    def redact(self, data: bytes) -> bytes: ...

    def redact(self, data: str | bytes) -> str | bytes:
        """Replace every real secret value in ``data``, in any form, with its placeholder.

        The forms are those of :mod:`.secret_forms` (the value's UTF-8 and
        ISO-8859-1 bytes, escaped as JSON, HTML or percent-encoding, UTF-16,
        base64, hex). Also replaces the Basic-credential tokens
        :meth:`apply` built, so an upstream echoing ``Authorization`` back
        does not leak into records. Same type out as in. A ``str`` is
        searched as the bytes it stands for: ISO-8859-1 when it encodes so
        (header values are bytes decoded so, losslessly), else UTF-8.
        """
        with self._lock:
            derived = list(self._derived.items())
        if isinstance(data, bytes):
            out = bytes(data)
            for new_token, guest_token in derived:
                out = out.replace(new_token.encode("ascii"), guest_token.encode("ascii"))
            return self._forms.redact(out)
        for new_token, guest_token in derived:
            data = data.replace(new_token, guest_token)
        try:
            raw = data.encode("latin-1")
        except UnicodeEncodeError:
            raw = data.encode("utf-8", "surrogatepass")
            out = self._forms.redact(raw)
            if out == raw:
                return data
            try:
                return out.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:  # a match cut a character: what is left is not the value
                return out.decode("utf-8", "replace")
        out = self._forms.redact(raw)
        return data if out == raw else out.decode("latin-1")
