"""A sandboxed test's live output (``-s``, ``--setup-show``) on the host's terminal.

The guest sends what a running test writes (``guest/live.py``); the client
(:mod:`.client`) bounds it per run and shows it here. Guest text is hostile:
control characters are made visible before it reaches a terminal.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Final

__all__ = [
    "LIVE_TRUNCATED",
    "MAX_LIVE_CHARS_PER_RUN",
    "safe_host_text",
    "safe_terminal_text",
    "show_live_output",
]

log = logging.getLogger(__name__)

#: Most characters of live output (``-s``, ``--setup-show``) one run shows on
#: the host; the rest is dropped with one note. The worker has its own,
#: equal bound (guest/live.py); this one holds whatever the guest does.
MAX_LIVE_CHARS_PER_RUN: Final = 8 * 1024 * 1024
LIVE_TRUNCATED: Final = "\n[... live output of the guest truncated by pytest-gondolin ...]\n"
#: C0 and C1 control characters but tab, newline and carriage return: a guest
#: must not drive the host's terminal (escape sequences set titles, the
#: clipboard, ...). Shown as "^X" / "\x9b" instead.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _visible_char(char: str) -> str:
    """``char`` spelled out: ``^X`` for C0 and DEL, ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN`` above."""
    code = ord(char)
    if code < 0x20:
        return f"^{chr(code + 64)}"
    if code == 0x7F:
        return "^?"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _visible(match: re.Match[str]) -> str:
    return _visible_char(match.group())


def safe_terminal_text(text: str) -> str:
    """``text`` with every control character but tab, newline and CR made visible."""
    return _CONTROL.sub(_visible, text)


#: What the host shows as its own account of the guest (an error the worker
#: reports, a crash's stderr, a collection error's summary) may not move the
#: cursor either: a carriage return there could overwrite a status line.
_HOST_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_host_text(text: str, *, max_chars: int | None = None, one_line: bool = False) -> str:
    """Guest ``text`` the host frames as its own: every control character but tab and
    newline made visible (``^[`` for ESC, ``^M`` for a carriage return).

    ``max_chars``: only the first that many characters of ``text`` are shown
    (cut before escaping, so the result stays within ten times that).
    ``one_line``: for a log line, tab and newline are made visible too
    (``^I``, ``^J``), and so is every other character Python does not call
    printable (line separators, bidirectional overrides: ``\\u2028``, ``\\u202e``).
    """
    if max_chars is not None:
        text = text[:max_chars]
    if one_line:
        return "".join(c if c.isprintable() else _visible_char(c) for c in text)
    return _HOST_CONTROL.sub(_visible, text)


def show_live_output(stream: str, text: str) -> None:
    """Write a sandboxed test's live output to the host's stdout or stderr, now.

    The host's capture is suspended between a test's phases, when sandboxed
    tests run, so this is the terminal -- as for a host-side test under ``-s``.
    """
    target = sys.stderr if stream == "stderr" else sys.stdout
    try:
        target.write(text)
        target.flush()
    except (OSError, ValueError) as exc:  # a closed or broken terminal loses only the output
        log.debug("live output not shown: %s", exc)
