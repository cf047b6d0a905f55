"""An honest echo upstream, and the pipeline around it, for the secret redaction tests.

:class:`EchoServer` answers every request with the secret it received --
the ``X-Tok`` header (read as ISO-8859-1, as every HTTP server does), or
the password of ``Authorization: Basic`` (UTF-8) -- in the form its path
names (:data:`ENCODINGS`: the encodings a well-behaved server applies on
its own), and it honours ``Range`` (single and multiple ranges, RFC 9110
§14), ``Want-Repr-Digest`` and ``Accept-Charset`` on ``/echo``. Nothing
here is hostile: it shows what an ordinary server does with what it is
given, which is what redaction has to withstand.

:data:`ENCODINGS` maps a name to the encoder *and* its inverse, so a test
can decode what the guest got (or, as the negative control, what the
upstream sent) and look for the value in clear.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode
from xml.sax.saxutils import escape as xml_escape

from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from pytest_gondolin.netpolicy.http.upstream import fetch_upstream

#: Sent as ``X-Tok`` (ISO-8859-1 on the wire): every character an escaping touches.
LATIN_VALUE = "Tök/en&<x>\"' +=%9;#ab12XYzw"
#: Sent inside ``Authorization: Basic`` (UTF-8): beyond ISO-8859-1 too.
WIDE_VALUE = "Pä/ss€😀&<w>\"k3y 'q+=x"


# --------------------------------------------------------------------------- encodings


@dataclass(frozen=True)
class Encoding:
    """How an honest server writes a value it echoes, and how a client reads it back.

    ``decode(encode(v)) == v``. ``whole``: a redacted body still decodes to
    the placeholder (False where redaction overwrites the value's bits).
    """

    encode: Callable[[str], bytes]
    decode: Callable[[bytes], str]
    latin1_only: bool = False
    whole: bool = True


def _json_go(v: str) -> bytes:
    # Go's encoding/json: no ensure_ascii, but <, > and & as \u003c... (HTML-safe)
    text = json.dumps({"echo": v}, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _entities(v: str, template: str) -> bytes:
    return "".join(c if c.isascii() and c.isalnum() else template.format(ord(c)) for c in v).encode(
        "ascii"
    )


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def _b64_inside(prefix: bytes, suffix: bytes) -> Encoding:
    return Encoding(
        lambda v: base64.b64encode(prefix + v.encode() + suffix),
        lambda b: base64.b64decode(b)[len(prefix) : -len(suffix)].decode("utf-8", "replace"),
        whole=False,
    )


ENCODINGS: dict[str, Encoding] = {
    "utf-8": Encoding(lambda v: f"echo:{v}:end".encode(), lambda b: b.decode()[5:-4]),
    "latin-1": Encoding(
        lambda v: f"echo:{v}:end".encode("latin-1"),
        lambda b: b.decode("latin-1")[5:-4],
        latin1_only=True,
    ),
    "json-ascii": Encoding(
        lambda v: json.dumps({"echo": v}).encode(), lambda b: json.loads(b)["echo"]
    ),
    "json-utf8": Encoding(
        lambda v: json.dumps({"echo": v}, ensure_ascii=False).encode(),
        lambda b: json.loads(b)["echo"],
    ),
    "json-php": Encoding(  # PHP json_encode: \/ and \uXXXX by default
        lambda v: json.dumps({"echo": v}).replace("/", "\\/").encode(),
        lambda b: json.loads(b)["echo"],
    ),
    "json-go": Encoding(_json_go, lambda b: json.loads(b)["echo"]),
    "json-mojibake": Encoding(  # a server that read UTF-8 bytes as ISO-8859-1
        lambda v: json.dumps({"echo": v.encode().decode("latin-1")}).encode(),
        lambda b: json.loads(b)["echo"].encode("latin-1").decode("utf-8", "replace"),
    ),
    "html": Encoding(
        lambda v: f"<p>{html.escape(v)}</p>".encode(), lambda b: html.unescape(b.decode())[3:-4]
    ),
    "html-decimal": Encoding(lambda v: _entities(v, "&#{};"), lambda b: html.unescape(b.decode())),
    "html-hex": Encoding(lambda v: _entities(v, "&#x{:X};"), lambda b: html.unescape(b.decode())),
    "xml": Encoding(
        lambda v: f"<e>{xml_escape(v, {chr(34): '&quot;', chr(39): '&apos;'})}</e>".encode(),
        lambda b: html.unescape(b.decode())[3:-4],
    ),
    "query": Encoding(
        lambda v: f"q={quote(v, safe='')}&n=1".encode(),
        lambda b: unquote(b.decode()[2:-4]),
    ),
    "query-plus": Encoding(
        lambda v: urlencode({"q": v, "n": 1}).encode(), lambda b: parse_qs(b.decode())["q"][0]
    ),
    "query-lower": Encoding(
        lambda v: _lower_hex(quote(v, safe="")).encode(), lambda b: unquote(b.decode())
    ),
    "query-latin1": Encoding(
        lambda v: quote(v, safe="", encoding="latin-1").encode(),
        lambda b: unquote(b.decode(), encoding="latin-1"),
        latin1_only=True,
    ),
    "utf-16": Encoding(
        lambda v: f"echo:{v}:end".encode("utf-16"), lambda b: b.decode("utf-16")[5:-4]
    ),
    "utf-16-le": Encoding(
        lambda v: f"echo:{v}:end".encode("utf-16-le"), lambda b: b.decode("utf-16-le")[5:-4]
    ),
    "utf-16-be": Encoding(
        lambda v: f"echo:{v}:end".encode("utf-16-be"), lambda b: b.decode("utf-16-be")[5:-4]
    ),
    "base64": Encoding(
        lambda v: base64.b64encode(v.encode()), lambda b: base64.b64decode(b).decode()
    ),
    "base64-url": Encoding(
        lambda v: base64.urlsafe_b64encode(v.encode()).rstrip(b"="),
        lambda b: base64.urlsafe_b64decode(b + b"==").decode(),
    ),
    "base64-json-php": Encoding(
        lambda v: (
            json.dumps({"b": base64.b64encode(v.encode()).decode()}).replace("/", "\\/").encode()
        ),
        lambda b: base64.b64decode(json.loads(b)["b"]).decode(),
    ),
    "base64-bearer": Encoding(  # the whole header echoed as base64: the value ends the blob
        lambda v: base64.b64encode(b"Bearer " + v.encode()),
        lambda b: base64.b64decode(b).decode()[7:],
    ),
    "base64-inside-1": _b64_inside(b"x", b"yz!"),
    "base64-inside-2": _b64_inside(b"ab", b"?"),
    "base64-inside-0": _b64_inside(b"abc", b"-tail"),
    "hex": Encoding(
        lambda v: v.encode().hex().encode(), lambda b: bytes.fromhex(b.decode()).decode()
    ),
    "hex-upper": Encoding(
        lambda v: v.encode().hex().upper().encode(), lambda b: bytes.fromhex(b.decode()).decode()
    ),
}


# --------------------------------------------------------------------------- the server


@dataclass
class EchoServer:
    """What the echo upstream saw: every request's header fields, in order."""

    port: int = 0
    seen: list[list[tuple[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last(self) -> dict[str, str]:
        with self.lock:
            return {n.lower(): v for n, v in self.seen[-1]}


def secret_in(headers: Any) -> str:
    """The value a request carried: the Basic password, else ``X-Tok``."""
    auth = headers.get("Authorization", "")
    if auth.startswith("Basic "):
        return base64.b64decode(auth[6:]).decode("utf-8").partition(":")[2]
    return str(headers.get("X-Tok", ""))


def _ranges(spec: str, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` as inclusive (first, last) pairs, or None if it is not one."""
    unit, _, sets = spec.partition("=")
    if unit.strip() != "bytes":
        return None
    out = []
    for part in sets.split(","):
        first, _, last = part.strip().partition("-")
        if not first:  # a suffix range: the last N bytes
            out.append((max(0, size - int(last)), size - 1))
        else:
            out.append((int(first), min(size - 1, int(last) if last else size - 1)))
    return out


def _handler(echo: EchoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(
            self, status: int, headers: list[tuple[str, str]], body: bytes, send_body: bool
        ) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _reply(self, send_body: bool) -> None:
            with echo.lock:
                echo.seen.append(list(self.headers.items()))
            value = secret_in(self.headers)
            path = self.path.split("?", 1)[0]
            if path.startswith("/enc/"):
                body = ENCODINGS[path[5:]].encode(value)
                self._send(200, [("Content-Type", "text/plain")], body, send_body)
            elif path == "/header-utf8":  # the value's UTF-8 bytes in a response header
                shown = value.encode().decode("latin-1")
                self._send(200, [("X-Echo", shown)], b"ok", send_body)
            elif path == "/header-name":  # the value (a token) inside a field name
                self._send(200, [(f"X-Echo-{value}", "1")], b"ok", send_body)
            elif path == "/always-206":  # partial content whatever was asked
                body = f"echo:{value}:end".encode()
                span = f"bytes 0-{len(body) - 1}/{len(body)}"
                self._send(206, [("Content-Range", span)], body, send_body)
            elif path == "/content-range":  # a whole body, labelled as a range
                body = f"echo:{value}:end".encode()
                span = f"bytes 0-{len(body) - 1}/{len(body)}"
                self._send(200, [("Content-Range", span)], body, send_body)
            else:
                self._echo(value, send_body)

        def _echo(self, value: str, send_body: bool) -> None:
            """``echo:<value>:end``, honouring Range, Want-Repr-Digest and Accept-Charset."""
            charset = "utf-8"
            for wanted in self.headers.get("Accept-Charset", "").split(","):
                if wanted.strip().lower() in {"cp500", "utf-16-le", "utf-8"}:
                    charset = wanted.strip().lower()
                    break
            body = f"echo:{value}:end".encode(charset)
            headers = [
                ("Content-Type", f"text/plain; charset={charset}"),
                ("Accept-Ranges", "bytes"),
                ("Content-MD5", base64.b64encode(hashlib.md5(body).digest()).decode()),
            ]
            if "sha-256" in self.headers.get("Want-Repr-Digest", ""):
                digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
                headers.append(("Repr-Digest", f"sha-256=:{digest}:"))
            spec = self.headers.get("Range")
            ranges = _ranges(spec, len(body)) if spec else None
            if not ranges:
                self._send(200, headers, body, send_body)
            elif len(ranges) == 1:
                first, last = ranges[0]
                headers.append(("Content-Range", f"bytes {first}-{last}/{len(body)}"))
                self._send(206, headers, body[first : last + 1], send_body)
            else:  # RFC 9110 §14.6: one part per range
                parts = []
                for first, last in ranges:
                    parts.append(
                        b"--SEP\r\nContent-Type: text/plain\r\n"
                        + f"Content-Range: bytes {first}-{last}/{len(body)}\r\n\r\n".encode()
                        + body[first : last + 1]
                        + b"\r\n"
                    )
                multipart = b"".join(parts) + b"--SEP--\r\n"
                kind = ("Content-Type", "multipart/byteranges; boundary=SEP")
                self._send(206, [*headers[1:], kind], multipart, send_body)

        def do_GET(self) -> None:
            self._reply(send_body=True)

        def do_HEAD(self) -> None:
            self._reply(send_body=False)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def echo_server() -> Iterator[EchoServer]:
    """Serve an :class:`EchoServer` on 127.0.0.1 until the block ends."""
    state = EchoServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- the pipeline


def context(echo: EchoServer, **secrets: str) -> MediationContext:
    """api.test -> the echo server, with ``secrets`` (name -> value) allowed there."""
    policy = NetworkPolicy(
        allow_hosts=["api.test"],
        resolve={"api.test:80": f"127.0.0.1:{echo.port}"},
        secrets={name: Secret(value=v, hosts=["api.test"]) for name, v in secrets.items()},
    )
    store = SecretStore(policy.secrets)
    return MediationContext(policy, store, Recorder(redactor=store))


def request(
    target: str, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...], method: str = "GET"
) -> HttpRequest:
    """A guest request for http://api.test``target`` with ``headers`` (Host added)."""
    path, _, query = target.partition("?")
    return HttpRequest(
        method, target, "http", "api.test", 80, path, query, (("Host", "api.test"), *headers), b""
    )


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def mediate(ctx: MediationContext, guest: HttpRequest) -> tuple[UpstreamJob, Mediated]:
    """Run ``guest`` through the real pipeline (plan, upstream, record)."""
    job = plan_request(guest, 0.0, ctx)
    assert isinstance(job, UpstreamJob), job
    outcome = run_upstream(job, timeout=20.0)
    ctx.recorder.record(outcome.exchange)
    return job, outcome


def unmediated(
    echo: EchoServer, job: UpstreamJob, extra: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    """The negative control: the *substituted* request, plus ``extra`` fields, sent directly."""
    names = {n.lower() for n, _ in extra}
    headers = tuple((n, v) for n, v in job.outgoing.headers if n.lower() not in names)
    direct = dataclasses.replace(job.outgoing, headers=(*headers, *extra))
    return fetch_upstream(direct, "127.0.0.1", echo.port, tls=False, server_hostname=None)
