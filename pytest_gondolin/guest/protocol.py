"""Wire protocol between the host and the in-guest agent (sans-IO, stdlib only).

This module owns the byte format and the message table; it has no sockets,
threads or clocks, and it imports nothing outside the standard library
because it also runs inside the guest (Python 3.11).

Frame layout (all integers unsigned 32-bit big-endian)::

    +-----------+------------+----------------------+------------------+
    | total_len | header_len | header (UTF-8 JSON)  | payload (binary) |
    +-----------+------------+----------------------+------------------+
                 \\________________ total_len bytes ___________________/

``total_len`` counts everything after its own four bytes. The header is a
JSON object with at least ``t`` (message type, ``str``) and ``id`` (request
id, ``int`` in ``[0, 2**53)`` so it survives any JSON implementation). The
payload is whatever follows the header and may be empty.

Headers are encoded canonically (sorted keys, compact separators, ASCII
only), so the same header always yields the same bytes. The host relies on
this to find the agent's ``sync_ok`` answer in a byte stream whose framing
was lost (for instance after a VM snapshot was restored mid-frame).

Requests carry an id chosen by the host; every guest message about that
request echoes it. ``ready`` is the only unsolicited message (id 0).

Message table (``MESSAGES``), host -> guest::

    sync        {nonce, clock_ns} + payload  -> sync_ok  (payload: entropy to mix in;
                                                          clock_ns: wall clock to set, or null)
    exec        {argv, env, cwd, timeout, max_output, stdin}
                                             -> started, stdout*/stderr*, exit | error
    stdin       {} + payload                 (to a running exec; no reply)
    stdin_eof   {}                           (to a running exec; no reply)
    kill        {signal}                     (to a running exec's process group; no reply)
    write_open  {path, mode}                 (no reply unless it fails)
    write_chunk {} + payload                 (no reply unless it fails)
    write_close {}                           -> ok | error (exactly one reply per write)
    read        {path, max_size}             -> data* then ok | error
    set_clock   {ns}                         -> ok | error
    entropy     {} + payload                 -> ok | error
    poweroff    {}                           -> ok | error

guest -> host: ``ready``, ``sync_ok``, ``started``, ``stdout``, ``stderr``,
``exit``, ``ok``, ``data``, ``error``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard

__all__ = [
    "CHUNK",
    "MAX_FRAME",
    "MAX_HEADER",
    "MAX_ID",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "FieldKind",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "MessageSpec",
    "encode_frame",
    "validate",
    "validate_frame",
]

#: Bumped on any incompatible change; the host refuses an agent that differs.
PROTOCOL_VERSION: Final = "1"
#: Folders one ``bind`` request may name.
MAX_BIND_PAIRS: Final = 256

#: Bounds the memory one frame can claim on either side; a CHUNK plus its header fits easily.
MAX_FRAME: Final = 1 << 20
#: Headers are small JSON objects; 64 KiB leaves room for long argv/env without allowing abuse.
MAX_HEADER: Final = 64 << 10
#: Payload size for streamed data (stdin, output, files): large enough to amortise framing.
CHUNK: Final = 256 << 10
#: Ids must be exactly representable as IEEE doubles (2**53) for any JSON peer.
MAX_ID: Final = 1 << 53

_U32 = struct.Struct(">I")
_PREFIX = struct.Struct(">II")


class FrameError(Exception):
    """A frame or message violates the protocol.

    The host re-raises this as ``pytest_gondolin.errors.AgentProtocolError``; it is
    defined here because this module must stay importable in the guest
    without the host package's dependencies.
    """


@dataclass(frozen=True)
class Frame:
    """One decoded frame: a JSON header with valid ``t``/``id`` and a raw payload."""

    header: dict[str, Any]
    payload: bytes = b""

    @property
    def type(self) -> str:
        """The message type (``header["t"]``)."""
        t: str = self.header["t"]
        return t

    @property
    def id(self) -> int:
        """The request id (``header["id"]``)."""
        i: int = self.header["id"]
        return i


# ---------------------------------------------------------------------------
# Field kinds: a description (used in error messages) and a predicate.


@dataclass(frozen=True)
class FieldKind:
    """A field type: ``check(value)`` is true iff the value is acceptable."""

    description: str
    check: Callable[[object], bool]


def _is_int(v: object) -> TypeGuard[int]:
    # bool is a subclass of int; JSON true/false must not pass as numbers.
    return isinstance(v, int) and not isinstance(v, bool)


def _int_range(lo: int, hi: int) -> FieldKind:
    return FieldKind(f"int in [{lo}, {hi}]", lambda v: _is_int(v) and lo <= v <= hi)


def _nullable(kind: FieldKind) -> FieldKind:
    return FieldKind(f"{kind.description} or null", lambda v: v is None or kind.check(v))


def _is_clean_str(v: object) -> TypeGuard[str]:
    # NUL cannot cross execve(2) or open(2); reject it here with a clear message.
    return isinstance(v, str) and "\0" not in v


def _is_argv(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_clean_str(a) for a in v)


def _is_env(v: object) -> bool:
    return isinstance(v, dict) and all(
        _is_clean_str(k) and k != "" and "=" not in k and _is_clean_str(val) for k, val in v.items()
    )


def _is_timeout(v: object) -> bool:
    if not (isinstance(v, float) or _is_int(v)):
        return False
    return math.isfinite(v) and 0 < v <= 10**9


def _is_path(v: object) -> bool:
    return _is_clean_str(v) and v.startswith("/")


def _is_bind_pairs(v: object) -> bool:
    return (
        isinstance(v, list)
        and 0 < len(v) <= MAX_BIND_PAIRS
        and all(isinstance(p, list) and len(p) == 2 and all(map(_is_path, p)) for p in v)
    )


STR: Final = FieldKind("str", lambda v: isinstance(v, str))
NONCE: Final = FieldKind(
    "non-empty str of at most 128 chars", lambda v: isinstance(v, str) and 0 < len(v) <= 128
)
BOOL: Final = FieldKind("bool", lambda v: isinstance(v, bool))
ARGV: Final = FieldKind("non-empty list of str without NUL", _is_argv)
ENV: Final = FieldKind("dict of str -> str (names non-empty, without '=' or NUL)", _is_env)
PATH: Final = FieldKind("absolute path (str starting with '/', without NUL)", _is_path)
BIND_PAIRS: Final = FieldKind(
    f"list of 1 to {MAX_BIND_PAIRS} [disk folder, folder] pairs of absolute paths", _is_bind_pairs
)
TIMEOUT: Final = FieldKind("finite number of seconds in (0, 1e9]", _is_timeout)
SIZE: Final = _int_range(0, MAX_ID - 1)
MODE: Final = _int_range(0, 0o7777)
SIGNAL: Final = _int_range(1, 64)
PID: Final = _int_range(1, (1 << 31) - 1)
# Exit statuses are 0..255; a death by signal N is reported as -N (like subprocess).
RETURNCODE: Final = _int_range(-64, 255)
ERRNO: Final = _nullable(_int_range(0, 4095))
NS: Final = _int_range(0, (1 << 63) - 1)


@dataclass(frozen=True)
class MessageSpec:
    """Who may send a message type, its required fields, and whether it carries a payload."""

    sender: Literal["host", "guest"]
    fields: Mapping[str, FieldKind]
    payload: bool = False


MESSAGES: Final[Mapping[str, MessageSpec]] = {
    # host -> guest
    # After a snapshot restore one round trip resynchronises framing, mixes
    # fresh entropy into the guest RNG and sets its clock (each would otherwise
    # cost a round trip, slow while TCG retranslates the restored guest).
    "sync": MessageSpec("host", {"nonce": NONCE, "clock_ns": _nullable(NS)}, payload=True),
    "exec": MessageSpec(
        "host",
        {
            "argv": ARGV,
            "env": _nullable(ENV),
            "cwd": _nullable(PATH),
            "timeout": _nullable(TIMEOUT),
            "max_output": SIZE,
            "stdin": BOOL,
        },
    ),
    "stdin": MessageSpec("host", {}, payload=True),
    "stdin_eof": MessageSpec("host", {}),
    "kill": MessageSpec("host", {"signal": SIGNAL}),
    "write_open": MessageSpec("host", {"path": PATH, "mode": MODE}),
    "write_chunk": MessageSpec("host", {}, payload=True),
    "write_close": MessageSpec("host", {}),
    "read": MessageSpec("host", {"path": PATH, "max_size": SIZE}),
    "set_clock": MessageSpec("host", {"ns": NS}),
    # Disk folders bound over tmpfs folders (guest/binds.py); "ok" once done.
    "bind": MessageSpec("host", {"pairs": BIND_PAIRS}),
    # A tar file the host wrote, unpacked at / and removed, then "folder" made (guest/unpack.py).
    "unpack": MessageSpec("host", {"path": PATH, "folder": PATH}),
    "entropy": MessageSpec("host", {}, payload=True),
    "poweroff": MessageSpec("host", {}),
    # guest -> host
    "ready": MessageSpec("guest", {"version": STR, "pid": PID}),
    "sync_ok": MessageSpec("guest", {"nonce": NONCE}),
    "started": MessageSpec("guest", {"pid": PID}),
    "stdout": MessageSpec("guest", {}, payload=True),
    "stderr": MessageSpec("guest", {}, payload=True),
    "exit": MessageSpec("guest", {"returncode": RETURNCODE, "timed_out": BOOL, "truncated": BOOL}),
    "ok": MessageSpec("guest", {}),
    "data": MessageSpec("guest", {}, payload=True),
    "error": MessageSpec("guest", {"message": STR, "errno": ERRNO}),
}


def _check_envelope(header: object) -> dict[str, Any]:
    """Check the fields every frame needs (object, ``t``, ``id``); return the header."""
    if not isinstance(header, dict):
        raise FrameError(f"header must be a JSON object, got {type(header).__name__}")
    t = header.get("t")
    if not isinstance(t, str) or not t:
        raise FrameError(f"header field 't' must be a non-empty str, got {t!r:.80}")
    i = header.get("id")
    if not _is_int(i) or not 0 <= i < MAX_ID:
        raise FrameError(f"header field 'id' must be an int in [0, 2**53), got {i!r:.80}")
    return header


def validate(
    header: dict[str, Any], *, sender: Literal["host", "guest"] | None = None
) -> dict[str, Any]:
    """Return ``header`` unchanged if it is a well-formed message.

    Checks the envelope, that the type is known (and, if ``sender`` is
    given, that this peer may send it), and every required field's type.
    Unknown extra fields are tolerated for forward compatibility.

    Raises:
        FrameError: naming the message type and the offending field.
    """
    _check_envelope(header)
    t = header["t"]
    spec = MESSAGES.get(t)
    if spec is None:
        raise FrameError(f"unknown message type {t!r:.80}")
    if sender is not None and spec.sender != sender:
        raise FrameError(f"message type {t!r} may only be sent by the {spec.sender}")
    if t == "ready" and header["id"] != 0:
        raise FrameError("ready.id: expected 0")
    for name, kind in spec.fields.items():
        if name not in header:
            raise FrameError(f"{t}.{name}: missing (expected {kind.description})")
        value = header[name]
        if not kind.check(value):
            raise FrameError(
                f"{t}.{name}: expected {kind.description}, got {type(value).__name__} {value!r:.80}"
            )
    return header


def validate_frame(frame: Frame, *, sender: Literal["host", "guest"] | None = None) -> Frame:
    """Return ``frame`` if its header validates and a payload is present only where allowed.

    Raises:
        FrameError: as :func:`validate`, or for a payload on a message that takes none.
    """
    validate(frame.header, sender=sender)
    if frame.payload and not MESSAGES[frame.type].payload:
        raise FrameError(f"{frame.type}: carries no payload, got {len(frame.payload)} bytes")
    return frame


# ---------------------------------------------------------------------------
# Encoding


def encode_frame(header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Encode one frame; whatever this returns, :class:`FrameDecoder` decodes to an equal frame.

    The header must satisfy the envelope rules (``t``, ``id``) and be JSON
    serialisable; message-level rules are :func:`validate`'s job.

    Raises:
        FrameError: the header is not encodable or the frame exceeds the size limits.
    """
    _check_envelope(header)
    try:
        raw = json.dumps(
            header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not JSON-serialisable: {exc}") from exc
    if len(raw) > MAX_HEADER:
        raise FrameError(f"header of {len(raw)} bytes exceeds MAX_HEADER ({MAX_HEADER})")
    total = 4 + len(raw) + len(payload)
    if total > MAX_FRAME:
        raise FrameError(f"frame of {total} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return b"".join((_PREFIX.pack(total, len(raw)), raw, payload))


# ---------------------------------------------------------------------------
# Decoding


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys would let the two peers disagree on a header's meaning.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FrameError(f"duplicate key {k!r:.80} in header")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise FrameError(f"non-standard JSON constant {name} in header")


class FrameDecoder:
    """Incremental, sans-IO frame decoder.

    Feed it bytes as they arrive (any split) and pull frames with
    :meth:`next_frame` or by iterating. Each frame's envelope (``t``,
    ``id``) is checked; message fields are not (see :func:`validate`).

    Once it has raised :class:`FrameError` the decoder is broken: every
    later :meth:`feed` or :meth:`next_frame` raises again, because framing
    is lost and nothing after the bad bytes can be trusted. Start a new
    decoder to resynchronise.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None

    @property
    def broken(self) -> bool:
        """True once the decoder has raised."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise FrameError(f"decoder unusable after an earlier error: {self._error}")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes.

        Raises:
            FrameError: the decoder is broken.
        """
        self._raise_if_broken()
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Size limits are enforced as soon as the length prefix arrives, so a
        peer cannot make us buffer more than :data:`MAX_FRAME` per frame.

        Raises:
            FrameError: the bytes are not a valid frame (the decoder is then broken).
        """
        self._raise_if_broken()
        try:
            return self._parse()
        except FrameError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def __iter__(self) -> Iterator[Frame]:
        """Yield every complete frame buffered so far."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def _parse(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (total,) = _U32.unpack_from(buf, 0)
        if total > MAX_FRAME:
            raise FrameError(f"frame length {total} exceeds MAX_FRAME ({MAX_FRAME})")
        if total < 4:
            raise FrameError(f"frame length {total} too short for a header length")
        if len(buf) < 8:
            return None
        (hlen,) = _U32.unpack_from(buf, 4)
        if hlen > MAX_HEADER:
            raise FrameError(f"header length {hlen} exceeds MAX_HEADER ({MAX_HEADER})")
        if hlen > total - 4:
            raise FrameError(f"header length {hlen} exceeds frame length {total}")
        if len(buf) < 4 + total:
            return None
        raw = bytes(buf[8 : 8 + hlen])
        payload = bytes(buf[8 + hlen : 4 + total])
        del buf[: 4 + total]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"header is not valid UTF-8: {exc}") from exc
        try:
            header = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
            )
        except FrameError:
            raise
        # RecursionError: deeply nested arrays; ValueError covers JSONDecodeError
        # and int-string conversion limits.
        except (ValueError, RecursionError) as exc:
            raise FrameError(f"header is not valid JSON: {exc!s:.200}") from exc
        return Frame(_check_envelope(header), payload)
