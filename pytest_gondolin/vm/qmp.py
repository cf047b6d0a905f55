"""A synchronous QMP client: qemu.qmp's QMPClient run on the shared I/O loop."""

from __future__ import annotations

import logging
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


class QMP:
    """One QMP connection to one QEMU. Every call is bounded."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._client: QMPClient | None = None

    def connect(self, socket_path: str, timeout: float = QMP_TIMEOUT) -> None:
        async def _connect() -> QMPClient:
            client = QMPClient(self._name)
            # Nobody reads QEMU's events, and the default listener (which cannot
            # be removed) keeps every one of them without bound, in a queue and
            # a history: each restore brings STOP and RESUME. Accept none.
            client.events.event_filter = _no_events
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

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            ioloop.run(client.disconnect(), 5.0)
        except Exception as exc:  # closing a dead connection: nothing left to do
            log.debug("qmp disconnect: %s", exc)
