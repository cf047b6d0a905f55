"""Guest text the host shows as its own account carries no raw control characters.

An error the worker reports, a crashed worker's stderr, a collection error
only the guest saw: the host frames each (``Failure``, ``in the guest:``),
so an escape sequence or a carriage return there could clear the terminal or
overwrite a status line with a forged one. Property-tested over any text.
"""

from __future__ import annotations

import io
import re

from _pytest._io import TerminalWriter
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.sandbox.live_output import safe_host_text
from pytest_gondolin.sandbox.outcome import Failure
from pytest_gondolin.sandbox.replay import IN_GUEST, GuestErrorRepr

RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
FORGED = "E\x1b[2J\x1b[H\rtest_x.py::test_other PASSED\x9b31m\x07"


def test_escape_carriage_return_and_c1_are_made_visible() -> None:
    assert safe_host_text(FORGED) == "E^[[2J^[[H^Mtest_x.py::test_other PASSED\\x9b31m^G"
    assert safe_host_text("line one\n\tline two") == "line one\n\tline two"  # control


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2FF)))
def test_no_text_keeps_a_raw_control_character(text: str) -> None:
    shown = safe_host_text(text)
    assert not RAW.search(shown)
    assert shown.count("\n") == text.count("\n")  # line structure kept


def test_a_failure_holds_only_visible_guest_text() -> None:
    failure = Failure("crash", "worker crashed " + FORGED, "stderr tail:\n" + FORGED)
    assert not RAW.search(failure.headline) and not RAW.search(failure.detail)
    assert "^[[2J" in failure.detail and "\n" in failure.detail
    assert not RAW.search(Failure.from_exception(RuntimeError(FORGED + "\n" + FORGED)).detail)


def test_a_guest_collection_error_summary_line_is_visible_text() -> None:
    for inner in (FORGED, f"{FORGED}\nmore"):
        repr_ = GuestErrorRepr(inner, "test_x.py", 0)
        assert repr_.reprcrash.message.startswith(IN_GUEST)
        assert not RAW.search(repr_.reprcrash.message)
        out = io.StringIO()
        repr_.toterminal(TerminalWriter(file=out))
        assert not RAW.search(out.getvalue())


def test_one_line_text_shows_line_breaks_and_format_characters_too() -> None:
    text = FORGED + "\nnext\tcol\u2028sep\u202eevil\xa0nb\U000e0041"
    shown = safe_host_text(text, one_line=True)
    assert shown == (
        "E^[[2J^[[H^Mtest_x.py::test_other PASSED\\x9b31m^G"
        "^Jnext^Icol\\u2028sep\\u202eevil\\xa0nb\\U000e0041"
    )
    assert safe_host_text("ok: été, 日本", one_line=True) == "ok: été, 日本"  # control


def test_max_chars_cuts_the_guest_text_before_it_is_escaped() -> None:
    assert safe_host_text("\x1b" * 10, max_chars=3) == "^[^[^["
    assert safe_host_text("abc", max_chars=0) == ""
    assert safe_host_text("abc", max_chars=10) == "abc"  # control: short text is whole


@settings(max_examples=200, deadline=None)
@given(st.text(), st.integers(min_value=0, max_value=50))
def test_one_line_text_is_printable_and_bounded(text: str, max_chars: int) -> None:
    shown = safe_host_text(text, max_chars=max_chars, one_line=True)
    assert shown.isprintable()
    assert len(shown) <= 10 * max_chars
    assert safe_host_text(text, max_chars=max_chars) == safe_host_text(text[:max_chars])
