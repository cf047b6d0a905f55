"""Which names the guest's DNS answers: only those the mediation knows.

The synthetic resolver (:class:`~.stack.dns.SyntheticResolver`) answers a
name only if some request or stream to it could be served: the policy
knows it (:meth:`~.http.policy.NetworkPolicy.knows_name`: an
``allow_hosts`` match, ``*`` included, a ``resolve`` or ``tcp`` entry) or
a stub on the current recorder names its host (stubs answer before the
policy is asked). Every other name gets NXDOMAIN, so a denied host fails
in the guest at lookup ("Could not resolve host", ``socket.gaierror``),
and the refused lookup is recorded as a "denied" :class:`~.http.recorder.Exchange`
with ``scheme="dns"``, ``port=53`` and ``[rule: dns]``.

A cassette's hosts need nothing extra: replay comes after the policy
(a denied request stays denied, replayed or not), so the policy already
names them. Sans-IO: the driver passes the current mediation context in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.mediation import MediationContext, with_rule
from pytest_gondolin.netpolicy.http.recorder import Exchange
from pytest_gondolin.netpolicy.http.rules import normalize_host
from pytest_gondolin.netpolicy.stack.dns import SyntheticResolver

__all__ = ["dns_denial", "knows_name", "policy_resolver"]

log = logging.getLogger(__name__)

#: The port a refused lookup is recorded with (the lookup names no port of its own).
_DNS_PORT: Final = 53


def knows_name(context: MediationContext, name: str) -> bool:
    """Whether the guest's DNS should answer ``name`` under ``context``. Never raises."""
    if context.policy.knows_name(name):
        return True
    try:
        host = normalize_host(name)
    except NetworkPolicyError:
        return False
    return any(urlsplit(stub.url).hostname == host for stub in context.recorder.stubs)


def dns_denial(context: MediationContext, name: str) -> Exchange:
    """The record of a refused lookup of ``name``: denied, ``[rule: dns]``, the reason why."""
    policy = context.policy
    if not (policy.allow_hosts or policy.resolve or policy.tcp):
        why = "allow_hosts is empty (all egress is denied by default)"
    else:
        why = "no allow_hosts pattern, resolve or tcp entry, or stub names it"
    reason = f"DNS lookup of {name!r} answered NXDOMAIN: {why}"
    return Exchange.connection_denied(name, _DNS_PORT, with_rule(reason, "dns"), scheme="dns")


def policy_resolver(context: Callable[[], MediationContext]) -> SyntheticResolver:
    """A resolver answering only the names :func:`knows_name` admits under ``context()``.

    ``context`` is read on every query, so a new policy or a stub applies
    to the next lookup. Each refused ``A`` query is recorded in the
    current recorder (:func:`dns_denial`).
    """

    def refused(name: str) -> None:
        current = context()
        current.recorder.record(dns_denial(current, name))
        log.debug("DNS lookup of %r refused: not a name the policy knows", name)

    return SyntheticResolver(admit=lambda name: knows_name(context(), name), on_refused=refused)
