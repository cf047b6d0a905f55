"""What a sandboxed test shows while it runs, sent to the host as it happens.

Two things reach the host's terminal live, as ``output`` messages
(``{"t": "output", "stream": "stdout" | "stderr", "data": str}``, see
:mod:`pytest_gondolin.guest.worker`):

* with ``-s`` / ``--capture=no`` (or ``tee-sys``), whatever the test writes
  to file descriptors 1 and 2: :class:`LiveOutput` points them at pipes for
  the duration of a run, and a pump thread sends what arrives;
* with ``--setup-show``, pytest's ``SETUP`` / ``TEARDOWN`` lines and the
  test's own line, which pytest writes through ``config.get_terminal_writer()``:
  :func:`terminal_to_host` points that at the host during a run.

The guest's own terminal reporter (its header and progress) never goes to
the host: the host prints its own. What one run may send is bounded here
(:data:`MAX_LIVE_BYTES`) and again, independently, on the host.
Imports only the standard library and pytest.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import selectors
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TextIO

import pytest

__all__ = [
    "MAX_LIVE_BYTES",
    "STREAMED_CAPTURE",
    "HostTextFile",
    "LiveOutput",
    "terminal_file",
    "terminal_to_host",
]

#: ``--capture`` methods whose output a run streams to the host.
STREAMED_CAPTURE: Final = frozenset({"no", "tee-sys"})
#: Most bytes of live output one run sends; the rest is dropped with a note.
#: The host keeps its own, equal bound (sandbox/client.py).
MAX_LIVE_BYTES: Final = 8 * 1024 * 1024
#: Largest read from a pipe, hence largest ``data`` of one message.
CHUNK: Final = 64 * 1024
#: How long the end of a run waits for the pump to send what is left in the
#: pipes (the pump needs milliseconds; a test's background thread writing
#: forever must not hold the run open).
DRAIN_TIMEOUT: Final = 2.0
_TRUNCATED: Final = "\n[... live output truncated by the pytest-gondolin worker ...]\n"

Send = Callable[[dict[str, Any]], None]


class HostTextFile:
    """A text file whose writes are sent to the host as ``output`` messages on flush."""

    def __init__(self, send: Send, stream: str = "stdout") -> None:
        self._send = send
        self._stream = stream
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        data, self._parts = "".join(self._parts), []
        for start in range(0, len(data), CHUNK):
            self._send({"t": "output", "stream": self._stream, "data": data[start : start + CHUNK]})

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def terminal_to_host(config: pytest.Config, send: Send, *, streaming: bool) -> Iterator[None]:
    """Within the block, ``config.get_terminal_writer()`` writes to the host.

    pytest's ``--setup-show`` lines go through it (``_pytest/setuponly.py``,
    ``runner.show_test_item``); the terminal reporter keeps its own writer.
    ``streaming``: fd 1 already leads to the host (:class:`LiveOutput`), so
    write there, in order with what the test prints.
    """
    from _pytest._io import TerminalWriter

    file: Any = sys.stdout if streaming else HostTextFile(send)
    writer = TerminalWriter(file)
    writer.hasmarkup = False
    config.get_terminal_writer = lambda: writer  # type: ignore[method-assign]
    try:
        yield
    finally:
        del config.get_terminal_writer  # back to the class's method
        writer.flush()


class LiveOutput:
    """Sends what a run writes to fds 1 and 2 to the host while it runs.

    :meth:`running` points fds 1 and 2 at pipes for the block's duration;
    a daemon thread reads them and calls ``send`` (which must be
    thread-safe) with each chunk. On leaving the block, Python's buffered
    streams are flushed, the fds restored, and what is still in the pipes
    is sent before the block returns (bounded by :data:`DRAIN_TIMEOUT`).
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._pipes: dict[int, tuple[int, str, codecs.IncrementalDecoder]] = {}
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._pipes[fd] = (write_end, stream, decoder)
            self._selector.register(read_end, selectors.EVENT_READ, (stream, decoder))
        self._budget = MAX_LIVE_BYTES
        self._truncated = False
        #: A run is on: what arrives goes to the host (else to the worker's stderr).
        self._active = False
        threading.Thread(target=self._pump, name="gondolin-live-output", daemon=True).start()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Fds 1 and 2 lead to the host within the block."""
        with self._lock:
            self._budget, self._truncated, self._active = MAX_LIVE_BYTES, False, True
        _flush_std()
        saved = {fd: os.dup(fd) for fd in self._pipes}
        try:
            for fd, (write_end, _, _) in self._pipes.items():
                os.dup2(write_end, fd)
            yield
        finally:
            _flush_std()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            self._drain()
            with self._lock:
                self._active = False

    def _pump(self) -> None:
        while True:
            events = self._selector.select(timeout=1.0)
            with self._lock:
                for key, _ in events:
                    self._read(key.fd, *key.data)

    def _read(self, fd: int, stream: str, decoder: codecs.IncrementalDecoder) -> None:
        """Read what is in one pipe and send it (caller holds the lock)."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data or self._truncated:
            return
        if not self._active:
            # A test's child still writing after its run: never a message
            # outside a run (the host reads none between runs).
            with contextlib.suppress(OSError):
                os.write(2, data)
            return
        if len(data) > self._budget:
            data, self._truncated = data[: self._budget], True
        self._budget -= len(data)
        text = decoder.decode(data) + (_TRUNCATED if self._truncated else "")
        if text:
            self._send({"t": "output", "stream": stream, "data": text})

    def _drain(self) -> None:
        """Wait until the pump has sent everything the pipes hold (or the bound passes)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        keys = list(self._selector.get_map().values())
        while time.monotonic() < deadline:
            with self._lock:
                if all(_pending(key.fd) == 0 for key in keys):
                    for _, decoder in (key.data for key in keys):
                        decoder.reset()  # a split character at the end is dropped
                    return
            time.sleep(0.005)


def _pending(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` (``FIONREAD``)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


def terminal_file() -> TextIO:
    """A text file on a copy of fd 2: where the guest's terminal reporter writes instead
    of fd 1, so a run's fd 1 carries only the test's own output."""
    return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
