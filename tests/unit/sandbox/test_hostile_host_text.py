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
