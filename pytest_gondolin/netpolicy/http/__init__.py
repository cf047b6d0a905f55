"""The HTTP layer: what the host does with the guest's TCP flows, sans-IO.

A flow's first bytes say what it speaks; HTTP is parsed, TLS is
terminated with the host's CA first; every request is judged by the
policy, gets its secrets, is answered (upstream, stub, cassette or a
denial) and recorded. Nothing here knows packets: flows come from the
stack through :mod:`pytest_gondolin.netpolicy.relay`. One module per concern:

=======================  ===================================================
:mod:`.rules`            host names, ports and host patterns (one grammar)
:mod:`.hostaddrs`        this host's own addresses, for ``block_internal``
:mod:`.internal_ranges`  the address ranges ``block_internal`` denies
:mod:`.policy`           :class:`NetworkPolicy`: which destinations are allowed
:mod:`.secrets`          placeholders in the guest, real values upstream
:mod:`.secret_forms`     finding a value in the encodings an honest echo applies
:mod:`.secret_patterns`  how each encoded form of a value is written and replaced
:mod:`.sniff`            what a flow speaks (request line or ClientHello)
:mod:`.ca`               the CA and leaf certificates for TLS interception
:mod:`.messages`         request and response values and their limits
:mod:`.guest_requests`   the events and body budget both guest-facing servers share
:mod:`.destination`      the destination rule (Host, target, port, TLS name)
:mod:`.interceptor`      one flow's HTTP/1.1 requests, parsed and refused
:mod:`.h2_server`        one flow's HTTP/2 streams (ALPN ``h2``), bounded
:mod:`.h2_streams`       that connection's h2 state and per-stream records
:mod:`.h2_requests`      HTTP/2 header blocks to and from requests, responses
:mod:`.mitm`             one flow: sniff, TLS, interceptor
:mod:`.content_coding`   decoding coded bodies so secrets can be redacted
:mod:`.upstream`         the client that talks to the real server
:mod:`.upstream_h2`      the same over HTTP/2, for HTTP/2 requests (trailers)
:mod:`.mediation`        the pipeline from a request to its answer
:mod:`.recorder`         every exchange, for ``vm.http`` and ``http_traffic``
:mod:`.stubs`            canned responses and the URL form they match
:mod:`.cassette`         record and replay (player and record modes)
:mod:`.cassette_match`   preparing and matching requests against a cassette
:mod:`.cassette_values`  what a cassette holds, and cassette errors
:mod:`.cassette_file`    the cassette YAML format
:mod:`.cassette_paths`   where a test's cassette lives
=======================  ===================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gondolin.netpolicy.http.ca import CertificateAuthority, default_ca
    from pytest_gondolin.netpolicy.http.cassette import (
        RECORD_MODES,
        CassettePlayer,
        RecordMode,
        open_cassette,
    )
    from pytest_gondolin.netpolicy.http.cassette_paths import (
        default_cassette_path,
        resolve_cassette_option,
    )
    from pytest_gondolin.netpolicy.http.cassette_values import CassetteError, CassetteMismatch
    from pytest_gondolin.netpolicy.http.mediation import MediationContext
    from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
    from pytest_gondolin.netpolicy.http.mitm import FlowProxy
    from pytest_gondolin.netpolicy.http.policy import Decision, NetworkPolicy
    from pytest_gondolin.netpolicy.http.recorder import Exchange, Recorder, Stub
    from pytest_gondolin.netpolicy.http.secrets import Secret, SecretLeak, SecretStore

__all__ = [
    "RECORD_MODES",
    "CassetteError",
    "CassetteMismatch",
    "CassettePlayer",
    "CertificateAuthority",
    "Decision",
    "Exchange",
    "FlowProxy",
    "HttpRequest",
    "HttpResponse",
    "MediationContext",
    "NetworkPolicy",
    "RecordMode",
    "Recorder",
    "Secret",
    "SecretLeak",
    "SecretStore",
    "Stub",
    "default_ca",
    "default_cassette_path",
    "open_cassette",
    "resolve_cassette_option",
]

# Lazy: the plugin imports a few of these modules at start-up; TLS, h11
# and the upstream client load only when a VM gets a network.
_LAZY = {
    "CertificateAuthority": "pytest_gondolin.netpolicy.http.ca",
    "default_ca": "pytest_gondolin.netpolicy.http.ca",
    "CassettePlayer": "pytest_gondolin.netpolicy.http.cassette",
    "RECORD_MODES": "pytest_gondolin.netpolicy.http.cassette",
    "RecordMode": "pytest_gondolin.netpolicy.http.cassette",
    "open_cassette": "pytest_gondolin.netpolicy.http.cassette",
    "default_cassette_path": "pytest_gondolin.netpolicy.http.cassette_paths",
    "resolve_cassette_option": "pytest_gondolin.netpolicy.http.cassette_paths",
    "CassetteError": "pytest_gondolin.netpolicy.http.cassette_values",
    "CassetteMismatch": "pytest_gondolin.netpolicy.http.cassette_values",
    "HttpRequest": "pytest_gondolin.netpolicy.http.messages",
    "HttpResponse": "pytest_gondolin.netpolicy.http.messages",
    "FlowProxy": "pytest_gondolin.netpolicy.http.mitm",
    "MediationContext": "pytest_gondolin.netpolicy.http.mediation",
    "Decision": "pytest_gondolin.netpolicy.http.policy",
    "NetworkPolicy": "pytest_gondolin.netpolicy.http.policy",
    "Exchange": "pytest_gondolin.netpolicy.http.recorder",
    "Recorder": "pytest_gondolin.netpolicy.http.recorder",
    "Stub": "pytest_gondolin.netpolicy.http.recorder",
    "Secret": "pytest_gondolin.netpolicy.http.secrets",
    "SecretLeak": "pytest_gondolin.netpolicy.http.secrets",
    "SecretStore": "pytest_gondolin.netpolicy.http.secrets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
