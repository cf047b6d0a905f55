"""Log tails: the last bytes of a file, the last lines of a text, never an exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gondolin.errors import ExecError, VMLaunchError
from pytest_gondolin.logtail import console_excerpt, read_tail, read_tail_text, tail_lines


@pytest.mark.parametrize(
    ("content", "limit", "expected"),
    [
        (b"0123456789", 4, b"6789"),
        (b"0123456789", 10, b"0123456789"),
        (b"0123456789", 100, b"0123456789"),
        (b"", 4, b""),
        (b"0123456789", 0, b""),
    ],
)
def test_read_tail(tmp_path: Path, content: bytes, limit: int, expected: bytes) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(content)
    assert read_tail(log, limit) == expected


def test_read_tail_of_nothing_is_empty(tmp_path: Path) -> None:
    assert read_tail(None, 10) == b""
    assert read_tail(tmp_path / "missing.log", 10) == b""
    assert read_tail(tmp_path, 10) == b""  # a folder: unreadable, still no exception


def test_read_tail_text_replaces_a_cut_character(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_bytes("é!".encode())  # b"\xc3\xa9!": a 2-byte tail cuts the character
    assert read_tail_text(log, 2) == "\ufffd!"


@pytest.mark.parametrize(
    ("text", "lines", "expected"),
    [
        ("a\nb\nc\n", 2, "b\nc"),
        ("a\nb\nc", 5, "a\nb\nc"),
        ("", 3, ""),
        ("a\nb", 0, ""),
    ],
)
def test_tail_lines(text: str, lines: int, expected: str) -> None:
    assert tail_lines(text, lines) == expected


def test_errors_quote_tails() -> None:
    long = "\n".join(f"line {i}" for i in range(100))
    launch = str(VMLaunchError("boom", stderr=long, console=long))
    assert "line 99" in launch and "line 59" not in launch  # 40 lines each
    failed = str(ExecError("failed", stdout=long))
    assert "line 99" in failed and "line 79" not in failed  # 20 lines


PANIC_CONSOLE = (
    "[   36.9] sysrq: Trigger a crash\r\n"
    "[   36.9] Kernel panic - not syncing: sysrq triggered crash\r\n"
    + "".join(f"[   36.9]  ? frame_{i}+0x1e/0x40\r\n" for i in range(200))
    + "[   36.9] Kernel Offset: 0x2de00000\r\n"
)


def test_a_console_excerpt_keeps_the_panic_line_its_stack_trace_pushed_out() -> None:
    excerpt = console_excerpt(PANIC_CONSOLE, 3000)
    first, marker, rest = excerpt.split("\n", 2)
    assert first == "[   36.9] Kernel panic - not syncing: sysrq triggered crash"
    assert marker == "[...]"
    assert rest == PANIC_CONSOLE[-3000:]


@pytest.mark.parametrize(
    "console",
    [
        "short console, Kernel panic - not syncing: x\n",  # all of it fits
        "boot\n" * 1000 + "login ok\n",  # no cause anywhere
        "Oops: 0000\n" + "x\n" * 2000 + "Kernel panic - not syncing: y\n",  # cause in the tail
    ],
)
def test_a_console_excerpt_is_the_plain_tail_otherwise(console: str) -> None:
    assert console_excerpt(console, 3000) == console[-3000:]
    assert console_excerpt(console, 0) == ""
