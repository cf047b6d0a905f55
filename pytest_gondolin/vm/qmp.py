"""A synchronous QMP client: qemu.qmp's QMPClient run on the shared I/O loop.

Stopping QEMU with :meth:`QMP.quit` is a planned end of the connection:
QEMU answers ``quit`` and closes the monitor as it exits, often with a
reset rather than an end-of-file, which qemu.qmp logs at ERROR from its
reader task. From the moment ``quit`` is sent, records of that one kind
(the connection ending: reset, broken pipe, end-of-file) from this
connection's logger are kept at DEBUG in ours; the same failure without a
``quit`` (QEMU died) is logged by qemu.qmp as before.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from pytest_gondolin.errors import VMError
from pytest_gondolin.vm import ioloop

log = logging.getLogger(__name__)

#: QMP answers within milliseconds; 30 s covers a host under heavy load.
QMP_TIMEOUT = 30.0


def _no_events(event: Any) -> bool:
    return False


#: "The other end closed the connection", as qemu.qmp's messages name the
#: exception (``exception_summary``: ``[module.]Name`` or ``[module.]Name: text``).
_HANGUP = re.compile(
    r"(?<![\w])(?:EOFError|IncompleteReadError|ConnectionError|ConnectionResetError"
    r"|ConnectionAbortedError|BrokenPipeError)(?::|$)"
)


class ExpectedHangup(logging.Filter):
    """Drops qemu.qmp's error records about the connection ending once QEMU was told to quit.

    Attached to one connection's logger; :attr:`armed` is set just before
    ``quit`` is sent. A dropped record is logged at DEBUG by this module
    instead, so ``--log-level=DEBUG`` still shows it.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.vm = name
        self.armed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.armed or record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if not _HANGUP.search(message):
            return True
        log.debug("%s: QMP connection ended as QEMU quit: %s", self.vm, message)
        return False


class QMP:
    """One QMP connection to one QEMU. Every call is bounded."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._client: QMPClient | None = None
        self._hangup = ExpectedHangup(name)
        self._logger: logging.Logger | None = None

    def connect(self, socket_path: str, timeout: float = QMP_TIMEOUT) -> None:
        async def _connect() -> QMPClient:
            client = QMPClient(self._name)
            # Nobody reads QEMU's events, and the default listener (which cannot
            # be removed) keeps every one of them without bound, in a queue and
            # a history: each restore brings STOP and RESUME. Accept none.
            client.events.event_filter = _no_events
            logger = client.logger
            if isinstance(logger, logging.Logger):  # one per connection name
                logger.addFilter(self._hangup)
                self._logger = logger
            await client.connect(socket_path)
            return client

        try:
            self._client = ioloop.run(_connect(), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise VMError(f"cannot connect to QMP socket {socket_path}: {exc}") from exc

    def cmd(self, command: str, timeout: float = QMP_TIMEOUT, **args: Any) -> Any:
        """Execute ``command`` and return its result; raise VMError on failure."""
        client = self._client
        if client is None:
            raise VMError(f"QMP {command}: not connected")
        log.debug("qmp %s %s", command, args)
        try:
            return ioloop.run(client.execute(command, args or None), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            raise VMError(f"QMP command {command} failed: {exc}") from exc

    def quit(self, timeout: float = QMP_TIMEOUT) -> None:
        """Tell QEMU to exit; its closing the connection from then on is not an error.

        Raises VMError if ``quit`` fails (QEMU may be gone already).
        """
        self._hangup.armed = True
        self.cmd("quit", timeout=timeout)

    def close(self) -> None:
        """Disconnect (idempotent). A connection QEMU already closed is not an error."""
        client, self._client = self._client, None
        try:
            if client is not None:
                ioloop.run(client.disconnect(), 5.0)
        except Exception as exc:  # closing a dead connection: nothing left to do
            log.debug("qmp disconnect: %s", exc)
        finally:
            logger, self._logger = self._logger, None
            if logger is not None:
                # The logger outlives this connection (logging keeps it by name).
                logger.removeFilter(self._hangup)
