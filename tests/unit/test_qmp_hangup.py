"""A QEMU that quits as asked does not log an error; one that dies on its own still does.

qemu.qmp logs the reader task's end at ERROR when the connection is reset
(``Task.Reader: ConnectionResetError: ...``). :class:`ExpectedHangup`, on
each connection's logger, keeps such records at DEBUG in our log once
``quit`` was sent, and only those. The whole road, with a real QEMU, is
``tests/plugin/test_teardown_log.py``.
"""

from __future__ import annotations

import logging

import pytest

from pytest_gondolin.vm.qmp import ExpectedHangup

#: What qemu.qmp logs (protocol.py ``_bh_loop_forever`` / ``_bh_disconnect``).
RESET = ("Task.%s: %s", ("Reader", "ConnectionResetError: [Errno 104] Connection reset by peer"))
BROKEN_PIPE = ("%s: %s", ("Failed to flush the writer", "BrokenPipeError: [Errno 32] Broken pipe"))
EOF = ("Task.%s: %s", ("Reader", "EOFError"))
INCOMPLETE = (
    "Task.%s: %s",
    ("Reader", "asyncio.exceptions.IncompleteReadError: 0 bytes read on a total of 1 expected"),
)
PROTOCOL = ("Task.%s: %s", ("Reader", "qemu.qmp.protocol.ProtocolError: bad message"))
LOOKALIKE = ("Task.%s: %s", ("Reader", "MyConnectionResetErrorish: nope"))


def _record(fmt: str, args: tuple[str, ...], level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("qemu.qmp.protocol.vm", level, __file__, 1, fmt, args, None)


@pytest.mark.parametrize(
    ("armed", "message", "level", "kept"),
    [
        # After quit: the connection ending is expected.
        (True, RESET, logging.ERROR, False),
        (True, BROKEN_PIPE, logging.ERROR, False),
        (True, EOF, logging.ERROR, False),
        (True, INCOMPLETE, logging.ERROR, False),
        # Negative controls: the same end without quit (QEMU died) is still an error ...
        (False, RESET, logging.ERROR, True),
        (False, EOF, logging.ERROR, True),
        # ... other errors after quit are kept, and so is everything below ERROR.
        (True, PROTOCOL, logging.ERROR, True),
        (True, LOOKALIKE, logging.ERROR, True),
        (True, RESET, logging.INFO, True),
    ],
)
def test_only_the_planned_hangup_is_dropped(
    armed: bool, message: tuple[str, tuple[str, ...]], level: int, kept: bool
) -> None:
    hangup = ExpectedHangup("vm")
    hangup.armed = armed
    assert hangup.filter(_record(*message, level=level)) is kept


def test_a_dropped_record_stays_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    hangup = ExpectedHangup("vm7")
    hangup.armed = True
    with caplog.at_level(logging.DEBUG, logger="pytest_gondolin.vm.qmp"):
        assert not hangup.filter(_record(*RESET))
    [record] = [r for r in caplog.records if r.name == "pytest_gondolin.vm.qmp"]
    assert record.levelno == logging.DEBUG
    assert "vm7" in record.getMessage() and "ConnectionResetError" in record.getMessage()
