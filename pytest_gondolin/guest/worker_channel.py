"""The worker's side of its wire protocol: the channel to the host, message encoding, command checks.

The protocol itself is described in :mod:`pytest_gondolin.guest.worker`,
which re-exports these names; the host imports the bounds from there.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from typing import IO, Any, Final

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_GO_ITEMS",
    "MAX_JSON_DEPTH",
    "MAX_WORKER_LINE",
    "SHRINK_STRING_CHARS",
    "HostPipe",
    "encode_line",
    "parse_command",
    "shrink",
    "to_jsonable",
]

#: Largest line the worker may send; the host rejects anything longer as a
#: protocol violation.  It bounds what one hostile line costs the host while
#: it is read and parsed (a few lines in flight, ~15 MiB of parsed values);
#: a larger report is shrunk to fit (see SHRINK_STRING_CHARS), and 4 MiB
#: still lists ~40k collected node ids of typical length.
MAX_WORKER_LINE: Final = 4 * 1024 * 1024
#: Largest command line the host may send: commands are tiny, but answers to
#: queries carry recorded HTTP exchanges (bodies up to 1 MiB each).
MAX_COMMAND_LINE: Final = 64 * 1024 * 1024
#: Deepest JSON nesting either side produces or accepts; serialized reports
#: nest about a dozen levels (longrepr → chain → traceback → entry → ...).
MAX_JSON_DEPTH: Final = 64
#: Bounds of a ``go`` command: arguments and environment entries.
MAX_GO_ITEMS: Final = 10_000

#: When a serialized report does not fit in MAX_WORKER_LINE, each string in
#: it is cut to this many characters (then, failing that, the captured
#: sections are dropped) rather than losing the report.
SHRINK_STRING_CHARS: Final = 512 * 1024
_TRUNCATION_MARK: Final = "\n[... truncated by the pytest-gondolin worker ...]\n"


def to_jsonable(obj: object, depth: int = 0) -> Any:
    """Return a copy of *obj* that ``json.dumps(..., allow_nan=False)`` accepts.

    Tuples become lists, mapping keys become strings, non-finite floats and
    any other object become their ``repr``, and nesting deeper than
    ``MAX_JSON_DEPTH`` is replaced by the ``repr`` of the subtree.  Plugins
    put arbitrary objects in reports (``user_properties`` values, extra
    attributes), and one odd value must not lose the whole report.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if depth >= MAX_JSON_DEPTH - 1:
        return _safe_repr(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return _safe_repr(obj)


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception as exc:  # a hostile __repr__ must not lose the report
        return f"<unrepresentable {type(obj).__name__}: {type(exc).__name__}>"


def encode_line(message: dict[str, Any]) -> bytes:
    """Encode one protocol message as a line (ASCII JSON plus ``b"\\n"``)."""
    return (
        json.dumps(message, ensure_ascii=True, allow_nan=False, separators=(",", ":")) + "\n"
    ).encode("ascii")


def shrink(obj: Any, limit: int) -> Any:
    if isinstance(obj, str) and len(obj) > limit:
        return obj[: limit // 2] + _TRUNCATION_MARK + obj[-limit // 2 :]
    if isinstance(obj, dict):
        return {k: shrink(v, limit) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shrink(v, limit) for v in obj]
    return obj


class HostPipe:
    """The worker's end of the protocol: private fds for commands and messages.

    Sending never raises: once the host is gone (a write fails), the channel
    is marked closed, further messages are dropped and :meth:`recv` returns
    ``None`` so the serving loop ends.
    """

    def __init__(self, in_fd: int, out_fd: int, *, max_out: int = MAX_WORKER_LINE) -> None:
        self._in: IO[bytes] = open(in_fd, "rb", buffering=64 * 1024)  # noqa: SIM115 - lives as long as the worker
        self._out_fd = out_fd
        # Live output (guest/live.py) is sent from a pump thread: one line at a time.
        self._send_lock = threading.Lock()
        self._max_out = max_out
        self.closed = False

    @classmethod
    def take_std_fds(cls) -> HostPipe:
        """Move the protocol onto private copies of fds 0 and 1.

        Afterwards fd 1 is a copy of fd 2 (stray prints land in stderr) and
        fd 0 reads ``/dev/null``.  Must run before pytest starts capturing.
        """
        sys.stdout.flush()
        out_fd = os.dup(1)  # os.dup makes the copy non-inheritable (PEP 446)
        in_fd = os.dup(0)
        os.dup2(2, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(devnull, 0)
        finally:
            os.close(devnull)
        return cls(in_fd, out_fd)

    def send(self, message: dict[str, Any]) -> None:
        """Write one message; an oversized one is replaced by an ``error``."""
        if self.closed:
            return
        line = encode_line(message)
        if len(line) > self._max_out:
            line = encode_line(
                {
                    "t": "error",
                    "message": f"worker message {message.get('t')!r} too large "
                    f"({len(line)} bytes > {self._max_out}); dropped",
                }
            )
        view = memoryview(line)
        with self._send_lock:
            try:
                while view:
                    written = os.write(self._out_fd, view)
                    view = view[written:]
            except OSError:
                self.closed = True

    def recv(self) -> dict[str, Any] | None:
        """Read the next command; ``None`` at end of input or once closed.

        A malformed command comes back as ``{"t": "invalid", "message": ...}``
        so the loop can answer with an ``error`` and carry on.
        """
        if self.closed:
            return None
        try:
            line = self._in.readline(MAX_COMMAND_LINE + 1)
        except OSError:
            return None
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) <= MAX_COMMAND_LINE:
                return None  # input ended mid-line: the host went away
            self._discard_rest_of_line()
            return {"t": "invalid", "message": f"command longer than {MAX_COMMAND_LINE} bytes"}
        return parse_command(line)

    def close(self) -> None:
        """Close both descriptors; later sends are dropped, recv returns None."""
        self.closed = True
        self._in.close()
        with contextlib.suppress(OSError):
            os.close(self._out_fd)

    def _discard_rest_of_line(self) -> None:
        while True:
            chunk = self._in.readline(MAX_COMMAND_LINE)
            if not chunk or chunk.endswith(b"\n"):
                return


def parse_command(line: bytes) -> dict[str, Any]:
    """Validate one command line from the host.

    Returns the command, or ``{"t": "invalid", "message": ...}`` describing
    what is wrong with it; never raises.
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return {"t": "invalid", "message": f"command is not JSON: {exc}"}
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        return {"t": "invalid", "message": "command is not an object with a string 't'"}
    kind = obj["t"]
    if kind == "run":
        nodeid, seed = obj.get("nodeid"), obj.get("seed")
        if not isinstance(nodeid, str) or not isinstance(seed, int) or isinstance(seed, bool):
            return {"t": "invalid", "message": "run needs a string nodeid and an integer seed"}
        if not _env_ok(obj.get("env", {})):
            return {"t": "invalid", "message": "run env must map variable names to strings"}
    elif kind == "answer":
        if not isinstance(obj.get("ok"), bool):
            return {"t": "invalid", "message": "answer needs a boolean ok"}
    elif kind == "ping":
        if not isinstance(obj.get("nonce"), str):
            return {"t": "invalid", "message": "ping needs a string nonce"}
    elif kind == "go":
        return _check_go(obj)
    elif kind not in ("quit", "collect"):
        return {"t": "invalid", "message": f"unknown command type {kind[:100]!r}"}
    return obj


def _env_ok(env: object) -> bool:
    return isinstance(env, dict) and all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    )


def _check_go(obj: dict[str, Any]) -> dict[str, Any]:
    """A ``go`` command as sent, or ``invalid`` naming what is wrong with it."""
    argv, cwd, env = obj.get("argv"), obj.get("cwd"), obj.get("env", {})
    if (
        not isinstance(argv, list)
        or len(argv) > MAX_GO_ITEMS
        or not all(isinstance(a, str) and "\0" not in a for a in argv)
    ):
        return {"t": "invalid", "message": "go needs argv, a list of strings"}
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        return {"t": "invalid", "message": f"go needs an absolute cwd, got {str(cwd)[:200]!r}"}
    if not _env_ok(env) or len(env) > MAX_GO_ITEMS:
        return {"t": "invalid", "message": "go env must map variable names to strings"}
    if not isinstance(obj.get("pause", False), bool):
        return {"t": "invalid", "message": "go pause must be a boolean"}
    return obj
