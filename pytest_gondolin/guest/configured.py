"""The worker's pause between pytest's configuration and collection (the *configured* state).

After an edit, a re-run's worker used to configure pytest again before it
collected (parsing the command line, registering every plugin, the fixture
manager reading every plugin module: ~1 s of the ~1.2 s under TCG, for one
test file). Configuration reads little of the project: the initial
``conftest.py`` files, the ini file, ``-p`` plugins of the tree and what they
import. So when the host asks for it (the ``go``'s ``"pause"``), the worker
stops there, once pytest is configured and the session started, before the
first file is collected:

1. it says ``{"t": "configured", "read": [path, ...] | null}``: every file it
   opened, or imported, while it configured (:class:`ReadRecorder`), except
   the interpreter's and the installed distributions' own files (the host
   keys those with the environment); ``null`` when there were too many to list;
2. the host may snapshot the guest now (its page cache dropped first, as
   before the collected snapshot), and keeps, with that snapshot, the
   digests of the project files among those paths;
3. it waits for ``{"t": "collect"}``, forgets what the import system cached
   about folders (the host may have copied a newer tree in meanwhile) and
   collects.

A later run whose tree matches on those files (and on its list of file
names) restores this snapshot instead of the started worker's, copies its
tree in and sends ``collect`` (``sandbox/configured.py``). Imports only the
standard library: this runs in the guest.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
from collections.abc import Callable
from typing import Any, Final

__all__ = ["MAX_READS", "ReadRecorder"]

#: Paths listed at most; more and the list is ``null`` (the host then keeps no snapshot).
MAX_READS: Final = 4096
#: A path longer than this is not listed (the list is then ``null``).
MAX_PATH_CHARS: Final = 4096
#: All paths together at most (the ``configured`` line stays far below the line limit).
MAX_TOTAL_CHARS: Final = 1 << 20
#: Never project files: the kernel's views and devices.
_SYSTEM_PREFIXES: Final = ("/proc/", "/sys/", "/dev/")


def _installed_prefixes() -> tuple[str, ...]:
    """Folders whose files the host keys with the environment, not the tree."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            found.add(path)
    return tuple(sorted(os.path.join(p, "") for p in found if p and p != "/"))


class ReadRecorder:
    """Records the paths opened (an audit hook) and imported while pytest configures.

    An audit hook cannot be removed: once :meth:`stop` is called it returns
    at its first test. It never raises (an exception in an audit hook would
    fail the audited call).
    """

    def __init__(self) -> None:
        self._paths: set[str] | None = set()
        self._chars = 0
        self._skip = _installed_prefixes() + _SYSTEM_PREFIXES
        self.recording = False

    def start(self) -> None:
        self.recording = True
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.recording or event != "open":
            return
        try:
            self._add(args[0])
        except Exception:  # an audit hook must not fail the open
            self._paths = None

    def _add(self, path: object) -> None:
        if self._paths is None or isinstance(path, int):
            return
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None
        if text is None:
            return
        text = os.path.abspath(text)
        if text.startswith(self._skip) or "/__pycache__/" in text:
            return  # not the project's, or made from a source that is listed
        if text in self._paths:
            return
        self._chars += len(text)
        if (
            len(text) > MAX_PATH_CHARS
            or len(self._paths) >= MAX_READS
            or self._chars > MAX_TOTAL_CHARS
        ):
            self._paths = None
            return
        self._paths.add(text)

    def stop(self) -> list[str] | None:
        """Stop recording; the paths read (with every imported module's file), or None: too many."""
        self.recording = False
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                self._add(path)
        return None if self._paths is None else sorted(self._paths)


def pause(
    recorder: ReadRecorder,
    send: Callable[[dict[str, Any]], None],
    recv: Callable[[], dict[str, Any] | None],
    before_snapshot: Callable[[], None],
) -> bool:
    """Say ``configured``, then serve commands until ``collect``: True, or ``quit``/EOF: False."""
    read = recorder.stop()
    before_snapshot()
    send({"t": "configured", "read": read})
    while True:
        command = recv()
        if command is None or command["t"] == "quit":
            return False
        if command["t"] == "collect":
            importlib.invalidate_caches()
            return True
        if command["t"] == "ping":
            send({"t": "pong", "nonce": command["nonce"]})
        else:
            message = command.get("message") or f"expected 'collect', got {command['t']!r}"
            send({"t": "error", "message": message})
