"""``guest/live.py``: a run's fds 1 and 2 and ``--setup-show`` lines sent as ``output`` messages.

Real file descriptors, pipes and the pump thread, in this process (no VM):
what a run writes arrives in order and before the run's block returns,
bounded per run; nothing is sent outside a run.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import pytest

from pytest_gondolin.guest import live


class Sent:
    """A thread-safe ``send`` recording the messages."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(message)

    def text(self, stream: str) -> str:
        return "".join(m["data"] for m in self.messages if m["stream"] == stream)


def test_a_runs_output_is_sent_before_the_run_ends(capfd: pytest.CaptureFixture[str]) -> None:
    sent = Sent()
    output = live.LiveOutput(sent)
    assert sys.__stdout__ is not None and sys.__stderr__ is not None
    with output.running():
        # Python's own streams on fds 1 and 2 (pytest's capture replaced sys.stdout
        # here; in the worker, under -s, they are sys.stdout and sys.stderr).
        os.write(1, "fd one é\n".encode())
        print("from print", file=sys.__stdout__)  # maybe buffered: flushed at the end
        sys.__stderr__.write("to stderr\n")
        sys.__stderr__.flush()
        os.write(2, b"\xff raw\n")
    assert all(m["t"] == "output" for m in sent.messages)
    assert sent.text("stdout") == "fd one é\nfrom print\n"
    assert sent.text("stderr") == "to stderr\n\ufffd raw\n"
    # The fds are back: this goes to pytest's capture, not to the host.
    print("after")
    assert capfd.readouterr().out == "after\n"
    assert sent.text("stdout") == "fd one é\nfrom print\n"


def test_output_past_the_budget_is_cut_with_one_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "MAX_LIVE_BYTES", 100_000)
    sent = Sent()
    output = live.LiveOutput(sent)
    with output.running():
        for _ in range(50):
            os.write(1, b"x" * 10_000)
    text = sent.text("stdout")
    assert text.count("x") == 100_000
    assert text.endswith("truncated by the pytest-gondolin worker ...]\n")
    with output.running():  # a new run, a new budget
        os.write(1, b"again\n")
    assert sent.text("stdout").endswith("again\n")


def test_host_text_file_sends_on_flush_in_bounded_chunks() -> None:
    sent = Sent()
    file = live.HostTextFile(sent)
    file.write("a" * (live.CHUNK + 5))
    assert sent.messages == []
    file.flush()
    assert [len(m["data"]) for m in sent.messages] == [live.CHUNK, 5]
    assert not file.isatty()


def test_terminal_to_host_redirects_only_within_the_block(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "no:randomly")
    config._do_configure()
    try:
        sent = Sent()
        own = config.get_terminal_writer()
        with live.terminal_to_host(config, sent, streaming=False):
            writer = config.get_terminal_writer()
            assert writer is not own
            writer.line("SETUP    F fixture")
        assert config.get_terminal_writer() is own
        assert sent.text("stdout") == "SETUP    F fixture\n"
    finally:
        config._ensure_unconfigure()
