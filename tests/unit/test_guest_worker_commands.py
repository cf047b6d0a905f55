"""The worker's side of the wire (``guest/worker.py``): commands in, JSON lines out, no process.

The host's side of the same lines is ``tests/unit/sandbox/test_messages.py``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pytest

from pytest_gondolin.guest import worker
from pytest_gondolin.sandbox.messages import DoneMessage, PongMessage, parse_message


@pytest.mark.parametrize(
    ("raw", "expected_type"),
    [
        (b'{"t":"run","nodeid":"a::b","seed":1}\n', "run"),
        (b'{"t":"ping","nonce":"n"}\n', "ping"),
        (b'{"t":"quit"}\n', "quit"),
        (b'{"t":"run","nodeid":"a::b","seed":true}\n', "invalid"),
        (b'{"t":"run","nodeid":1,"seed":1}\n', "invalid"),
        (b'{"t":"ping"}\n', "invalid"),
        (b'{"t":"exec"}\n', "invalid"),
        (b"[]\n", "invalid"),
        (b"\xff\n", "invalid"),
        (b"[" * 5000 + b"\n", "invalid"),
    ],
)
def test_worker_parses_commands(raw: bytes, expected_type: str) -> None:
    assert worker.parse_command(raw)["t"] == expected_type


def test_worker_makes_any_report_jsonable() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    nested: Any = []
    deep = nested
    for _ in range(200):
        deep.append([])
        deep = deep[0]
    value = worker.to_jsonable(
        {"t": (1, 2.5), 3: float("nan"), "o": Odd(), "h": Hostile(), "d": nested}
    )
    encoded = worker.encode_line(value)
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    decoded = json.loads(encoded)
    assert decoded["t"] == [1, 2.5] and decoded["3"] == "nan" and decoded["o"] == "<odd>"
    assert decoded["h"].startswith("<unrepresentable Hostile")


def test_worker_channel_skips_an_oversized_command_and_refuses_oversized_messages() -> None:
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    channel = worker.HostPipe(cmd_r, out_w, max_out=200)

    def feed() -> None:  # more than a pipe buffer: write from another thread
        with os.fdopen(cmd_w, "wb") as w:
            w.write(b"x" * (worker.MAX_COMMAND_LINE + 10) + b"\n" + b'{"t":"quit"}\n')

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert channel.recv() == {
        "t": "invalid",
        "message": f"command longer than {worker.MAX_COMMAND_LINE} bytes",
    }
    assert channel.recv() == {"t": "quit"}
    assert channel.recv() is None
    writer.join(timeout=5)
    channel.send({"t": "error", "message": "y" * 500})
    channel.send({"t": "done", "nodeid": "a"})
    channel.close()
    channel.send({"t": "done", "nodeid": "dropped"})
    with os.fdopen(out_r, "rb") as r:
        lines = r.read().splitlines()
    first = parse_message(lines[0])
    assert "too large" in getattr(first, "message", "")
    assert parse_message(lines[1]) == DoneMessage("a")
    assert len(lines) == 2
    assert not isinstance(first, PongMessage)
