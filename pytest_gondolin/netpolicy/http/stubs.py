"""Stubs: canned responses the host answers with itself, and the URL form they match.

This module owns :class:`Stub` (what ``vm.http.stub(...)`` registers),
:func:`normalize_url` (the one form stub URLs and request URLs are compared
in) and the bounds on stubs a sandboxed test may register. The
:class:`~.recorder.Recorder` keeps the stubs of a test and enforces those
bounds; the driver consults it before the policy, so a stub needs no
``allow_hosts`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.guest.recording import Headers
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, format_authority, normalize_host

__all__ = ["MAX_STUBS", "MAX_STUB_BODY_BYTES", "MAX_STUB_BYTES", "Stub", "normalize_url"]

#: Body bytes of one stub: a canned answer, not a download mirror.
MAX_STUB_BODY_BYTES: Final = 1 << 20
#: Stubs registered on one recorder (distinct method and URL).
MAX_STUBS: Final = 256
#: Bytes of all stubs of one recorder (bodies, URLs, headers).
MAX_STUB_BYTES: Final = 16 << 20


def normalize_url(url: str) -> str:
    """Lower-case scheme, IDNA-normalise the host, drop the default port and fragment.

    Raises :class:`ConfigError` for something that is not an absolute
    http(s) URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{url!r} is not an absolute http:// or https:// URL")
    try:
        host = normalize_host(parts.hostname)
    except NetworkPolicyError:
        raise ConfigError(f"{url!r} does not name a valid host") from None
    netloc = format_authority(host, None if port == DEFAULT_PORTS[scheme] else port)
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


@dataclass(frozen=True)
class Stub:
    """A canned response: ``method`` (``"*"`` for any) and ``url`` to match.

    A stub URL without a query string matches the URL whatever its query;
    with one, the query must be identical.
    """

    method: str
    url: str
    status: int
    body: bytes
    headers: Headers = field(default=())

    def matches(self, method: str, url: str) -> bool:
        """Whether a request ``method url`` gets this stub (``url`` normalised or not)."""
        if self.method != "*" and self.method != method.upper():
            return False
        try:
            wanted = normalize_url(url)
        except ConfigError:
            return False
        if "?" in self.url:
            return wanted == self.url
        return wanted.split("?", 1)[0] == self.url
